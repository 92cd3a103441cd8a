"""A `.nemo` file read without NeMo: its config, tokenizer hash, weight layout, adapter tensors — and
whether it is safe to hand to NeMo at all.

A .nemo is a tar (maybe gzipped) of `model_config.yaml`, the tokenizer files and the weights, in one
of these layouts:
- distributed: `model_weights/` (megatron-core dist checkpoint: `.metadata`, `__R_S.distcp`,
  `common.pt`, `metadata.json`); NeMo reshards it on load, any TP/PP;
- single:  `model_weights.ckpt` at the root (TP=1, PP=1; what PEFT saves at TP=1);
- mp_rank: `mp_rank_XX/model_weights.ckpt` (PP=1, TP>1);
- tp_pp:   `tp_rank_XX_pp_rank_XXX/model_weights.ckpt` (whenever PP>1).
The legacy per-rank layouts restore only at the TP/PP they were saved with.

Why `check()` exists: NeMo unpacks the tar with `extractall` and restores the weights with
`torch.load(weights_only=False)` (save_restore_connector.py, nlp_adapter_mixins.py, megatron's
common.pt and DCP `.metadata`/bytes items), so a hostile archive — adapters are shared between teams
and downloaded from hubs — runs whatever its pickles say, or writes outside NeMo's temp dir. Every
stage checks each .nemo here before NeMo touches it: safe member names (no absolute path, no `..`, no
links or devices), the expected members, every pickle readable as plain tensors and containers
(`weights_only=True`, or an allow-list for DCP's metadata), a `target`/`_target_` inside NeMo's own
namespaces. `trust=True` (run.trust_checkpoint) skips the pickle checks for a file one trusts.

torch is imported only by the methods that read tensors; the rest is tarfile + yaml.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import yaml

from nemo_ft.errors import InputError

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
DIST_DIR = "model_weights"
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")
# Where NeMo itself allows `_target_` (nemo/core/classes/common.py ALLOWED_TARGET_PREFIXES) and where a
# model class named by `target` may live.
TARGET_PREFIXES = ("nemo.collections.", "nemo.core.", "nemo.utils.", "nemo.lightning.", "nemo_aligner.",
                   "torch.nn.", "torch.optim.", "torch.utils.data.", "lightning.pytorch.", "omegaconf.", "megatron.")
MODEL_TARGET_PREFIXES = ("nemo.collections.", "nemo_aligner.")


class UnsafeCheckpoint(InputError):
    """A .nemo that NeMo must not open: it would run code or write outside its directory."""


@dataclass(frozen=True)
class Layout:
    kind: str  # distributed | single | mp_rank | tp_pp
    tp: int
    pp: int
    weight_files: tuple  # member names of the per-rank weight files (empty for distributed)

    def describe(self) -> str:
        if self.kind == "distributed":
            return "a distributed checkpoint (model_weights/), loadable at any TP/PP"
        return f"per-rank weights saved at TP={self.tp} PP={self.pp} ({len(self.weight_files)} file(s))"


def _norm(name: str) -> str:
    """Member name without a leading './' (NeMo writes './model_config.yaml')."""
    name = name[2:] if name.startswith("./") else name
    return name.rstrip("/")


def rank_of(member: str) -> tuple[int, int]:
    """(tp_rank, pp_rank) of a per-rank weight file's member name."""
    parts = PurePosixPath(member).parts
    if len(parts) == 1:
        return 0, 0
    m = _RANK_DIR.match(parts[0])
    if not m:
        raise InputError(f"weight file {member!r} is not in a mp_rank_XX or tp_rank_XX_pp_rank_XXX folder")
    if m.group(1) is not None:
        return int(m.group(1)), 0
    return int(m.group(2)), int(m.group(3))


