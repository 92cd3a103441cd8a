"""Shared test helpers: run stages the way users do (a process of their own, forked from
tests/preloaded.py; torchrun for several ranks), run prep in-process, read what stages wrote.
Test files import these from here, never from each other.

Tests are laid out by what they need, and marked by their folder:
  pure/  seconds, no NeMo (`make test-fast`)    nemo/   imports NeMo or runs a stage's checks, CPU
  e2e/   trains the tiny model through NeMo     slurm/  real sbatch jobs (.ci/slurm_up.sh)
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOKENIZER = str(REPO / "data" / "tiny" / "tokenizer.model")
SAMPLE = REPO / "data" / "sample"
ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}
FOLDER_MARKS = ("pure", "nemo", "e2e", "slurm", "serve")


# `make test` runs in pytest-xdist workers (-n 2 --dist loadscope): a work unit is a test file (its
# module fixtures are built once), except these folders, each one unit: the SLURM tests share one
# small cluster (two files at once would queue behind each other's jobs) and the serve tests' servers
# are the largest processes of the suite. Units start longest first (minutes, one process, measured
# 2026-12-03 with tests/preloaded.py: serve 4.8, export 4.7, slurm 4.9, then 4.2 3.9 3.0 2.5; the whole
# suite 35), so neither worker is left with a long one at the end, slurm third so that its jobs and
# the serve tests' servers do not start side by side; the rest follow in collection order. Whichever
# unit first needs a built_once fixture (lookup_pipeline: serve, then dpo, reinforce, ...) builds it;
# the others wait on its lock or find it built.
ONE_UNIT = ("tests/slurm", "tests/serve")
LONGEST_FIRST = ("tests/serve", "tests/e2e/test_export.py", "tests/slurm", "tests/e2e/test_parallel.py",
                 "tests/e2e/test_sft.py", "tests/e2e/test_dpo.py", "tests/e2e/test_reinforce.py")


def xdist_scope(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return next((folder for folder in ONE_UNIT if path.startswith(folder + "/")), path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if folder in FOLDER_MARKS:
            item.add_marker(getattr(pytest.mark, folder))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order the scheduler hands out units in
        rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(xdist_scope(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order, not xdist's by test count
    return Units(config, log)


def stage_env() -> dict:
    env = dict(os.environ)
    # NeMo compiles a helper with `python3 -m pybind11`: the venv must be first on PATH.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_stage(stage: str, *overrides: str, nproc: int = 1, timeout: int = 600, check: bool = True):
    started = time.perf_counter()
    proc = start_process({"module": f"nemo_ft.stages.{stage}"}, overrides, nproc, timeout)
    log_process(stage, nproc, started, proc.returncode)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_process(target: dict, args, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """`python -m <module>` or `python <script>` ({"module": ...} or {"script": ...}) with args, in one
    process or under torchrun with nproc ranks, run to its end with its output captured; each process
    (each rank) a fork of tests/preloaded.py's server unless NEMO_FT_TEST_PRELOAD=0."""
    (kind, name), pre, env = next(iter(target.items())), preloaded(), stage_env()
    entry = ["-m", name] if kind == "module" else [name]
    if nproc > 1:
        torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
        if pre:
            from tests.preloaded import OTHER_RANKS_SOCKET_ENV, SOCKET_ENV

            env[SOCKET_ENV], env[OTHER_RANKS_SOCKET_ENV] = pre.path, preloaded(other_ranks=True).path
            entry = [str(REPO / "tests" / "preloaded.py"), f"{kind}:{name}"]  # the rank client
        return subprocess.run([*torchrun, *entry, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    cmd = [sys.executable, *entry, *args]
    if pre:
        return pre.run(cmd, **target, args=args, cwd=REPO, env=env, timeout=timeout)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


_preloaded = {}


def preloaded(other_ranks: bool = False):
    """tests/preloaded.py's server for this pytest process (started on first use; again if it died), or
    None with NEMO_FT_TEST_PRELOAD=0: stage runs (and torchrun's ranks) fork from a process that has
    imported torch and nemo.utils instead of importing them again (~7 s of CPU each). other_ranks: the
    one that imported them as RANK=1, for torchrun's ranks but rank 0."""
    if os.environ.get("NEMO_FT_TEST_PRELOAD", "1") == "0":
        return None
    server = _preloaded.get(other_ranks)
    if server is None or server.proc.poll() is not None:
        import atexit

        from tests.preloaded import Preloaded

        server = _preloaded[other_ranks] = Preloaded(REPO, {**stage_env(), **({"RANK": "1", "LOCAL_RANK": "1"}
                                                                             if other_ranks else {})})
        atexit.register(server.close)
    return server


def log_process(what: str, nproc: int, started: float, rc: int) -> None:
    """With NEMO_FT_TEST_PROCESS_LOG=file, one JSON line per stage process a test starts (what, ranks,
    seconds, exit code, test): where the suite's minutes go (a fresh one spends ~7 s of CPU importing)."""
    path = os.environ.get("NEMO_FT_TEST_PROCESS_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"what": what, "nproc": nproc, "s": round(time.perf_counter() - started, 2), "rc": rc,
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]}) + "\n")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "validation"]


