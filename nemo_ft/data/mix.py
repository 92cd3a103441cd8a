"""Mixing weights: how many times each training row of each source is written.

A weight is the target share of the *training* examples. The total is chosen so that no
source is down-sampled (the source that is largest relative to its weight keeps every row),
unless `mix.total` fixes it. Each row is written floor(k/n) times plus once more for a seeded
random subset, so the achieved share is exact up to rounding and reproducible.
"""
from typing import Dict, List, Optional

import numpy as np

from nemo_ft.errors import ConfigError


def plan_counts(available: List[int], weights: List[float], total: Optional[int]) -> List[int]:
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("inputs[].weight", f"weights must be >= 0 with a positive sum, got {weights}")
    shares = [w / sum(weights) for w in weights]
    for n, s, i in zip(available, shares, range(len(shares))):
        if s > 0 and n == 0:
            raise ConfigError(f"inputs[{i}].weight", "weight > 0 but the input has no training rows left after checks")
    if total is None:
        total = max(n / s for n, s in zip(available, shares) if s > 0)
    return [int(round(s * total)) for s in shares]


def multiplicities(n: int, k: int, seed: int, source_index: int) -> np.ndarray:
    """How many copies of each of the n rows to write so that k rows are written in all."""
    m = np.full(n, k // n if n else 0, dtype=np.int64)
    extra = k - int(m.sum())
    if extra > 0:
        rng = np.random.default_rng([seed, source_index])
        m[rng.choice(n, size=extra, replace=False)] += 1
    return m


def report(names: List[str], available: List[int], written: List[int], weights: List[float]) -> Dict:
    total = sum(written) or 1
    wsum = sum(weights) or 1
    return {name: {"available": a, "written": w, "target_share": round(wt / wsum, 4),
                   "achieved_share": round(w / total, 4), "repeat_factor": round(w / a, 3) if a else None}
            for name, a, w, wt in zip(names, available, written, weights)}
