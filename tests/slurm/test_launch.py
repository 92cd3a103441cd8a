"""The sbatch scripts on the real one-node SLURM (.ci/slurm_up.sh): slurm/pipeline.sh runs its stages as
dependent jobs to the end, and a failed stage cancels the jobs after it; failed eval gates fail the
job; a node-count mismatch is refused. (The preemption signal is tested on the two-node cluster, test_two_nodes.py.)"""
import json
import os
import re

import pytest

from tests.conftest import REPO
from tests.slurm import jobs

SLURM_READY = jobs.up_nodes() > 0
if not SLURM_READY and os.environ.get("NEMO_FT_REQUIRE_SLURM"):
    raise RuntimeError("NEMO_FT_REQUIRE_SLURM is set (CI) but no idle SLURM node: run .ci/slurm_up.sh")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SLURM_READY, reason="no SLURM here (bash .ci/slurm_up.sh starts one)")]


def _submit_pipeline(out, *overrides):
    import subprocess

    proc = subprocess.run(["bash", "slurm/pipeline.sh", str(out), *overrides], cwd=REPO, capture_output=True,
                          text=True, env=jobs.env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = dict(re.findall(r"\[nemo-ft pipeline\] (\w+): job (\d+) ->", proc.stdout))
    return ids, proc.stdout


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Two pipelines submitted at once: one that runs to the end, one whose sft stage fails."""
    root = tmp_path_factory.mktemp("pipelines")
    # 10 steps, not the demo's 200: the loss, EOS and forgetting gates pass (4.48 -> 1.83 held-out loss),
    # exact match needs the demo's training (it gates there). This proves the wiring, the demo the learning.
    good = _submit_pipeline(root / "good", "sft:trainer.max_steps=10", "sft:trainer.val_check_interval=5",
                            "dpo:trainer.dpo.max_steps=4", "dpo:trainer.dpo.val_check_interval=2",
                            "eval:eval.max_examples=8", "eval:eval.gates.min_exact_match=null")
    bad = _submit_pipeline(root / "bad", "sft:parallel=cpu_tp2")  # 2 devices, 1 task: sft exits 2
    yield root, good, bad
    jobs.cancel(*good[0].values(), *bad[0].values())


def test_nodes_mismatch_fails_before_anything_starts(tmp_path, pipelines):
    """A 2-node profile on a 1-node job: both problems named, exit 2, no traceback, nothing written.
    (`pipelines`: submitted first, so this job runs while theirs do.)"""
    log = tmp_path / "job.out"
    job_id = jobs.submit(f"--output={log}", "slurm/sft_lora.sh", "parallel=cpu_pp2_2nodes",
                         f"run.dir={tmp_path / 'run'}")
    state = jobs.wait_done(job_id, 120)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), text[-3000:]
    assert "trainer.num_nodes: SLURM started this job step on 1 node(s) but trainer.num_nodes = 2" in text
    assert "trainer.devices: the launcher started 1 process(es)" in text and "Traceback" not in text
    assert not (tmp_path / "run" / "nemo").exists()


def test_failed_eval_gates_fail_the_job(tmp_path):
    """eval exits 3 on failed gates (a payload stands in for the stage until it exists): the job fails
    with that status, so a pipeline's last job fails."""
    log = tmp_path / "job.out"
    job_id = jobs.submit(f"--output={log}", "slurm/eval.sh", "from_run=runs/export/x",
                         NEMO_FT_STAGE_PKG="tests.slurm.payloads")
    state = jobs.wait_done(job_id, 60)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "3:0"), log.read_text()[-3000:]
    assert "gates failed for runs/export/x" in log.read_text()


def test_pipeline_runs_each_stage_as_a_dependent_job_to_the_end(pipelines):
    root, (ids, printed), _ = pipelines
    out = root / "good"
    have = {s for s in ("dpo", "eval") if (REPO / "nemo_ft" / "stages" / f"{s}.py").exists()}
    assert list(ids) == ["prep", *(["prep_dpo", "sft", "dpo"] if "dpo" in have else ["sft"]), "export",
                         *(["eval"] if "eval" in have else [])]
    assert f"export: job {ids['export']} -> {out}/export (log {out}/logs/export-{ids['export']}.out)" in printed
    states = {s: jobs.wait_done(i, 400) for s, i in ids.items()}
    logs = {s: (out / "logs" / f"{s}-{i}.out").read_text() for s, i in ids.items()}
    for stage, st in states.items():
        assert (st["JobState"], st["ExitCode"]) == ("COMPLETED", "0:0"), (stage, logs[stage][-3000:])
    # Each stage read the one before it: sft trained on prep's files, dpo started from sft's adapter,
    # export exported the last adapter (the very file: its sha256).
    manifest = {s: json.loads((out / s / "manifest.json").read_text()) for s in ids if s not in ("prep", "prep_dpo")}
    inputs = {s: {r["role"]: r for r in m["inputs"]} for s, m in manifest.items()}
    outputs = {s: {r["role"]: r for r in m["outputs"]} for s, m in manifest.items()}
    assert manifest["sft"]["config"]["model"]["data"]["train_ds"]["file_names"] == [str(out / "prep" / "train.jsonl")]
    last = "dpo" if "dpo" in ids else "sft"
    if last == "dpo":
        assert str(out / "sft" / "adapter.nemo") in json.dumps(manifest["dpo"]["inputs"])
    assert inputs["export"]["adapter"]["path"] == str(out / last / "adapter.nemo")
    assert inputs["export"]["adapter"]["sha256"] == outputs[last]["adapter"]["sha256"]
    assert (out / "export" / "adapter_tp1.nemo").exists()
    if "eval" in ids:  # eval read export's run: its base and adapter, and prep's held-out split
        assert inputs["eval"]["test"]["path"] == str(out / "prep" / "test.jsonl")
        assert (out / "eval" / "report.md").exists() and f"PASS: {last} passed every gate" in logs["eval"]


def test_a_failed_stage_cancels_every_job_after_it(pipelines):
    root, _, (ids, _) = pipelines
    out = root / "bad"
    sft = jobs.wait_done(ids["sft"], 300)
    later = {s: jobs.wait_done(i, 60) for s, i in ids.items() if s not in ("prep", "prep_dpo", "sft")}
    assert jobs.job(ids["prep"])["JobState"] == "COMPLETED"
    assert (sft["JobState"], sft["ExitCode"]) == ("FAILED", "2:0")
    assert {s: (st["JobState"], st["Reason"]) for s, st in later.items()} == {
        s: ("CANCELLED", "DependencyNeverSatisfied") for s in later} and "export" in later
    assert "trainer.devices: the launcher started 1 process(es)" in (out / "logs" / f"sft-{ids['sft']}.out").read_text()
    assert not (out / "sft" / "manifest.json").exists()
    written = {p.name for p in out.iterdir()} | {p.name.split("-")[0] for p in (out / "logs").iterdir()}
    for stage in later:  # never started: no output, no log, not even a temp dir (export's .export.partial)
        assert not {stage, f".{stage}.partial"} & written, (stage, written)
