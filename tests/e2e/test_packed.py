"""Packed-sequence SFT is correct on the local (no Transformer Engine) attention path.

NeMo's packed path needs TE's THD attention; nemo_ft.runtime gives the local attention a
block-diagonal causal mask instead. Each example in a pack must see only itself: its loss inside
the pack equals its loss run alone.
"""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, read_metrics, run_stage, stage_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_packed")
    run_stage("prep", "input=data/sample/sft_train.jsonl", f"out_dir={out}",
              "template.prompt_template='{input}{output}'", "pack=true", "seq_length=128")
    return out


@pytest.mark.parametrize("mode", ["loop", "mask"])  # the CPU default and the GPU default
def test_packed_losses_equal_unpacked_per_example(packed_data, mode):
    env = {**stage_env(), "NEMO_FT_PACKED_ATTENTION": mode}
    proc = subprocess.run([sys.executable, str(REPO / "tests/e2e/packed_check.py"),
                           str(packed_data / "packed_128_seed0.npy"), "3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    alone, packed, leaky = result["alone"], result["packed"], result["leaky"]
    assert len(alone) >= 15  # three packs of ~8 examples
    for a, p in zip(alone, packed):
        assert p == pytest.approx(a, rel=1e-5, abs=1e-4)
    # Without the boundaries (plain causal attention over the pack) later examples see earlier ones:
    # the check above would fail on that path.
    assert sum(abs(a - l) > 0.5 for a, l in zip(alone, leaky)) >= len(alone) // 2


def test_sft_trains_on_packed_data(packed_data, tmp_path):
    run_stage("sft", f"run.dir={tmp_path}", f"model.data.train_ds.file_names=[{packed_data}/packed_128_seed0.npy]",
              f"model.data.validation_ds.file_names=[{packed_data}/validation.jsonl]",
              "model.data.train_ds.packed_sequence=true", "model.micro_batch_size=1", "model.global_batch_size=2",
              "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.enable_progress_bar=false")
    train, val = read_metrics(tmp_path)
    first = sum(r["reduced_train_loss"] for r in train[:5]) / 5
    last = sum(r["reduced_train_loss"] for r in train[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert val[-1]["val_loss"] < val[0]["val_loss"] + 0.05
    assert (tmp_path / "adapter.nemo").exists()
