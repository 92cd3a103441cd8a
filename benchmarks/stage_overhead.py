"""`nemo-ft sft` against a bare script that drives NeMo the way megatron_gpt_finetuning.py does.

    OMP_NUM_THREADS=1 PATH=.venv/bin:$PATH .venv/bin/python benchmarks/stage_overhead.py [--steps 300] [--rounds 3]

Same base (the shipped tiny model), data, composed config, steps and threads, one process each,
the two alternated `--rounds` times in one run. The bare side (this file with `--bare`) does what
NeMo's example script does: MegatronLMPPTrainerBuilder + exp_manager, MegatronGPTSFTModel
.merge_cfg_with + restore_from, add_adapter(LoraPEFTConfig), trainer.fit, save_to. On a CPU it
needs nemo_ft.runtime's NEMO_FIXES and CPU_PATCHES to run at all, so it gets those (and the
process-group setup); it gets none of the stage's: config validation, data/input checks, the
memory planner and probe, the preemption and metrics callbacks, the adapter-file check, the
frozen/trained digests, the manifest hashes, the loss plot, nor TOKEN_MEAN_LOSS (its per-step
all-reduce is part of what is measured: the bare side runs NeMo's own loss). Both sides log at the
stage's level (NeMo at WARNING, Python warnings ignored), which is not what is measured.

Step time: both sides take time.perf_counter() at Lightning's on_train_batch_end (the stage's
metrics.jsonl `time_s`; the bare side's own callback, the same definition); steps/s = 1 / the
median step interval after 10 warm-up steps. Wall: the process from start to exit. The two sides
of a round run at the same time, each pinned to its own core, cores swapped every round (this is a
shared VM: run one after the other, every other run was ~20% slower whichever side it was), and the
overhead is the median of the rounds' ratios.

Time on this VM is noisy; two numbers are not: Python calls per training step of each side
(cProfile's count over a 200-step run minus a 100-step one: the same per-step work gives the same
count), and `--control`, the stage against itself in the same harness (what two identical sides
show here). Written to benchmarks/results/stage_overhead.md (--control: stage_overhead_control.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = 10


def overrides(run_dir: Path, steps: int) -> list[str]:
    return [f"run.dir={run_dir}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps // 3}",
            "trainer.enable_progress_bar=false"]


def bare(run_dir: Path, steps: int) -> None:
    """NeMo's megatron_gpt_finetuning.py on the stage's composed config."""
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir

    from nemo_ft import runtime
    from nemo_ft.config.validate import fill_defaults
    from nemo_ft.paths import CONF_DIR
    from nemo_ft.stages.lifecycle import nemo_model_cfg, quiet_nemo

    import nemo_ft.config  # noqa: F401  (the ${repo:} resolver the configs use)

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("sft_lora", overrides=[*overrides(run_dir, steps), "run.loss_per_token=false"])
    fill_defaults(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet_nemo()  # the stage's log level (NeMo at WARNING, Python warnings off) on both sides: not what is measured
    runtime.prepare(cfg)
    nemo = nemo_model_cfg(cfg)

    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronLMPPTrainerBuilder
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP
    from nemo.utils.exp_manager import exp_manager

    times = []

    class StepTimes(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            times.append(time.perf_counter())

    trainer = MegatronLMPPTrainerBuilder(nemo).create_trainer(callbacks=[StepTimes()])
    exp_manager(trainer, nemo.exp_manager)
    path = str(cfg.model.restore_from_path)
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(path, nemo)
    model = MegatronGPTSFTModel.restore_from(path, model_cfg, trainer=trainer,
                                             save_restore_connector=NLPSaveRestoreConnector())
    runtime.sync_app_state()
    model.add_adapter(PEFT_CONFIG_MAP["lora"](model_cfg))
    trainer.fit(model)
    model.save_to(str(run_dir / "adapter.nemo"))
    (run_dir / "times.json").write_text(json.dumps(times))


def steps_per_s(times: list[float]) -> float:
    """1 / the median step interval after the warm-up: the validation steps and a noisy neighbour's
    moments (a shared VM) move a mean, not the median."""
    t = times[WARMUP:]
    return 1 / statistics.median(b - a for a, b in zip(t, t[1:]))


def build_chunk_cache(tmp: Path):
    """benchmarks/chunk_cache.c built into tmp (None without a C compiler): LD_PRELOADed into both
    sides it counts CPython's 16 KiB data-stack chunk maps, and with CHUNK_CACHE=1 reuses them."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    lib = tmp / "chunk_cache.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(REPO / "benchmarks/chunk_cache.c"),
                    "-ldl", "-lpthread"], check=True)
    return lib


