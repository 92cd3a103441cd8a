"""Fixtures of tests/serve: adapters trained once per session on two different tasks and exported, NeMo's
own greedy answers for them (the reference every server must reproduce token for token), and
`nemo-ft serve` run the way a user runs it (a subprocess, stopped with SIGTERM), with its process tree
checked for leftovers.

Skips: only when .venv-serve is absent (`make serve-env` not run) AND NEMO_FT_REQUIRE_SERVE is unset;
CI sets it, so there a missing serve env fails instead of skipping.
"""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, built_once, model_probe, read_jsonl, run_stage, stage_env

SERVE_PY = REPO / ".venv-serve" / "bin" / "python"
BASE = REPO / "data" / "tiny" / "tiny_llama.nemo"
SAMPLE = REPO / "data" / "sample"
MAX_NEW = 16
LORA = ("model.peft.lora_tuning.target_modules=[all]", "model.peft.lora_tuning.adapter_dim=16", "model.optim.lr=3e-3",
        "trainer.enable_progress_bar=false")


def need_serve_env(what: str = "vllm") -> None:
    """Skip without the serve env unless CI requires it; with it, PyTriton/vLLM must really be there."""
    if not SERVE_PY.exists():
        if os.environ.get("NEMO_FT_REQUIRE_SERVE"):
            pytest.fail(f"NEMO_FT_REQUIRE_SERVE is set but {SERVE_PY} is missing: run `make serve-env`")
        pytest.skip("no .venv-serve: run `make serve-env` (or set NEMO_FT_REQUIRE_SERVE=1 to fail instead)")
    if what == "triton":
        import importlib.util
        assert importlib.util.find_spec("pytriton") and importlib.util.find_spec("tritonclient"), \
            "PyTriton/tritonclient missing from this venv: run `make serve-env`"


def prompts(name: str) -> list[str]:
    """Held-out prompts: lookup_test (unseen name/town pairings), sft_validation (unseen facts)."""
    file = {"lookup": "lookup_test.jsonl", "qa": "sft_validation.jsonl"}[name]
    return [r["input"] for r in read_jsonl(SAMPLE / file)]


def _train_and_export(tmp_path_factory, name, *overrides, merge=False):
    def build(root):
        run_stage("sft", f"run.dir={root / 'sft'}", *overrides)
        run_stage("export", f"from_run={root / 'sft'}", f"out_dir={root / name}", f"adapter_name={name}",
                  *(("merge=true",) if merge else ()), timeout=300)
    return built_once(tmp_path_factory, f"serve_{name}", build) / name


@pytest.fixture(scope="session")
def lookup_export(tmp_path_factory):
    """The field-lookup task (generalizes to unseen pairings): 200 steps, LoRA r=16 on all four targets."""
    return _train_and_export(tmp_path_factory, "lookup", *LORA, "trainer.max_steps=200", "trainer.val_check_interval=100",
                             f"model.data.train_ds.file_names=[{SAMPLE / 'lookup_train.jsonl'}]",
                             f"model.data.validation_ds.file_names=[{SAMPLE / 'lookup_validation.jsonl'}]", merge=True)


@pytest.fixture(scope="session")
def qa_export(tmp_path_factory):
    """The Q/A sample (memorized facts), same LoRA config: shares the lookup adapter's modules in Triton."""
    return _train_and_export(tmp_path_factory, "qa", *LORA, "trainer.max_steps=120", "trainer.val_check_interval=60")


@pytest.fixture(scope="session")
def qkv8_export(tmp_path_factory):
    """Another PEFT config (r=8, attention_qkv only): Triton must give it a model of its own."""
    return _train_and_export(tmp_path_factory, "qkv8", "model.peft.lora_tuning.adapter_dim=8", "model.optim.lr=3e-3",
                             "trainer.enable_progress_bar=false", "trainer.max_steps=20", "trainer.val_check_interval=20",
                             f"model.data.train_ds.file_names=[{SAMPLE / 'lookup_train.jsonl'}]",
                             f"model.data.validation_ds.file_names=[{SAMPLE / 'lookup_validation.jsonl'}]")


@pytest.fixture(scope="session")
def nemo_answers(tmp_path_factory, lookup_export, qa_export):
    """{(model, prompt): NeMo greedy ids} for base, lookup and qa on both held-out sets, through NeMo's own
    generation (tests/e2e/model_probe.py -> nemo_ft.runtime.generation.greedy, KV cache)."""
    def build(tmp):
        every = prompts("lookup") + prompts("qa")
        rows = []
        for model, adapter, ps in (("base", None, every), ("lookup", lookup_export, prompts("lookup")),
                                   ("qa", qa_export, prompts("qa"))):
            gens = model_probe(tmp, BASE, "greedy", ps, adapter=adapter and adapter / "adapter_tp1.nemo",
                               max_new=MAX_NEW)["generations"]
            rows += [[model, p, g["ids"]] for p, g in zip(ps, gens)]
        (tmp / "answers.json").write_text(json.dumps(rows))
    rows = json.loads((built_once(tmp_path_factory, "nemo_answers", build) / "answers.json").read_text())
    return {(model, p): ids for model, p, ids in rows}


