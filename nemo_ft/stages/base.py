"""`nemo-ft base`: build the tiny Llama-shaped base .nemo we ship under data/tiny/.

Top to bottom: (1) train a SentencePiece tokenizer on the sample text, if asked; (2) turn the text
into NeMo SFT JSONL with an empty prompt, so that every token is trained on; (3) build a random-init
GPT from the model profile with NeMo's MegatronGPTSFTModel (full-parameter, no PEFT) and pretrain
it briefly with NeMo's trainer; (4) save the .nemo with NeMo's own save. The same code path as SFT,
so the base is a real NeMo checkpoint that SFT, export and eval restore like any other.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import check_parallel, fill_defaults
from nemo_ft.stages import lifecycle
from nemo_ft.stages._metrics import read_metrics


def read_lines(text_files: list[str]) -> list[str]:
    """The non-empty, stripped lines of the sample text files, in order."""
    return [line.strip() for f in text_files for line in Path(f).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def tokenizer_lines(files: list[str]) -> list[str]:
    """What the tokenizer learns from: the lines of text files and, for NeMo SFT .jsonl files, each
    row's input + output as one text, newlines included (so the prompt words and the "\\n" joins
    SFT will see get pieces of their own)."""
    lines = []
    for f in files:
        if f.endswith(".jsonl"):
            rows = [json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
            lines += [(r["input"] + r["output"]).strip() for r in rows]
        else:
            lines += read_lines([f])
    return lines


def train_tokenizer(text_files: list[str], out_prefix: Path, vocab_size: int) -> Path:
    """A BPE SentencePiece model with byte fallback (no <unk> for any UTF-8), deterministic, normalized
    the way Llama 2's is (identity, whitespace kept, a dummy prefix "▁"):
    - so that Hugging Face's LlamaTokenizer(Fast) converted from it encodes exactly as NeMo's
      SentencePieceTokenizer does (the export's hf_base/ tokenizer; tested on every sample string):
      SentencePiece's default nmt_nfkc normalizer and whitespace collapsing have no HF equivalent;
    - so that "\\n" survives (a piece, or its byte): the default normalizer turns it into a space, and
      NeMo's chat dataset, which ends every speaker name with "\\n" and measures the header by
      tokenizing it, then masks one token too few per turn."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_lines(text_files)), model_prefix=str(out_prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2, hard_vocab_limit=False)
    return out_prefix.with_suffix(".model")


def write_pretrain_jsonl(text_files: list[str], run_dir: Path, validation_fraction: float) -> tuple[int, int]:
    lines = read_lines(text_files)
    (run_dir / "data").mkdir(exist_ok=True)
    n_val = max(1, int(len(lines) * validation_fraction))
    for name, part in (("pretrain_train.jsonl", lines[n_val:]), ("pretrain_validation.jsonl", lines[:n_val])):
        with open(run_dir / "data" / name, "w", encoding="utf-8") as out:
            for line in part:
                out.write(json.dumps({"input": "", "output": line}, ensure_ascii=False) + "\n")
    return len(lines) - n_val, n_val


def derive(cfg: DictConfig) -> list[str]:
    notes = fill_defaults(cfg)
    if cfg.tokenizer.train:  # trained below, before the model is built; the model reads it from here
        cfg.tokenizer.model = str(Path(cfg.run.dir).resolve() / "tokenizer.model")
    return notes


def run(cfg: DictConfig) -> Path:
    run = lifecycle.start("base", cfg, checks=lambda c, skip=(): list(check_parallel(c)), derive=derive)
    if cfg.tokenizer.train:
        train_tokenizer(list(cfg.tokenizer.text_files), run.dir / "tokenizer", int(cfg.tokenizer.vocab_size))
    n_train, n_val = write_pretrain_jsonl(list(cfg.run.text_files), run.dir, float(cfg.run.validation_fraction))

    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    model = run.build(MegatronGPTSFTModel, run.nemo_cfg(keep_arch=True))
    run.trainer.fit(model)
    run.check_preempted()
    out, _ = run.save_nemo(model, cfg.run.out)
    if run.rank0:
        train, val = read_metrics(run.metrics)
        summary = {"train_lines": n_train, "validation_lines": n_val, "steps": train[-1]["step"],
                   "train_loss_first": train[0]["reduced_train_loss"], "train_loss_last": train[-1]["reduced_train_loss"],
                   "val_loss_last": val[-1]["val_loss"] if val else None}
        run.finish(summary, outputs={"base": out, "tokenizer": cfg.tokenizer.model if cfg.tokenizer.train else None},
                   inputs={"text": list(cfg.run.text_files), "tokenizer": None if cfg.tokenizer.train else cfg.tokenizer.model},
                   plot_title="tiny base: full-parameter pretraining")
        run.log(f"{n_train} train / {n_val} validation lines; train loss {summary['train_loss_first']:.3f} -> "
                f"{summary['train_loss_last']:.3f}; validation loss {summary['val_loss_last'] or float('nan'):.3f}")
        run.log(f"wrote {out}")
    return out


@stage_main("base", "base")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