def side_by_side(cmds: dict, swap: bool, envs: dict = None) -> dict:
    """Start both sides at once, each pinned to a core of its own (each runs one thread), the cores
    swapped every other round: whatever else the machine does in that minute slows both alike, and
    neither keeps the busier core. Returns {side: wall seconds}."""
    cores = sorted(os.sched_getaffinity(0))
    procs, logs = {}, {}
    for i, (side, cmd) in enumerate(cmds.items()):
        core = {cores[(i + swap) % len(cores)]}
        logs[side] = tempfile.TemporaryFile(mode="w+")
        procs[side] = (subprocess.Popen(cmd, cwd=REPO, stdout=logs[side], stderr=subprocess.STDOUT,
                                        env={**os.environ, **(envs or {}).get(side, {})},
                                        preexec_fn=lambda core=core: os.sched_setaffinity(0, core)), time.perf_counter())
    walls = {}
    while len(walls) < len(procs):
        for side, (proc, t0) in procs.items():
            if side not in walls and proc.poll() is not None:
                walls[side] = time.perf_counter() - t0
                if proc.returncode:
                    logs[side].seek(0)
                    sys.exit(f"failed: {' '.join(cmds[side])}\n{logs[side].read()[-4000:]}")
        time.sleep(0.05)
    return walls


