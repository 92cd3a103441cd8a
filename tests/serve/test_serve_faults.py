"""`nemo-ft serve` refuses what a server would load wrongly, before any server starts: adapters that do
not fit the served base (shape, rank, base hash), files changed after export, bad names and ports. Each
problem is one line naming the file (or key) and the reason, all at once, exit 2, and nothing started.

These need no serve env: the checks run in the main venv before vLLM or Triton would be launched.
"""
import io
import json
import shutil
import sys
import tarfile
import time

import pytest

from nemo_ft import artifacts
from tests.conftest import REPO, _free_port, stage_env
from tests.serve.conftest import serve_args


def copy_export(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("nemo"))
    return dst


def rehash(export, *rel_paths, base_sha256=None):
    """Rewrite the export's manifest for files changed on purpose: a self-consistent but wrong export."""
    path = export / "manifest.json"
    m = json.loads(path.read_text())
    for r in m["outputs"]:
        if r["path"] in rel_paths:
            r.update(artifacts.file_record(export / r["path"], r["role"], relative_to=export))
    if base_sha256:
        next(r for r in m["inputs"] if r["role"] == "base")["sha256"] = base_sha256
    path.write_text(json.dumps(m))


def refused(tmp_path, engine, from_run, *extra):
    import subprocess

    run_dir = tmp_path / "serve_run"
    t = time.monotonic()
    proc = subprocess.run(serve_args(engine, from_run, _free_port(), run_dir, f"vllm.python={sys.executable}", *extra),
                          cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "nothing was started" in proc.stderr, proc.stderr
    assert not (run_dir / "vllm.log").exists() and not (run_dir / "serving.json").exists()
    assert time.monotonic() - t < 60
    return proc.stderr


def _swap_tensor(safetensors_path, key, rows):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(safetensors_path))
    tensors[key] = tensors[key][:rows].contiguous()
    save_file(tensors, str(safetensors_path), metadata={"format": "pt"})


def _retar_config(nemo_path, **changes):
    import yaml

    with tarfile.open(nemo_path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m, data in members:
            if m.name.lstrip("./") == "model_config.yaml":
                conf = yaml.safe_load(data)
                conf.update(changes)
                data = yaml.safe_dump(conf).encode()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    nemo_path.write_bytes(out.getvalue())


Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_adapters_that_do_not_fit_the_base_are_refused_all_at_once(lookup_export, qa_export, tmp_path):
    shape = copy_export(qa_export, tmp_path / "shape")
    _swap_tensor(shape / "hf_peft" / "adapter_model.safetensors", Q_B, 96)
    rehash(shape, "hf_peft/adapter_model.safetensors")
    rank = copy_export(qa_export, tmp_path / "rank")
    cfg = json.loads((rank / "hf_peft" / "adapter_config.json").read_text())
    (rank / "hf_peft" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    rehash(rank, "hf_peft/adapter_config.json")
    other_base = copy_export(qa_export, tmp_path / "other_base")
    rehash(other_base, base_sha256="0" * 64)
    tampered = copy_export(qa_export, tmp_path / "tampered")
    with open(tampered / "hf_peft" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    err = refused(tmp_path, "vllm", lookup_export, f"adapters=['s={shape}','r={rank}','b={other_base}','t={tampered}',"
                                                   f"'lookup={lookup_export}','lookup={qa_export}','bad/name={qa_export}']")
    lines = err.strip().splitlines()
    assert lines[0].startswith("nemo-ft serve: 6 ") and len(lines) == 7, err  # one line per problem
    assert f"{shape / 'hf_peft' / 'adapter_model.safetensors'}: adapter 's': {Q_B} has shape [96, 16], the served " \
           f"base needs [128, 16]" in err
    assert f"{rank / 'hf_peft' / 'adapter_config.json'}: adapters[1]: r=8 but adapter_tp1.nemo has rank 16" in err
    assert f"{other_base / 'manifest.json'}: adapters[2]: adapter 'b' was trained on another base" in err
    assert "sha256 000000000000" in err
    assert f"{tampered / 'hf_peft' / 'adapter_model.safetensors'} changed after this export run wrote it" in err
    assert "adapters[5]: adapter name 'lookup' is given twice" in err
    assert "adapters[6]: adapter name 'bad/name'" in err


def test_triton_refuses_an_adapter_built_for_another_architecture(lookup_export, qa_export, tmp_path):
    wide = copy_export(qa_export, tmp_path / "wide")
    _retar_config(wide / "adapter_tp1.nemo", hidden_size=256)
    rehash(wide, "adapter_tp1.nemo")
    err = refused(tmp_path, "triton", lookup_export, f"adapters=['w={wide}']")
    assert f"{wide / 'adapter_tp1.nemo'}: adapters[0]: adapter 'w' does not fit the served base: its hidden_size is " \
           f"256, the base's 128" in err


def test_bad_config_is_refused_before_anything_starts(lookup_export, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        run_dir = tmp_path / "r"
        import subprocess
        proc = subprocess.run([sys.executable, "-m", "nemo_ft.stages.serve", f"from_run={lookup_export}",
                               f"port={port}", f"run.dir={run_dir}", "vllm.python=/nonexistent/python", "base_name=a b"],
                              cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"port: 127.0.0.1:{port} is in use" in proc.stderr
    assert "vllm.python: /nonexistent/python does not exist: build vLLM's venv with `make serve-env`" in proc.stderr
    assert "base_name: 'a b'" in proc.stderr
    err = refused(tmp_path, "vllm", tmp_path)  # not an export
    assert "no manifest.json here" in err
    err = refused(tmp_path, "bogus", lookup_export)
    assert "engine: 'bogus': expected one of vllm, triton" in err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_it_starts_stops_cleanly(lookup_export, tmp_path, sig):
    """Stopped 4 s in, before the Triton engine is up (checks, NeMo imports or restore): exit 0, no process left."""
    import importlib.util
    import signal
    import subprocess

    from tests.serve.conftest import alive, tree
    assert importlib.util.find_spec("pytriton"), "PyTriton is missing from .venv: `make install` installs it"
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(serve_args("triton", lookup_export, _free_port(), run_dir), cwd=REPO, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(4)
    seen = tree(proc.pid)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"stopped ({sig})" in out, out[-3000:]
    assert not alive(seen)