# Small, fast settings shared by the e2e SFT runs: 60 steps, validation every 20.
SFT_FAST = ("trainer.enable_progress_bar=false", "trainer.max_steps=60", "trainer.val_check_interval=20")


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A session fixture's directory, `build(dir)` once per test run. `make test` runs the suite in
    pytest-xdist workers, each a session of its own: the first worker to ask builds under a file lock,
    the others wait and reuse it. A build that failed fails the others at once with its error (a
    retry would spend the same minutes on the same failure)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built_once"  # this run's
    shared.mkdir(exist_ok=True)
    out, failed = shared / name, shared / f"{name}.failed"
    with FileLock(str(shared / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"session fixture {name} failed to build in another worker:\n{failed.read_text()}")
        if not (shared / f"{name}.built").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            try:
                build(out)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}"[-8000:])
                raise
            (shared / f"{name}.built").touch()
    return out


@pytest.fixture(scope="session")
def sft_tp1(tmp_path_factory):
    return built_once(tmp_path_factory, "sft_tp1", lambda run_dir: run_stage("sft", f"run.dir={run_dir}", *SFT_FAST))


@pytest.fixture(scope="session")
def sft_tp2(tmp_path_factory):
    return built_once(tmp_path_factory, "sft_tp2", lambda run_dir: run_stage(
        "sft", f"run.dir={run_dir}", "parallel=cpu_tp2", *SFT_FAST, nproc=2))


def prep(tmp_path, inputs, **over):
    """nemo-ft prep in-process on the tiny tokenizer: all rows to train, seq_length 64, one worker."""
    from nemo_ft.data.config import PrepConfig
    from nemo_ft.data.pipeline import run_prep

    c = {"inputs": [str(i) if not isinstance(i, dict) else i for i in inputs], "out_dir": str(tmp_path / "out"),
         "tokenizer": {"library": "sentencepiece", "model": TOKENIZER}, "seq_length": 64,
         "split": dict(ALL_TRAIN), "progress": False, "workers": 1}
    c.update(over)
    return run_prep(PrepConfig.from_dict(c), resolved_config=c)


def assert_refused(proc, *words, torchrun=False):
    """A stage refused before anything started: exit 2, one message per problem naming each of `words`,
    no traceback. Under torchrun the launcher exits 1 and adds its own traceback (ChildFailedError)."""
    assert proc.returncode in ((1, 2) if torchrun else (2,)), proc.stdout[-2000:] + proc.stderr[-3000:]
    stage_part = proc.stderr.split("torch/distributed/elastic")[0] if torchrun else proc.stderr
    assert "Traceback" not in stage_part and "nothing was started" in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in proc.stderr, proc.stderr


