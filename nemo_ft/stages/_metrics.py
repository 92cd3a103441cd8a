"""metrics.jsonl (one JSON line per train step and per validation) and the loss plot drawn from it."""
from __future__ import annotations

import json
from pathlib import Path

from nemo_ft.artifacts import atomic_write


def metric_lines(path: Path) -> list[str]:
    """The complete lines of a metrics.jsonl. It is appended to a line per step, so a process killed mid-write
    (kill -9, OOM, node loss) can leave a torn last line: that one is dropped, any other bad line raises."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    return lines


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of a metrics.jsonl."""
    rows = [json.loads(line) for line in metric_lines(path)]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "validation"]


def plot_losses(metrics: Path, out: Path, title: str) -> Path:
    """Train (per step) and validation loss curves, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r.get("reduced_train_loss") for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
