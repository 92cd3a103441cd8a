"""Chat-format SFT: prep task=chat output trained through NeMo's GPTSFTChatDataset (data=chat)."""
import pytest

from tests.conftest import read_metrics, run_stage

pytestmark = pytest.mark.e2e


def _assert_learned(run_dir):
    """Train loss (mean of 5 steps) falls by a quarter and validation loss falls."""
    train, val = read_metrics(run_dir)
    first = sum(r["reduced_train_loss"] for r in train[:5]) / 5
    last = sum(r["reduced_train_loss"] for r in train[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    assert val[-1]["val_loss"] < val[0]["val_loss"]


def test_chat_sft_trains_on_prep_chat_output(tmp_path):
    prep = tmp_path / "prep"
    run_stage("prep", "input=data/sample/sft_train.jsonl", f"out_dir={prep}", "task=chat",
              "split.train=0.8", "split.validation=0.2", "split.test=0")
    files = (f"model.data.train_ds.file_names=[{prep}/train.jsonl]",
             f"model.data.validation_ds.file_names=[{prep}/validation.jsonl]")
    # Chat data without the chat dataset is refused before anything is built.
    refused = run_stage("sft", f"run.dir={tmp_path / 'refused'}", *files, check=False, timeout=120)
    assert refused.returncode == 2 and "model.data.chat: " in refused.stderr and "data=chat" in refused.stderr
    run_dir = tmp_path / "sft"
    run_stage("sft", f"run.dir={run_dir}", "data=chat", *files, "trainer.max_steps=40",
              "trainer.val_check_interval=20", "trainer.enable_progress_bar=false")
    _assert_learned(run_dir)
    assert (run_dir / "adapter.nemo").exists()


def test_packed_chat_sft_trains(tmp_path):
    """prep task=chat pack=true -> sft data=chat packed_sequence=true: NeMo trains on the chat packs
    (GPTSFTPackedDataset) and validates on the unpacked chat file (GPTSFTChatDataset)."""
    prep = tmp_path / "prep"
    run_stage("prep", "input=data/sample/sft_train.jsonl", f"out_dir={prep}", "task=chat", "pack=true",
              "seq_length=128", "split.train=0.8", "split.validation=0.2", "split.test=0")
    run_dir = tmp_path / "sft"
    run_stage("sft", f"run.dir={run_dir}", "data=chat", f"model.data.train_ds.file_names=[{prep}/packed_128_seed0.npy]",
              f"model.data.validation_ds.file_names=[{prep}/validation.jsonl]", "model.data.train_ds.packed_sequence=true",
              "model.micro_batch_size=1", "model.global_batch_size=2", "trainer.max_steps=40",
              "trainer.val_check_interval=20", "trainer.enable_progress_bar=false")
    _assert_learned(run_dir)