class NemoArchive:
    """A .nemo tar (or an unpacked .nemo directory). Opening reads only the member list."""

    def __init__(self, path, key: Optional[str] = None):
        self.path, self.key = Path(path), key
        if not self.path.exists():
            raise InputError("file not found", path=str(self.path), key=key)
        if self.path.is_dir():
            self._members = {str(p.relative_to(self.path)): p for p in self.path.rglob("*")}
            self._tar = None
            return
        try:
            tar = tarfile.open(self.path, "r:*")
            infos = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise InputError(f"cannot be read as a .nemo (a tar archive): {err or type(err).__name__}",
                             path=str(self.path), key=key) from None
        self._tar = tar
        self._members = {}
        for info in infos:
            name = _norm(info.name)
            if name in ("", "."):
                continue
            self._members[name] = info

    def close(self):
        if self._tar is not None:
            self._tar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _error(self, message: str, cls=InputError):
        return cls(message, path=str(self.path), key=self.key)

    # ---------------------------------------------------------------- members

    def names(self) -> list[str]:
        return sorted(self._members)

    def files(self) -> list[str]:
        if self._tar is None:
            return sorted(n for n, p in self._members.items() if p.is_file())
        return sorted(n for n, i in self._members.items() if i.isfile())

    def read(self, name: str) -> bytes:
        if name not in self._members:
            raise self._error(f"has no member {name!r}")
        if self._tar is None:
            return self._members[name].read_bytes()
        try:
            f = self._tar.extractfile(self._members[name])
            data = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError) as err:
            raise self._error(f"member {name} cannot be read (truncated or corrupt archive?): {err}") from None
        if len(data) != self._members[name].size:
            raise self._error(f"member {name} is truncated ({len(data)} of {self._members[name].size} bytes)")
        return data

    # ---------------------------------------------------------------- contents

    def config(self) -> dict:
        if CONFIG not in self._members:
            raise self._error(f"is not a .nemo: it has no {CONFIG}")
        try:
            conf = yaml.safe_load(self.read(CONFIG))
        except yaml.YAMLError as err:
            raise self._error(f"{CONFIG} is not valid YAML: {err}") from None
        if not isinstance(conf, dict):
            raise self._error(f"{CONFIG} is not a mapping")
        return conf

    def tokenizer_file(self) -> Optional[str]:
        ref = str((self.config().get("tokenizer") or {}).get("model") or "")
        name = ref.split(":", 1)[-1].rsplit("/", 1)[-1]
        return name or None

    def tokenizer_sha256(self) -> Optional[str]:
        """sha256 of the tokenizer model file packed inside (None if it carries none)."""
        name = self.tokenizer_file()
        if not name:
            return None
        found = [n for n in self.files() if PurePosixPath(n).name == name]
        return hashlib.sha256(self.read(found[0])).hexdigest() if found else None

    def layout(self) -> Layout:
        files = self.files()
        per_rank = tuple(sorted(n for n in files if PurePosixPath(n).name == WEIGHTS))
        if any(n.startswith(DIST_DIR + "/") for n in files) and not per_rank:
            conf = self.config()
            return Layout("distributed", int(conf.get("tensor_model_parallel_size") or 1),
                          int(conf.get("pipeline_model_parallel_size") or 1), ())
        if not per_rank:
            raise self._error(f"holds no weights: neither {WEIGHTS} (per rank) nor a {DIST_DIR}/ checkpoint")
        if per_rank == (WEIGHTS,):
            return Layout("single", 1, 1, per_rank)
        if WEIGHTS in per_rank:
            raise self._error(f"mixes a root {WEIGHTS} with per-rank folders")
        ranks = [rank_of(n) for n in per_rank]
        conf = self.config() if CONFIG in self._members else {}
        # The config says how many ranks saved it; the folders may be fewer (a lost shard).
        tp = max(1 + max(t for t, _ in ranks), int(conf.get("tensor_model_parallel_size") or 1))
        pp = max(1 + max(p for _, p in ranks), int(conf.get("pipeline_model_parallel_size") or 1))
        kind = "tp_pp" if PurePosixPath(per_rank[0]).parts[0].startswith("tp_rank_") else "mp_rank"
        missing = sorted(set((t, p) for t in range(tp) for p in range(pp)) - set(ranks))
        if missing:
            names = [f"mp_rank_{t:02d}" if kind == "mp_rank" else f"tp_rank_{t:02d}_pp_rank_{p:03d}" for t, p in missing]
            raise self._error(f"is missing the weights of rank(s) {names} of its TP={tp} PP={pp} layout "
                              f"(has {list(per_rank)})")
        return Layout(kind, tp, pp, per_rank)

    def tensors(self) -> dict[str, dict]:
        """{weight file member: state dict} of every per-rank weights file, loaded weights_only."""
        return {name: self._load_weights_only(name) for name in self.layout().weight_files}

    def _load_weights_only(self, name: str):
        import torch

        try:
            return torch.load(io.BytesIO(self.read(name)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise self._error(f"{name} is not plain tensors ({_why(err)}); NeMo would run code from it. If you "
                              "trust this file, set run.trust_checkpoint=true", UnsafeCheckpoint) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise self._error(f"{name} cannot be read as torch weights (truncated or corrupt?): {err}") from None

    # ---------------------------------------------------------------- safety

    def check(self, trust: bool = False, need_tokenizer: bool = False) -> Layout:
        """Refuse (UnsafeCheckpoint / InputError) what NeMo must not open; returns the layout."""
        self._check_members()
        conf = self.config()
        self._check_targets(conf)
        layout = self.layout()
        name = self.tokenizer_file()
        if name and need_tokenizer and not any(PurePosixPath(n).name == name for n in self.files()):
            raise self._error(f"its config names the tokenizer {name}, which is not inside")
        if not trust:
            for member in self.files():
                if member.endswith((".ckpt", ".pt", ".pth", ".bin")) and not member.startswith(DIST_DIR + "/.metadata"):
                    self._load_weights_only(member)
            if layout.kind == "distributed":
                self._check_dist_checkpoint()
        return layout

    def _check_members(self) -> None:
        for name, info in self._members.items():
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts or name.startswith("/"):
                raise self._error(f"member {info.name if self._tar else name!r} would be written outside the "
                                  "folder NeMo unpacks into (absolute path or '..')", UnsafeCheckpoint)
            if self._tar is not None and not (info.isfile() or info.isdir()):
                kind = "link" if info.issym() or info.islnk() else "special file"
                raise self._error(f"member {info.name!r} is a {kind}; a .nemo holds plain files only",
                                  UnsafeCheckpoint)
            if self._tar is None and info.is_symlink():
                raise self._error(f"member {name!r} is a link; a .nemo holds plain files only", UnsafeCheckpoint)

    def _check_targets(self, conf: dict) -> None:
        target = conf.get("target")
        if target is not None and not str(target).startswith(MODEL_TARGET_PREFIXES):
            raise self._error(f"{CONFIG} names target={target!r}, which is not a NeMo model class; NeMo would "
                              "import and build it", UnsafeCheckpoint)

        def walk(node, where):
            if isinstance(node, dict):
                t = node.get("_target_")
                if t is not None and not str(t).startswith(TARGET_PREFIXES):
                    raise self._error(f"{CONFIG} has _target_={t!r} at {where or 'the top'}: outside the "
                                      "namespaces NeMo instantiates from", UnsafeCheckpoint)
                for k, v in node.items():
                    walk(v, f"{where}.{k}" if where else str(k))
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")
        walk(conf, "")

    def _check_dist_checkpoint(self) -> None:
        """DCP `.metadata` is read with plain pickle.load and its bytes items with
        torch.load(weights_only=False): allow only DCP's own metadata classes, and bytes items that
        load as plain data. Tensor items are read by DCP with weights_only=True already."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        meta_name = f"{DIST_DIR}/.metadata"
        if meta_name not in self._members:
            raise self._error(f"{DIST_DIR}/ has no .metadata: not a complete distributed checkpoint")
        meta = _DcpMetadataUnpickler(io.BytesIO(self.read(meta_name)), self).load()
        slices: dict[str, list] = {}
        for index, info in getattr(meta, "storage_data", {}).items():
            if isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                slices.setdefault(info.relative_path, []).append((index.fqn, info.offset, info.length))
        for rel, items in slices.items():
            data = self.read(f"{DIST_DIR}/{rel}")
            for fqn, offset, length in items:
                _weights_only(io.BytesIO(data[offset:offset + length]), self, f"{DIST_DIR}/{rel} item {fqn}")


def _weights_only(stream, archive: NemoArchive, what: str):
    import torch

    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise archive._error(f"{what} is not plain data ({_why(err)}); NeMo would run code from it. If you trust "
                             "this file, set run.trust_checkpoint=true", UnsafeCheckpoint) from None


def _why(err: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused (not its boilerplate)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
    return "torch.load(weights_only=True): " + (named[0] if named else lines[0] if lines else type(err).__name__)


class _DcpMetadataUnpickler(pickle.Unpickler):
    """pickle.load of DCP's `.metadata`, resolving only the classes DCP itself writes there."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                       "torch.distributed.checkpoint.filesystem")
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")}

    def __init__(self, stream, archive: NemoArchive):
        super().__init__(stream)
        self.archive = archive

    def find_class(self, module, name):
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"):
            return _Inert  # a plan we never use; no need to import megatron to check a file
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED:
            obj = getattr(__import__(module, fromlist=[name]), name)
            if isinstance(obj, type) or (module, name) in self.ALLOWED:
                return obj
        raise self.archive._error(f"{DIST_DIR}/.metadata references {module}.{name}, which a distributed "
                                  "checkpoint's metadata never holds; NeMo would import and call it. If you "
                                  "trust this file, set run.trust_checkpoint=true", UnsafeCheckpoint)


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def check_nemo(path, key: str, trust: bool = False, need_tokenizer: bool = False) -> Layout:
    """Open and check a .nemo; InputError/UnsafeCheckpoint naming `key` and the file on any problem."""
    with NemoArchive(path, key=key) as archive:
        return archive.check(trust=trust, need_tokenizer=need_tokenizer)


def read_config(path, key: Optional[str] = None) -> dict:
    with NemoArchive(path, key=key) as archive:
        return archive.config()


def adapter_tensors(path) -> dict[str, dict]:
    """{weight file member: {key: tensor}} of an adapter .nemo (loaded weights_only)."""
    with NemoArchive(path) as archive:
        return archive.tensors()


def write_adapter(path, config: dict, state: dict) -> Path:
    """A PEFT .nemo as NeMo's save_to writes one at TP=1 PP=1: ./model_config.yaml + ./model_weights.ckpt
    (torch.save of {key: tensor}). Written to a temp name and renamed."""
    import os

    import torch

    from nemo_ft.artifacts import temp_path

    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    members = ((CONFIG, yaml.safe_dump(config, sort_keys=False).encode()), (WEIGHTS, buf.getvalue()))
    tmp = temp_path(path)
    try:
        with tarfile.open(tmp, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(f"./{name}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
