"""report.md, report.json and the PNGs a person reads the verdict from in ten seconds.

metrics.png: bars of every metric, base vs each adapter, the verdict in the title; loss_curves.png:
the upstream run's training and validation loss (read from its TensorBoard events by the stage).
"""
from __future__ import annotations

import json
from pathlib import Path

from nemo_ft.artifacts import atomic_write, write_json

RATES = (("exact_match", "exact match"), ("token_f1", "token F1"), ("contains", "contains"), ("eos_rate", "EOS rate"))
LOSSES = (("loss", "held-out loss"), ("general_loss", "general loss"))


def verdict(gates_by_model: dict) -> tuple[bool, str]:
    failed = [f"{name}: {g.name}" for name, gates in gates_by_model.items() for g in gates if not g.passed]
    if not gates_by_model:
        return True, "no gates configured"
    if failed:
        return False, f"FAIL: {len(failed)} gate(s) failed ({'; '.join(failed)})"
    return True, f"PASS: {', '.join(gates_by_model)} passed every gate"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_metrics(scores: list, headline: str, passed: bool, path: Path, gates: dict | None = None) -> Path:
    """Grouped bars per metric (base first), the gate thresholds as dashed lines, the verdict as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / max(1, len(scores))
    colors = ["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for i, s in enumerate(scores):
        xs = [j + (i - (len(scores) - 1) / 2) * width for j in range(len(RATES))]
        vals = [getattr(s, k) for k, _ in RATES]
        bars = ax1.bar(xs, vals, width, label=s.name, color=colors[i % len(colors)])
        ax1.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8, padding=1)
        losses = [getattr(s, k) if getattr(s, k) is not None else 0.0 for k, _ in LOSSES]
        xs2 = [j + (i - (len(scores) - 1) / 2) * width for j in range(len(LOSSES))]
        bars = ax2.bar(xs2, losses, width, color=colors[i % len(colors)])
        ax2.bar_label(bars, labels=[f"{v:.2f}" if getattr(s, k) is not None else "n/a"
                                    for v, (k, _) in zip(losses, LOSSES)], fontsize=8, padding=1)
    for j, (key, _) in enumerate(RATES):  # where a gate sits on an absolute metric
        threshold = (gates or {}).get(f"min_{key}")
        if threshold is not None:
            ax1.hlines(threshold, j - 0.45, j + 0.45, colors="#c62828", linestyles="dashed", lw=1.5)
            ax1.annotate(f"gate {threshold:g}", (j + 0.45, threshold), fontsize=7, color="#c62828",
                         ha="right", va="bottom")
    ax1.set_xticks(range(len(RATES)), [label for _, label in RATES])
    ax1.set_ylim(0, 1.15)
    ax1.set_ylabel("share of held-out rows (higher is better)")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.set_xticks(range(len(LOSSES)), [label for _, label in LOSSES])
    ax2.set_ylabel("mean NLL per response token (lower is better)")
    fig.suptitle(headline, color="#2e7d32" if passed else "#c62828", fontsize=12, fontweight="bold")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(curves: dict, path: Path, title: str) -> Path | None:
    """curves: {label: [(step, value), ...]} (train/validation loss of the upstream run)."""
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            style = "o-" if "val" in label else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def write_report(out: Path, *, headline: str, passed: bool, scores: list, gates_by_model: dict, examples: list,
                 heldout: str, sources: dict, images: dict, definitions: str, extra: dict) -> tuple[Path, Path]:
    """report.md and report.json in `out`. examples: [{prompt, reference, <model>: text, ...}]."""
    names = [s.name for s in scores]
    lines = [f"# Eval: {headline}", ""]
    if images.get("metrics"):
        lines += [f"![metrics]({images['metrics'].name})", ""]
    lines += ["## Gates", "", "| candidate | gate | threshold | value | result |", "|---|---|---|---|---|"]
    for name, gates in gates_by_model.items():
        for g in gates:
            lines.append(f"| {name} | {g.name} ({g.meaning}) | {g.threshold:g} | {_fmt(g.value)} | "
                         f"{'pass' if g.passed else '**FAIL**'} |")
    lines += ["", "## Metrics", "", "| model | n | loss | perplexity | exact match | token F1 | contains | EOS rate | "
              "mean length | general loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in scores:
        m = s.metrics()
        lines.append(f"| {s.name} | {m['n']} | {_fmt(m['loss'])} | {_fmt(m['perplexity'], 2)} | {_fmt(m['exact_match'])} "
                     f"| {_fmt(m['token_f1'])} | {_fmt(m['contains'])} | {_fmt(m['eos_rate'])} | "
                     f"{_fmt(m['mean_length'], 1)} | {_fmt(m['general_loss'])} |")
    lines += ["", "## What held-out means here", "", heldout, ""]
    lines += ["## Generations", "", "| prompt | reference | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for ex in examples:
        lines.append(f"| {_cell(ex['prompt'])} | {_cell(ex['reference'], 30)} | "
                     + " | ".join(_cell(ex.get(n, ''), 30) for n in names) + " |")
    if images.get("curves"):
        lines += ["", "## Training", "", f"![loss curves]({images['curves'].name})"]
    lines += ["", "## Definitions", "", definitions, "", "## Sources", ""]
    lines += [f"- {k}: `{v}`" for k, v in sources.items()]
    md = out / "report.md"
    with atomic_write(md) as f:
        f.write("\n".join(lines) + "\n")
    report = {"passed": passed, "verdict": headline, "models": {s.name: s.metrics() for s in scores},
              "gates": {n: [g.row() for g in gates] for n, gates in gates_by_model.items()},
              "heldout": heldout, "sources": sources, **extra}
    js = out / "report.json"
    write_json(js, json.loads(json.dumps(report, default=str)))
    return md, js