def stage_side(py: str, extra=()):
    def cmd(run_dir: Path, steps: int, prefix=()):
        return [py, *prefix, "-m", "nemo_ft.stages.sft", *overrides(run_dir, steps), *extra]

    def times(run_dir: Path):
        return [json.loads(line)["time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"kind": "train"' in line]
    return cmd, times


def bare_side(py: str):
    def cmd(run_dir: Path, steps: int, prefix=()):
        return [py, *prefix, __file__, "--bare", str(run_dir), "--steps", str(steps)]
    return cmd, lambda run_dir: json.loads((run_dir / "times.json").read_text())


def python_calls_per_step(sides: dict, steps: int, tmp: Path) -> dict:
    """Python function calls per training step, each side: cProfile's total call count of a run of
    2*steps minus one of `steps`, divided by `steps` (start-up, the 3 validations and the save cancel
    out). Deterministic, unlike time on a shared VM: equal counts mean the same work per step."""
    import pstats

    totals = {}
    for n in (steps, 2 * steps):
        cmds = {side: cmd(tmp / f"calls_{i}_{n}", n, ("-m", "cProfile", "-o", str(tmp / f"calls_{i}_{n}.prof")))
                for i, (side, (cmd, _)) in enumerate(sides.items())}
        side_by_side(cmds, swap=False)
        for i, side in enumerate(sides):
            stats = pstats.Stats(str(tmp / f"calls_{i}_{n}.prof")).stats
            totals[side, n] = sum(v[1] for v in stats.values())
    return {side: (totals[side, 2 * steps] - totals[side, steps]) / steps for side in sides}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--control", action="store_true",
                    help="the stage against itself: what the harness shows for two identical sides")
    ap.add_argument("--stage-override", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra Hydra override for the stage's side (to find what costs what)")
    ap.add_argument("--bare", help=argparse.SUPPRESS)  # run dir: the bare side, in its own process
    ap.add_argument("--calls", type=int, default=100, help="steps of the call count's shorter run (0: no count)")
    ap.add_argument("--chunk-cache", action="store_true",
                    help="both sides reuse CPython's 16 KiB data-stack chunks (benchmarks/chunk_cache.c, what "
                         "CPython 3.13's fix for gh-142183 does): the overhead without the interpreter's artifact")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.bare:
        return bare(Path(args.bare), args.steps)
    py = sys.executable
    sides = ({"nemo-ft sft (A)": stage_side(py), "nemo-ft sft (B)": stage_side(py)} if args.control else
             {"nemo-ft sft" + "".join(f" {o}" for o in args.stage_override): stage_side(py, args.stage_override),
              "bare NeMo script": bare_side(py)})
    suffix = ("_control" if args.control else "") + ("_chunk_cache" if args.chunk_cache else "")
    out = Path(args.out or REPO / f"benchmarks/results/stage_overhead{suffix}.md")
    rows = {side: [] for side in sides}
    chunk_maps = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_chunk_cache(Path(tmp))
        if args.chunk_cache and lib is None:
            sys.exit("--chunk-cache needs a C compiler (cc) to build benchmarks/chunk_cache.c")
        for r in range(args.rounds):
            dirs = {side: Path(tmp) / f"{i}_{r}" for i, side in enumerate(sides)}
            envs = {side: {"LD_PRELOAD": str(lib), "CHUNK_CACHE": "1" if args.chunk_cache else "0",
                           "CHUNK_CACHE_LOG": str(dirs[side]) + ".chunks"} for side in sides} if lib else {}
            walls = side_by_side({side: cmd(dirs[side], args.steps) for side, (cmd, _) in sides.items()},
                                 swap=bool(r % 2), envs=envs)
            for side, (_, times) in sides.items():
                t = times(dirs[side])
                assert len(t) == args.steps, (side, len(t))
                rows[side].append((steps_per_s(t), walls[side]))
                if lib:
                    chunk_maps[side].append(int((Path(str(dirs[side]) + ".chunks")).read_text().split()[0]) / args.steps)
                print(f"round {r + 1} {side}: {rows[side][-1][0]:.2f} steps/s, {walls[side]:.1f} s wall"
                      + (f", {chunk_maps[side][-1]:.0f} data-stack chunk maps per step" if lib else ""), flush=True)
        calls = python_calls_per_step(sides, args.calls, Path(tmp)) if args.calls else {side: float('nan') for side in sides}
    import torch
    keys = list(rows)
    step_ratio = statistics.median(rows[keys[1]][r][0] / rows[keys[0]][r][0] for r in range(args.rounds))
    wall_ratio = statistics.median(rows[keys[0]][r][1] / rows[keys[1]][r][1] for r in range(args.rounds))
    wall_diff = statistics.median(rows[keys[0]][r][1] - rows[keys[1]][r][1] for r in range(args.rounds))
    title = ("the harness's control: `nemo-ft sft` against itself" if args.control else
             "`nemo-ft sft` vs a bare NeMo script (megatron_gpt_finetuning.py's calls)")
    lines = [f"# {title}\n",
             f"CPU ({os.cpu_count()} cores, a shared VM), torch {torch.__version__}, OMP_NUM_THREADS=1; the shipped "
             f"tiny base (hidden 128, 2 layers), LoRA on attention_qkv, micro batch 4, global batch 8, {args.steps} "
             f"steps, validation every {args.steps // 3}; steps/s = 1 / median step interval after {WARMUP} warm-up "
             f"steps; {args.rounds} rounds, the two sides at the same time, one pinned core each, cores swapped "
             "every round" + (" and both sides LD_PRELOAD benchmarks/chunk_cache.c with CHUNK_CACHE=1 (CPython's "
                              "16 KiB data-stack chunks reused instead of mapped anew: CPython 3.13's fix for "
                              "gh-142183)" if args.chunk_cache else "") + ". The tiny model's step "
             "is ~all overhead (~40 ms), so this is the worst case for the stage's share. Python calls per "
             f"step: cProfile's count, ({2 * args.calls}-step run - {args.calls}-step run) / {args.calls}. Chunk maps "
             "per step: CPython's 16 KiB data-stack chunks mapped anew (counted by benchmarks/chunk_cache.c) over "
             "the whole run / steps (gh-142183: mapped and unmapped on every call of a loop that lands on a chunk "
             "boundary).\n",
             "| side | steps/s, each round | wall s, each round | Python calls per step | chunk maps per step |",
             "|---|---|---|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {', '.join(f'{s:.2f}' for s, _ in v)} | {', '.join(f'{w:.1f}' for _, w in v)} "
                     f"| {calls[k]:.0f} | {statistics.median(chunk_maps[k]) if chunk_maps[k] else float('nan'):.0f} |")
    lines += ["", f"Time per step, {keys[0]} over {keys[1]} (median of the rounds' ratios): "
              f"{100 * (step_ratio - 1):+.1f}%" + ("" if args.control else " (goal: <= 3%)") + ". Python calls per "
              f"step: {100 * (calls[keys[0]] / calls[keys[1]] - 1):+.1f}%. Whole process: "
              f"{100 * (wall_ratio - 1):+.1f}% wall ({wall_diff:+.1f} s"
              + ("" if args.control else ": validation, planner, data checks, adapter check, manifest hashes, plot")
              + ")."]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
