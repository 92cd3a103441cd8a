"""Artifacts on disk: atomic writes, sha256, and THE manifest every stage writes and reads.

Stages meet only through files. A run directory is complete when it holds `manifest.json`, written
last; a failed stage writes none. One schema for every stage (the README documents it):

    {"schema": "nemo-ft/manifest/1", "stage": "sft", "created_unix": 1764000000,
     "inputs":  [{"role": "base", "path": "/abs/base.nemo", "sha256": "...", "bytes": 123}, ...],
     "outputs": [{"role": "adapter", "path": "adapter.nemo", "sha256": "...", "bytes": 456}, ...],
     "config": {... the resolved stage config ...},
     "versions": {"nemo-ft": "...", "nemo_toolkit": "...", ...},
     "summary": {... what the stage measured ...}}

Input paths are absolute; output paths are relative to the manifest's directory when they lie inside
it (a run directory can be moved). A record may carry more keys (prep: per-file counts). A stage
that consumes another's output reads the manifest with `read_manifest`, finds files by role, and
`verify`s their sha256 before trusting what the manifest says about them.

Standard library only: the pure core (data prep) writes its manifest through here too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Union

from nemo_ft.errors import InputError

SCHEMA = "nemo-ft/manifest/1"
MANIFEST = "manifest.json"
PathLike = Union[str, os.PathLike]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def temp_path(final: PathLike) -> str:
    d, name = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(final: PathLike, mode: str = "w"):
    """Yield an open file; on success it replaces `final`, on error it is removed.

    A reader sees the old file or the new one, never a half-written one."""
    tmp = temp_path(final)
    f = open(tmp, mode, encoding=None if "b" in mode else "utf-8")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(final: PathLike, obj) -> None:
    with atomic_write(final) as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")


def versions(dists: Iterable[str] = ()) -> dict:
    """Python, platform and the installed versions of nemo-ft and `dists` (those that are installed)."""
    out = {"python": platform.python_version(), "platform": sys.platform}
    for dist in ("nemo-ft", *dists):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_record(path: PathLike, role: str, relative_to: Optional[PathLike] = None, **extra) -> dict:
    """{role, path, sha256, bytes, **extra} of an existing file. With `relative_to`, a path inside
    that directory is stored relative to it."""
    p = Path(path).resolve()
    shown = str(p)
    if relative_to is not None:
        with contextlib.suppress(ValueError):
            shown = str(p.relative_to(Path(relative_to).resolve()))
    return {"role": role, "path": shown, "sha256": sha256_file(p), "bytes": p.stat().st_size, **extra}


def _plain(obj):
    """Through JSON once, so config leftovers (DictConfig, Path) serialize as text."""
    return json.loads(json.dumps(obj, default=str))


def write_manifest(run_dir: PathLike, stage: str, *, inputs: list[dict], outputs: list[dict],
                   config: Optional[dict], summary: dict, dists: Iterable[str] = ()) -> Path:
    """Write `run_dir/manifest.json` atomically. `inputs`/`outputs` are file_record()s (outputs with
    relative_to=run_dir). Call it last: its presence says the run directory is complete."""
    manifest = {
        "schema": SCHEMA,
        "stage": stage,
        "created_unix": int(time.time()),
        "inputs": inputs,
        "outputs": outputs,
        "config": config,
        "versions": versions(dists),
        "summary": summary,
    }
    path = Path(run_dir) / MANIFEST
    write_json(path, _plain(manifest))
    return path


@dataclass
class Manifest:
    """A manifest read back: find files by role, verify their hashes."""

    path: Path
    stage: str
    inputs: list[dict]
    outputs: list[dict]
    config: dict
    summary: dict
    versions: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.path.parent

    def _resolve(self, record: dict) -> Path:
        p = Path(record["path"])
        return p if p.is_absolute() else self.dir / p

    def records(self, role: str, which: str = "outputs") -> list[dict]:
        return [r for r in getattr(self, which) if r.get("role") == role]

    def output(self, role: str, verify: bool = True) -> Path:
        """The one output of this role, as an absolute path (its sha256 checked unless verify=False)."""
        found = self.records(role)
        if len(found) != 1:
            raise InputError(f"has {len(found)} output(s) of role {role!r}; expected one "
                             f"(roles: {sorted({r.get('role') for r in self.outputs})})", path=str(self.path))
        if verify:
            self.verify(found[0])
        return self._resolve(found[0])

    def input(self, role: str) -> Optional[dict]:
        found = self.records(role, "inputs")
        return found[0] if found else None

    def record_for(self, path: PathLike) -> Optional[dict]:
        """The output record of a file this run wrote, if it is one of them."""
        target = Path(path).resolve()
        for r in self.outputs:
            if self._resolve(r).resolve() == target:
                return r
        return None

    def verify(self, record: dict) -> None:
        """The file on disk is the one this manifest describes (same sha256), else InputError."""
        p = self._resolve(record)
        if not p.exists():
            raise InputError(f"lists {record['path']} ({record.get('role')}), which is missing", path=str(self.path))
        if p.stat().st_size != record.get("bytes", p.stat().st_size) or sha256_file(p) != record["sha256"]:
            raise InputError(f"{p} changed after this {self.stage} run wrote it (sha256 differs from the "
                             f"manifest's {record['sha256'][:12]}); rerun the {self.stage} stage", path=str(self.path))


def read_manifest(where: PathLike, stage: Union[str, tuple, None] = None, key: Optional[str] = None) -> Manifest:
    """Read a run directory's (or a file's) manifest.json; InputError naming the file on anything wrong.

    `stage` restricts which stage may have written it; `key` is the config key that pointed here."""
    path = Path(where)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise InputError(f"no {MANIFEST} here: not a finished nemo-ft run (a failed or running stage writes none)",
                         path=str(path.parent if path.name == MANIFEST else path), key=key)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot be read as JSON: {err}", path=str(path), key=key) from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        got = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"schema is {got!r}, not {SCHEMA!r}: written by another tool or an older nemo-ft; "
                         "rerun the stage that wrote it", path=str(path), key=key)
    missing = [k for k in ("stage", "inputs", "outputs", "summary") if k not in raw]
    if missing:
        raise InputError(f"lacks {missing}", path=str(path), key=key)
    allowed = (stage,) if isinstance(stage, str) else stage
    if allowed and raw["stage"] not in allowed:
        raise InputError(f"was written by the {raw['stage']} stage; expected {' or '.join(allowed)}",
                         path=str(path), key=key)
    return Manifest(path=path.resolve(), stage=raw["stage"], inputs=list(raw["inputs"]), outputs=list(raw["outputs"]),
                    config=raw.get("config") or {}, summary=raw["summary"], versions=raw.get("versions") or {})


def manifest_next_to(file: PathLike) -> Optional[Manifest]:
    """The manifest of the run that wrote `file` (the manifest.json in its directory listing it), or
    None when the file was not written by a nemo-ft stage. A manifest that is there but unreadable,
    or that does not list the file, is an InputError: the data's provenance would be unknown."""
    path = Path(file).resolve().parent / MANIFEST
    if not path.exists():
        return None
    m = read_manifest(path)
    if m.record_for(file) is None:
        raise InputError(f"does not list {Path(file).name} among its outputs: the file was not written by that "
                         f"{m.stage} run", path=str(path))
    return m