def tree(pid: int) -> list[tuple]:
    """(pid, start time) of pid and every live process below it: with its start time a pid names one
    process, so one that ended and whose number was reused (pid_max is 32768 here, and a parallel test
    run spawns thousands) is neither reported as left behind nor killed."""
    from nemo_ft.runtime.servers import remember, start_time
    return list(remember(pid, {pid: start_time(pid)}).items())


def alive(procs, grace_s: float = 10.0) -> list[int]:
    """Those of `procs` (tree()) still running after up to grace_s: a process that is already on its
    way out gets that long (multiprocessing's resource tracker outlives the stage by a moment to
    unlink the shared memory PyTriton used, longer when the other test worker keeps both cores busy);
    a server left behind is still there after it."""
    from nemo_ft.runtime.servers import alive as is_alive
    deadline = time.monotonic() + grace_s
    while True:
        left = [p for p, started in procs if started is not None and is_alive(p, started)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class Served:
    """A running `nemo-ft serve`: its process, the serving.json it wrote, every pid seen below it."""

    def __init__(self, proc, run_dir, info, log):
        self.proc, self.run_dir, self.info, self.log = proc, run_dir, info, log
        self.pids = set(tree(proc.pid))

    @property
    def url(self):
        return self.info["url"]

    def refresh_pids(self):
        self.pids |= set(tree(self.proc.pid))

    def output(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        """Signal the stage (as a user's Ctrl-C / kill does) and wait; returns its exit code."""
        self.refresh_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def load_killed_midway(served, make_client, jobs, kill_after: int = 40):
    """run_load(8 clients) with the server process SIGKILLed right after the `kill_after`-th answer, so
    most requests are sent to a dead server whatever the machine's speed (a timer let a fast server
    answer most of them first). Returns the seconds the load took; every request has an answer or an
    error of its own (none left at the load deadline: a hang)."""
    import threading

    from nemo_ft.clients import run_load

    answered, lock = [0], threading.Lock()

    class Counting:
        def __init__(self):
            self.client = make_client()

        def complete(self, *args):
            out = self.client.complete(*args)
            with lock:
                answered[0] += 1
                if answered[0] == kill_after:
                    os.kill(served.info["server_pid"], signal.SIGKILL)
            return out

        def close(self):
            getattr(self.client, "close", lambda: None)()

    t = time.monotonic()
    result = run_load(Counting, jobs, clients=8, max_tokens=MAX_NEW, deadline_s=120)
    elapsed = time.monotonic() - t
    assert not [e for e in result.errors if "load deadline" in str(e)], result.summary()
    assert len(result.errors) >= len(jobs) - kill_after - 8, result.summary()  # 8: in flight at the kill
    return elapsed


def serve_args(engine, from_run, port, run_dir, *extra):
    return [sys.executable, "-m", "nemo_ft.stages.serve", f"from_run={from_run}", f"engine={engine}", f"port={port}",
            f"run.dir={run_dir}", *extra]


@contextmanager
def serving(engine, from_run, tmp_path, *extra, ready_s=240, expect=0):
    """`nemo-ft serve` until the block ends; then SIGTERM: it must exit `expect` (0: a clean stop) within
    60 s, leaving no process behind."""
    from tests.conftest import _free_port

    run_dir = tmp_path / f"serve_{engine}_{time.monotonic_ns()}"
    port = _free_port()
    log = tmp_path / f"{run_dir.name}.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_args(engine, from_run, port, run_dir, *extra), cwd=REPO, env=stage_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    served = None
    try:
        deadline = time.monotonic() + ready_s
        while not (run_dir / "serving.json").exists():
            assert proc.poll() is None, f"nemo-ft serve exited {proc.returncode}:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"not ready in {ready_s} s:\n{log.read_text()[-5000:]}"
            time.sleep(0.5)
        served = Served(proc, run_dir, json.loads((run_dir / "serving.json").read_text()), log)
        yield served
    finally:
        if served is None:
            served = Served(proc, run_dir, {}, log)
        code = served.stop()
        left = alive(served.pids)
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert code == expect, f"nemo-ft serve exited {code}, expected {expect}:\n{log.read_text()[-4000:]}"
        assert not left, f"processes left behind after SIGTERM: {left}"
        assert (run_dir / "manifest.json").exists()


def hf_eos(export: Path) -> int:
    return json.loads((Path(export) / "hf_base" / "config.json").read_text())["eos_token_id"]
