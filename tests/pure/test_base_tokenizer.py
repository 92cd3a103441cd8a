"""The shipped tokenizer (data/tiny/tokenizer.model) is what `nemo-ft base tokenizer.train=true`
trains from conf/base.yaml's defaults: anyone can rebuild it, and a change to the recipe shows."""
from hydra import compose, initialize_config_dir

import nemo_ft.config  # noqa: F401  (registers ${repo:})
from nemo_ft.paths import CONF_DIR, DATA_DIR
from nemo_ft.stages.base import train_tokenizer


def _vocab(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_conf_defaults_retrain_the_shipped_tokenizer(tmp_path):
    import sentencepiece as spm

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("base")
    model = train_tokenizer(list(cfg.tokenizer.text_files), tmp_path / "tokenizer", int(cfg.tokenizer.vocab_size))
    shipped = DATA_DIR / "tiny" / "tokenizer.model"
    assert _vocab(model.with_suffix(".vocab")) == _vocab(shipped.with_suffix(".vocab"))  # pieces and scores
    ours, theirs = spm.SentencePieceProcessor(model_file=str(model)), spm.SentencePieceProcessor(model_file=str(shipped))
    text = "Question: What is the capital of Peru?\nAnswer: Lima. Ünïcode 東京 3+4=7"
    assert ours.encode(text) == theirs.encode(text)
    # Newlines and spaces survive a round trip (NeMo's chat masks count "\n"; HF's Llama tokenizer keeps them).
    for s in ("a\nb", "Question: X?\nAnswer:", "  two  spaces", "\n\nlead"):
        assert theirs.decode(theirs.encode(s)) == s
    # Why the SFT samples are in the recipe: without them the prompt's words fall apart into bytes.
    pretrain_only = train_tokenizer([cfg.tokenizer.text_files[0]], tmp_path / "pretrain_only", int(cfg.tokenizer.vocab_size))
    prompt = "Question: What is the capital of Peru?\nAnswer:"
    assert len(theirs.encode(prompt)) < len(spm.SentencePieceProcessor(model_file=str(pretrain_only)).encode(prompt))
