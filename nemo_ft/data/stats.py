"""Token-length statistics (stats.json) and the length histogram with the cut-off (lengths.png)."""
import os
from typing import Dict

import numpy as np

from nemo_ft.artifacts import temp_path


def length_stats(lengths: np.ndarray, seq_length: int) -> Dict:
    if len(lengths) == 0:
        return {"count": 0}
    q = np.percentile(lengths, [50, 90, 95, 99])
    return {"count": int(len(lengths)), "tokens": int(lengths.sum()), "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 2), "p50": float(q[0]), "p90": float(q[1]),
            "p95": float(q[2]), "p99": float(q[3]), "max": int(lengths.max()),
            "at_cutoff": int((lengths == seq_length).sum())}


def plot_lengths(path: str, lengths_by_split: Dict[str, np.ndarray], seq_length: int, truncated: int) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max([seq_length] + [int(v.max()) for v in lengths_by_split.values() if len(v)])
    bins = np.linspace(0, top + 1, 60)
    for name, v in lengths_by_split.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{name} ({len(v)})")
    ax.axvline(seq_length, color="red", linestyle="--", label=f"seq_length={seq_length} ({truncated} truncated)")
    ax.set_xlabel("tokens per example (template + EOS)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    tmp = temp_path(path) + ".png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
