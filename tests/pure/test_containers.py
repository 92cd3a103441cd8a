"""containers/: what can be checked without building the image (CI has no Docker or GPU). The
Dockerfile's own pin check fails a build whose base drifted; these keep the file honest."""
import re
import tomllib

from tests.conftest import REPO

DOCKERFILE = (REPO / "containers" / "Dockerfile").read_text()
# The stack the image must bring (never installed over it): CUDA builds that pip would replace with
# the wrong ones.
IMAGE_OWNED = ("torch", "nemo_toolkit", "nemo-toolkit", "megatron-core", "megatron_core", "apex",
               "transformer-engine", "transformer_engine", "lightning", "pytorch-lightning")


def _pins() -> dict:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["nemo"]
    return dict(d.split("==") for d in deps if "==" in d)


def _instructions() -> list[str]:
    """Dockerfile instructions with continuation lines joined (a heredoc body stays with its RUN)."""
    return [" ".join(chunk.split()) for chunk in re.split(r"\n(?=[A-Z]+ )", DOCKERFILE.replace("\\\n", " "))]


def test_base_is_an_ngc_nemo_tag():
    assert re.search(r"^ARG BASE=nvcr\.io/nvidia/nemo:\d{2}\.\d{2}(\.\d+)?$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", DOCKERFILE, re.M)


def test_pip_never_touches_the_image_stack():
    installs = [cmd for ins in _instructions() if ins.startswith("RUN ")
                for cmd in re.split(r"&&", ins) if "pip install" in cmd]
    assert installs
    for cmd in installs:
        args = cmd.split()[cmd.split().index("install") + 1:]
        packages = [a for a in args if not a.startswith("-")]
        assert not [p for p in packages if re.split(r"[=<>\[]", p)[0].lower() in IMAGE_OWNED], cmd
        if "." in packages:  # nemo-ft itself: its dependencies would pull a CPU torch, another NeMo
            assert "--no-deps" in args, cmd
    assert any("--no-deps" in c and " -e ." in c for c in installs)


def test_the_build_checks_the_image_against_our_pins():
    pins = _pins()
    nemo, mcore = (".".join(pins[k].split(".")[:2]) for k in ("nemo_toolkit", "megatron-core"))
    assert f'assert nemo.startswith("{nemo}")' in DOCKERFILE
    assert f'assert mcore.startswith("{mcore}")' in DOCKERFILE


def test_the_image_holds_what_the_jobs_and_the_smoke_run():
    copied = set(re.findall(r"^COPY (\S+) ", DOCKERFILE, re.M))
    assert {"nemo_ft", "conf", "data", "slurm", "scripts"} <= copied


def test_smoke_script_builds_then_runs_the_three_checks_in_the_image():
    smoke = (REPO / "containers" / "smoke.sh").read_text()
    steps = ["docker build -f containers/Dockerfile", "run nemo-ft sft --cfg job", "run nemo-ft plan",
             "run bash scripts/gpu_smoke.sh"]
    positions = [smoke.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "--gpus all" in smoke


def test_enroot_notes_give_the_sqsh_path_the_jobs_take():
    notes = (REPO / "containers" / "README.md").read_text()
    assert "enroot import dockerd://nemo-ft:dev" in notes and "nemo-ft+dev.sqsh" in notes
    assert "NEMO_FT_CONTAINER=/shared/containers/nemo-ft+dev.sqsh sbatch slurm/sft_lora.sh" in notes
