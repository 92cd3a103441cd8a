"""Atomic artifact writes and the hashes/versions that go into manifest.json.

Every artifact is written to a temp file in its final directory and then `os.replace`d, so a
crash never leaves a half-written train.jsonl that a later stage would happily read.
"""
import contextlib
import hashlib
import json
import os
import platform
import sys
from importlib import metadata


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def temp_path(final: str) -> str:
    d, name = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(final: str, mode: str = "w"):
    """Yield an open file; on success it replaces `final`, on error it is removed."""
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


def write_json(final: str, obj) -> None:
    with atomic_write(final) as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": sys.platform}
    for dist in ("nemo-ft", "numpy", "sentencepiece", "datasketch", "hydra-core", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
