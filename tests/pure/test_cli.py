"""The `nemo-ft` entry point dispatches to stages and explains itself."""
import subprocess
import sys

from nemo_ft import cli


def test_help_lists_every_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("base", "prep", "sft", "plan"):
        assert f"  {stage} " in out


def test_unknown_stage_is_an_error(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_console_script_runs_a_stage():
    proc = subprocess.run([sys.executable, "-m", "nemo_ft.cli", "plan", "model=llama3_8b", "peft=lora",
                           "parallel=tp2", "gpu=h100_80gb", "format=json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"fits": true' in proc.stdout