def leftovers(tag) -> list[str]:
    """Processes whose command line names `tag` (a test's directory: a stage, its servers, Triton)."""
    import subprocess

    out = subprocess.run(["pgrep", "-af", str(tag)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def signal_mid_run(stage: str, *overrides: str, ready, sig: str, log: Path, start_timeout: float = 300,
                   stop_timeout: float = 120):
    """Start a stage, wait until ready() while it runs, send it `sig` (a name: SIGTERM, SIGUSR1), wait for it
    to end. Output goes to `log`, a file: a pipe nobody reads fills up and blocks the stage.
    Returns (exit code, output, seconds from the signal to the end)."""
    import signal

    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", f"nemo_ft.stages.{stage}", *overrides], cwd=REPO,
                                env=stage_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.1)
        assert proc.poll() is None and ready(), Path(log).read_text()[-3000:]
        proc.send_signal(getattr(signal, sig))
        t0 = time.monotonic()
        proc.wait(timeout=stop_timeout)
        return proc.returncode, Path(log).read_text(), time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()


def trained_past(run_dir: Path, step: int):
    """ready() for signal_mid_run: metrics.jsonl has a train row at `step` or later."""
    return lambda: (Path(run_dir) / "metrics.jsonl").exists() and any(r["step"] >= step for r in read_metrics(run_dir)[0])


PREF_INPUTS = (f"inputs=[{{path: {SAMPLE}/lookup_pref_train.jsonl, split: train}}, "
               f"{{path: {SAMPLE}/lookup_pref_validation.jsonl, split: validation}}, "
               f"{{path: {SAMPLE}/lookup_pref_test.jsonl, split: test}}]")
LOOKUP_SPLITS = (f"inputs=[{{path: {SAMPLE}/lookup_train.jsonl, split: train}}, "
                 f"{{path: {SAMPLE}/lookup_validation.jsonl, split: validation}}, "
                 f"{{path: {SAMPLE}/lookup_test.jsonl, split: test}}]")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def outputs_by_path(manifest: dict) -> dict:
    """A manifest's output records keyed by their (run-dir relative) path."""
    return {r["path"]: r for r in manifest["outputs"]}


def tiny_base_config() -> dict:
    """model_config.yaml of the shipped tiny base: the truth the figures tests assert derive from."""
    from nemo_ft.nemo_archive import read_config

    return read_config(REPO / "data" / "tiny" / "tiny_llama.nemo")


def tiny_lora_params(targets, rank: int) -> int:
    """LoRA parameters NeMo adds to the tiny base: per layer and target A [r, in] + B [out, r]."""
    from nemo_ft.export import ModelSpec

    s = ModelSpec.from_nemo_config(tiny_base_config())
    shapes = {"attention_qkv": (s.hidden_size, s.qkv_size), "attention_dense": (s.q_size, s.hidden_size),
              "mlp_fc1": (s.hidden_size, s.fc1_size), "mlp_fc2": (s.ffn_hidden_size, s.hidden_size)}
    return s.num_layers * sum(rank * sum(shapes[t]) for t in targets)


def tiny_token_ids(prompts) -> list:
    """The tiny tokenizer's ids of each prompt (no BOS, as NeMo's SFT prompts)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    return [sp.encode(p) for p in prompts]


def model_probe(tmp_path, base, mode, inputs, adapter=None, parallel="cpu", nproc=1, max_new=16):
    """tests/e2e/model_probe.py in its own process(es): a restored NeMo model's logits (mode=logits,
    gathered over TP) or greedy generations (greedy: NeMo's KV-cache path, nocache: the reference loop)."""
    path = tmp_path / f"inputs_{mode}.json"
    path.write_text(json.dumps(inputs))
    args = [str(base), "--inputs", str(path), "--mode", mode, "--max-new", str(max_new),
            "--run-dir", str(tmp_path / f"probe_{mode}_{nproc}"), f"parallel={parallel}"]
    if adapter:
        args += ["--adapter", str(adapter)]
    script = str(REPO / "tests" / "e2e" / "model_probe.py")
    started = time.perf_counter()
    proc = start_process({"script": script}, args, nproc, 300)
    log_process(f"model_probe {mode}", nproc, started, proc.returncode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_abs_diff(a, b) -> float:
    """max |a - b| over nested lists (per prompt: prompts may differ in length) or tensors."""
    import torch

    if isinstance(a, list) and a and isinstance(a[0], list) and isinstance(a[0][0], list):
        return max(max_abs_diff(x, y) for x, y in zip(a, b, strict=True))
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


# The demo's pipeline on the learnable lookup task (data/sample/lookup_*), shared by the test modules
# that need a trained adapter: prep (+ a general share) -> sft (LoRA on all four targets) -> export.
LOOKUP_PREP_INPUTS = (f"inputs=[{{path: {SAMPLE}/lookup_train.jsonl, weight: 0.8, split: train}}, "
                      f"{{path: {SAMPLE}/lookup_validation.jsonl, split: validation}}, "
                      f"{{path: {SAMPLE}/lookup_test.jsonl, split: test}}, "
                      f"{{path: {SAMPLE}/sft_train.jsonl, weight: 0.2, general: true}}]")
LOOKUP_LORA = ("model.peft.lora_tuning.target_modules=[all]", "model.peft.lora_tuning.adapter_dim=16",
               "model.optim.lr=3e-3")


@pytest.fixture(scope="session")
def lookup_pipeline(tmp_path_factory):
    return built_once(tmp_path_factory, "lookup_pipeline", _lookup_pipeline)


def _lookup_pipeline(root: Path) -> None:
    run_stage("prep", f"out_dir={root / 'prep'}", "template.prompt_template='{input}{output}'", LOOKUP_PREP_INPUTS,
              "split.train=0.7", "split.validation=0.15", "split.test=0.15", "seq_length=128", "progress=false")
    # NeMo's own loss reduction here (run.loss_per_token=false): REINFORCE's learning test
    # (test_reinforce.py) starts from this adapter (measured: rollout reward 0.024 -> 0.304, greedy
    # validation reward 0.125 -> 0.333, KL to the start 0.92). From the token-mean-trained one (SFT
    # validation loss 0.200 vs 0.204) the rollout reward rises too (+0.13, +0.22 in two sessions) but
    # the greedy validation reward fell (0.125 -> 0.083 -> 0.0; KL 0.56): 30 steps are a thin budget.
    run_stage("sft", f"run.dir={root / 'sft'}", *LOOKUP_LORA, "trainer.max_steps=200", "trainer.val_check_interval=100",
              "run.loss_per_token=false",
              "trainer.enable_progress_bar=false", f"model.data.train_ds.file_names=[{root / 'prep/train.jsonl'}]",
              f"model.data.validation_ds.file_names=[{root / 'prep/validation.jsonl'}]")
    run_stage("export", f"from_run={root / 'sft'}", f"out_dir={root / 'export'}")
