"""Deterministic train/validation/test assignment from the example's own content.

The split of a row depends only on its normalized key and the seed, never on its position or
on the other rows, so appending data never moves an existing example to another split.
"""
import hashlib
from typing import Dict

from nemo_ft.errors import ConfigError

SPLITS = ("train", "validation", "test")


def check_ratios(ratios: Dict[str, float]) -> Dict[str, float]:
    for name, r in ratios.items():
        if name not in SPLITS:
            raise ConfigError(f"split.{name}", f"unknown split; expected one of {SPLITS}")
        if not (0 <= float(r) <= 1):
            raise ConfigError(f"split.{name}", f"ratio must be in [0, 1], got {r}")
    total = sum(float(r) for r in ratios.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError("split", f"train + validation + test must sum to 1, got {total:g}")
    if float(ratios.get("train", 0)) <= 0:
        raise ConfigError("split.train", "the train ratio must be > 0")
    return {s: float(ratios.get(s, 0.0)) for s in SPLITS}


def assign_split(key: bytes, ratios: Dict[str, float], seed: int) -> str:
    h = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    acc = 0.0
    for name in SPLITS:
        acc += ratios[name]
        if u < acc:
            return name
    return "train"
