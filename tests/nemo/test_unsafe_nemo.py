"""A .nemo is checked before NeMo touches it: crafted archives are refused, and what they carry never runs.

NeMo restores weights with torch.load(weights_only=False) and unpacks with extractall, so each of these
would execute a command or write outside its folder if it reached NeMo. The pickles here would create
a marker file when unpickled; every test asserts the refusal (exit 2, file and reason named) and that
the marker was never created.
"""
import io
import os
import tarfile

import pytest

from nemo_ft.nemo_archive import NemoArchive, UnsafeCheckpoint, check_nemo
from nemo_ft.paths import DATA_DIR
from tests.conftest import run_stage

BASE = DATA_DIR / "tiny" / "tiny_llama.nemo"


class _RunsCommand:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickled_weights(marker) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight": torch.zeros(2, 2),
                "extra": _RunsCommand(marker)}, buf)
    return buf.getvalue()


def _rewrite(src, dst, replace=None, add=(), drop=()):
    """Copy a .nemo tar, replacing members' bytes ({name: bytes}), adding (TarInfo, bytes) pairs, dropping names."""
    replace = replace or {}
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if name in drop:
                continue
            data = replace.get(name, tin.extractfile(m).read() if m.isfile() else None)
            if data is not None:
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
        for info, data in add:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _adapter_config() -> bytes:
    with NemoArchive(BASE) as a:
        return a.read("model_config.yaml")


def _adapter(path, weights: bytes):
    with tarfile.open(path, "w") as t:
        for name, data in (("model_config.yaml", _adapter_config()), ("model_weights.ckpt", weights)):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the crafted pickle ran"


def _refused(proc, path, words):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "nothing was started" in proc.stderr
    assert str(path) in proc.stderr and words in proc.stderr, proc.stderr


# (stage, key holding a .nemo, extra overrides): every stage that reads a .nemo
READERS = [("sft", "model.peft.restore_from_path", ("run.validate_only=true",)),
           ("sft", "model.restore_from_path", ())]


@pytest.mark.parametrize("stage,key,extra", READERS, ids=[f"{s}:{k}" for s, k, _ in READERS])
def test_a_pickle_that_runs_a_command_is_refused_by_every_reader(stage, key, extra, tmp_path, marker):
    if key == "model.restore_from_path":  # a base: its distributed checkpoint's common.pt carries the pickle
        crafted = _rewrite(BASE, tmp_path / "crafted.nemo", {"model_weights/common.pt": _pickled_weights(marker)})
    else:
        crafted = _adapter(tmp_path / "crafted.nemo", _pickled_weights(marker))
    proc = run_stage(stage, f"run.dir={tmp_path / 'run'}", f"{key}={crafted}", *extra, check=False, timeout=120)
    _refused(proc, crafted, "is not plain")
    assert f"{key}: " in proc.stderr and "run.trust_checkpoint=true" in proc.stderr
    assert not (tmp_path / "run" / "nemo").exists()


def test_a_member_outside_the_archive_is_refused(tmp_path, marker):
    info = tarfile.TarInfo("../../escaped.txt")
    info.size = 4
    crafted = _rewrite(BASE, tmp_path / "crafted.nemo", add=[(info, b"evil")])
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", f"model.restore_from_path={crafted}", check=False,
                     timeout=120)
    _refused(proc, crafted, "would be written outside")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_a_link_member_is_refused(tmp_path):
    info = tarfile.TarInfo("model_weights/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    crafted = _rewrite(BASE, tmp_path / "crafted.nemo", add=[(info, None)])
    with pytest.raises(UnsafeCheckpoint, match="is a link"):
        check_nemo(crafted, key="model.restore_from_path")


def test_an_adapter_without_weights_is_refused(tmp_path):
    crafted = tmp_path / "noweights.nemo"
    with tarfile.open(crafted, "w") as t:
        data = _adapter_config()
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", "run.validate_only=true",
                     f"model.peft.restore_from_path={crafted}", check=False, timeout=120)
    _refused(proc, crafted, "holds no weights")


def test_dcp_metadata_naming_a_foreign_callable_is_refused(tmp_path, marker):
    import pickle

    crafted = _rewrite(BASE, tmp_path / "crafted.nemo",
                       {"model_weights/.metadata": pickle.dumps(_RunsCommand(marker))})
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata references posix\.system"):
        check_nemo(crafted, key="model.restore_from_path")


def test_a_config_naming_a_foreign_target_is_refused(tmp_path):
    import yaml

    conf = yaml.safe_load(_adapter_config())
    conf["target"] = "os.system"
    crafted = _rewrite(BASE, tmp_path / "crafted.nemo", {"model_config.yaml": yaml.safe_dump(conf).encode()})
    with pytest.raises(UnsafeCheckpoint, match="not a NeMo model class"):
        check_nemo(crafted, key="model.restore_from_path")
    conf["target"] = yaml.safe_load(_adapter_config())["target"]
    conf["optim"] = {"_target_": "subprocess.call"}
    crafted = _rewrite(BASE, tmp_path / "crafted2.nemo", {"model_config.yaml": yaml.safe_dump(conf).encode()})
    with pytest.raises(UnsafeCheckpoint, match="_target_='subprocess.call' at optim"):
        check_nemo(crafted, key="model.restore_from_path")


def test_truncated_archive_is_an_input_error(tmp_path):
    data = BASE.read_bytes()
    crafted = tmp_path / "truncated.nemo"
    crafted.write_bytes(data[: len(data) // 2])
    proc = run_stage("sft", f"run.dir={tmp_path / 'run'}", f"model.restore_from_path={crafted}", check=False,
                     timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(crafted) in proc.stderr and ("truncated" in proc.stderr or "cannot be read" in proc.stderr), proc.stderr


def test_the_shipped_base_and_a_trusted_file_pass(tmp_path, marker):
    layout = check_nemo(BASE, key="model.restore_from_path")
    assert layout.kind == "distributed"
    # trust skips the pickle checks (the stage logs it); the archive's structure is still checked
    benign = _adapter(tmp_path / "benign.nemo", _benign_non_tensor_pickle())
    with pytest.raises(UnsafeCheckpoint):
        check_nemo(benign, key="k")
    assert check_nemo(benign, key="k", trust=True).kind == "single"


def _benign_non_tensor_pickle() -> bytes:
    import datetime

    import torch

    buf = io.BytesIO()
    torch.save({"when": datetime.date(2026, 1, 1)}, buf)  # not a tensor, runs nothing
    return buf.getvalue()
