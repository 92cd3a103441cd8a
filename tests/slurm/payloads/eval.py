"""Stands in for the eval stage: its gates failed (exit 3, as nemo_ft.errors.GateFailure ends a stage)."""
from tests.slurm.payloads import overrides, say

if __name__ == "__main__":
    say(f"gates failed for {overrides().get('from_run')}")
    raise SystemExit(3)
