"""`nemo-ft base` builds a Llama-shaped base through NeMo that later stages restore like any other."""
import pytest

from nemo_ft.nemo_archive import read_config
from tests.conftest import read_metrics, run_stage

pytestmark = pytest.mark.e2e


def test_base_builds_a_llama_shaped_nemo_that_learns_and_restores(tmp_path):
    run_dir = tmp_path / "base"
    run_stage("base", f"run.dir={run_dir}", "trainer.max_steps=40", "trainer.val_check_interval=20",
              "trainer.enable_progress_bar=false", "tokenizer.train=true")
    nemo = run_dir / "tiny_llama.nemo"
    conf = read_config(nemo)
    # What an HF Llama export needs, and what splits evenly for TP=2 and PP=2.
    assert conf["normalization"] == "rmsnorm" and conf["activation"] == "fast-swiglu"
    assert conf["position_embedding_type"] == "rope" and conf["bias"] is False
    assert conf["share_embeddings_and_output_weights"] is False
    assert (conf["num_attention_heads"], conf["num_query_groups"], conf["num_layers"]) == (4, 2, 2)
    # The tokenizer trained in this run is the one packed into the .nemo.
    assert (run_dir / "tokenizer.model").exists()
    train, val = read_metrics(run_dir)
    assert train[-1]["reduced_train_loss"] < train[0]["reduced_train_loss"] - 1.0
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    # Restore it with the SFT stage's own path (no adapter): same validation loss as at the end.
    proc = run_stage("sft", f"run.dir={tmp_path / 'check'}", f"model.restore_from_path={nemo}", "peft=none",
                     "run.validate_only=true", "trainer.enable_progress_bar=false", "model.data.train_ds.add_bos=true",
                     "model.micro_batch_size=8",  # NeMo averages per micro batch: batch as the base run did
                     f"model.data.validation_ds.file_names=[{run_dir / 'data/pretrain_validation.jsonl'}]")
    line = [ln for ln in proc.stdout.splitlines() if "validation loss of base +" in ln][-1]
    assert float(line.rsplit(":", 1)[1]) == pytest.approx(val[-1]["val_loss"], abs=1e-4)


def test_base_build_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        run_stage("base", f"run.dir={tmp_path / name}", "trainer.max_steps=15", "trainer.val_check_interval=15",
                  "trainer.enable_progress_bar=false")
        runs.append(read_metrics(tmp_path / name)[0])
    assert [(r["reduced_train_loss"], r["grad_norm"]) for r in runs[0]] == \
        [(r["reduced_train_loss"], r["grad_norm"]) for r in runs[1]]
