"""Prep for task=dpo against NeMo-Aligner's own train-time checks, and the Hugging Face
tokenizer path (a tiny tokenizer trained here, no hub). No NeMo needed."""
import json

import numpy as np
import pytest
import sentencepiece

from nemo_ft.errors import ConfigError
from nemo_ft.artifacts import sha256_file
from nemo_ft.data.config import PrepConfig
from nemo_ft.paths import DATA_DIR
from tests.conftest import TOKENIZER, prep, read_jsonl

FIX = DATA_DIR / "fixtures"


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def aligner_check(encode, row, seq_length, eos_id=None):
    """What NeMo-Aligner 0.7.0's DPOModelDataset.__getitem__ does with a string prompt, written
    out again independently of nemo_ft: (both prefix asserts hold, Aligner's length, fits)."""
    prompt = encode(row["prompt"])
    ok, lengths = True, []
    for key in ("chosen_response", "rejected_response"):
        ids = encode(row["prompt"] + row[key]) + ([eos_id] if eos_id is not None else [])
        ids = ids[:-1]
        ok &= ids[:len(prompt)] == prompt
        lengths.append(len(ids))
    return ok, max(lengths), max(lengths) <= seq_length


# ---------------------------------------------------------------- task=dpo

# Row 4 (a zero-width-space answer) holds with the Llama-style tokenizer (identity normalization: the
# character is kept, as bytes); SentencePiece's old nmt_nfkc normalizer removed it, breaking the prefix.
DPO_GOLDEN = {  # (dpo.prefix_mismatch, over_length) -> (accepted, fixed, truncated, rejects {line: reason})
    ("fix", "truncate"): (5, 2, 1, {6: "dpo_over_length"}),
    ("reject", "reject"): (2, 0, 0, {2: "dpo_prompt_not_token_prefix", 3: "dpo_prompt_not_token_prefix",
                                     5: "dpo_over_length", 6: "dpo_over_length"}),
}


@pytest.mark.parametrize("mode", list(DPO_GOLDEN))
def test_dpo_golden_counts_and_rows_pass_aligners_checks(tmp_path, mode):
    mismatch, over = mode
    accepted, fixed, truncated, rejects = DPO_GOLDEN[mode]
    m = prep(tmp_path, [FIX / "dpo_prefix.jsonl"], task="dpo", dpo={"prefix_mismatch": mismatch}, over_length=over)
    c = m["summary"]["counts"]
    assert (c["in"], c["accepted"], c["dpo_prefix_fixed"], c["truncated"]) == (6, accepted, fixed, truncated)
    assert c["in_equals_accepted_plus_rejected"] and c["rejected_total"] == len(rejects)
    assert m["inputs"][0]["dpo_prefix_fixed"] == fixed
    out = tmp_path / "out"
    got = read_jsonl(out / "rejects.jsonl")
    assert {r["line"]: r["reason"] for r in got} == rejects
    assert all(r["file"].endswith("dpo_prefix.jsonl") and r["detail"] for r in got)
    assert json.load(open(out / "manifest.json"))["summary"]["counts"] == c
    assert json.load(open(out / "stats.json"))["dpo_prefix_fixed"] == fixed
    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
    rows = read_jsonl(out / "train.jsonl")
    for row in rows:
        ok, n, fits = aligner_check(sp.encode_as_ids, row, 64)
        assert ok and fits, row
    assert json.load(open(out / "stats.json"))["splits"]["train"]["max"] == max(
        aligner_check(sp.encode_as_ids, r, 64)[1] for r in rows)


def test_dpo_fix_prepends_one_space_and_truncation_keeps_the_prompts_end(tmp_path):
    prep(tmp_path, [FIX / "dpo_prefix.jsonl"], task="dpo")
    rows = {r["prompt"][-12:]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
    raw = read_jsonl(FIX / "dpo_prefix.jsonl")
    assert not aligner_check(sp.encode_as_ids, raw[1], 64)[0]  # the fixture really breaks Aligner
    assert rows[raw[1]["prompt"][-12:]]["chosen_response"] == " ris."
    assert rows[raw[1]["prompt"][-12:]]["rejected_response"] == " rome."  # already fine: untouched
    assert rows[raw[2]["prompt"][-12:]]["chosen_response"] == " tal."
    assert rows[raw[2]["prompt"][-12:]]["rejected_response"] == " ttal."
    cut = [r for r in rows.values() if r["chosen_response"] == " word59."][0]
    assert raw[4]["prompt"].endswith(cut["prompt"]) and cut["prompt"] != raw[4]["prompt"]
    assert cut["prompt"].endswith("\nQuestion: Last word?\nAnswer:")  # original text: newlines kept
    assert cut["prompt"].startswith("word")  # cut at a word start


class _MergesAcrossSpaces:
    """A tokenizer (one id per character) that glues "!" and the spaces before it to the character
    before those: a mismatch no leading space can fix. SentencePiece always splits at a space."""
    eos_id = 0

    def encode(self, text):
        ids = []
        for i, ch in enumerate(text):
            if ch == "!" and text[:i].rstrip():
                while ids and ids[-1] == ord(" "):
                    ids.pop()
                ids[-1] += 1000
            else:
                ids.append(ord(ch))
        return ids


def test_dpo_prefix_a_space_cannot_fix_is_rejected_with_its_reason():
    from nemo_ft.data.errors import RowReject
    from nemo_ft.data.tokenize import fit_dpo

    row = {"prompt": "Say it:", "chosen_response": "!", "rejected_response": " no."}
    with pytest.raises(RowReject) as err:
        fit_dpo(_MergesAcrossSpaces(), row, 64, truncate=True, fix=True)
    assert err.value.reason == "dpo_prompt_not_token_prefix" and "a leading space does not fix it" in err.value.detail
    fixed, _, _, was_fixed = fit_dpo(_MergesAcrossSpaces(), {**row, "chosen_response": "yes!"}, 64, True, True)
    assert not was_fixed and fixed["chosen_response"] == "yes!"  # holds as given: untouched


def test_dpo_append_eod_counts_the_eos(tmp_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
    row = {"prompt": "Question: Capital of Sweden?\nAnswer:", "chosen_response": " Stockholm.",
           "rejected_response": " Oslo."}
    src = tmp_path / "two.jsonl"
    _write(src, [row, {"prompt": "Q: 1+1?\nA:", "chosen_response": " 2.", "rejected_response": " 3."}])
    n = aligner_check(sp.encode_as_ids, row, 10**6)[1]
    assert aligner_check(sp.encode_as_ids, row, n, eos_id=sp.eos_id())[1] == n + 1
    m = prep(tmp_path / "a", [src], task="dpo", seq_length=n, over_length="reject")
    assert m["summary"]["counts"]["accepted"] == 2
    m = prep(tmp_path / "b", [src], task="dpo", seq_length=n, over_length="reject", dpo={"append_eod": True})
    assert m["summary"]["counts"]["accepted"] == 1 and m["summary"]["counts"]["rejected"] == {"dpo_over_length": 1}
    assert read_jsonl(tmp_path / "b" / "out" / "rejects.jsonl")[0]["line"] == 1


def test_dpo_config_errors():
    base = {"input": str(FIX / "dpo_prefix.jsonl"), "task": "dpo"}
    with pytest.raises(ConfigError, match="dpo.prefix_mismatch"):
        PrepConfig.from_dict({**base, "dpo": {"prefix_mismatch": "maybe"}})
    with pytest.raises(ConfigError, match="unknown keys"):
        PrepConfig.from_dict({**base, "dpo": {"prefix": "fix"}})
    assert PrepConfig.from_dict(base).dpo_prefix_mismatch == "fix"
    with pytest.raises(ConfigError, match="dpo.prompt_format"):
        PrepConfig.from_dict({**base, "dpo": {"prompt_format": "chatml"}})


def test_dpo_nemo_chat_prompt_format_is_aligners(tmp_path):
    """dpo.prompt_format=nemo_chat writes what NeMo-Aligner's DPO guide shows for models SFT-trained
    on NeMo's chat template; rows already in that markup are left alone; every row passes
    Aligner's prefix assert with the tiny tokenizer (its prompt ends in the "\n" piece)."""
    src = tmp_path / "pref.jsonl"
    _write(src, [
        {"prompt": "Which year was the Magna Carta signed?", "chosen": "1215",
         "rejected": "I refuse to answer this question."},
        {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Best pet?"},
                    {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Why?"},
                    {"role": "assistant", "content": "Purrs."}],
         "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Best pet?"},
                      {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Why?"},
                      {"role": "assistant", "content": "No idea."}]},
    ])
    aligner = tmp_path / "aligner.jsonl"  # one file per format: detection is per file
    _write(aligner, [{"prompt": "<extra_id_0>System\n\n<extra_id_1>User\n2*10=?\n<extra_id_1>Assistant\n",
                      "chosen_response": "20\n<extra_id_1>",
                      "rejected_response": "I refuse to answer this question.\n<extra_id_1>"}])
    m = prep(tmp_path, [{"path": str(src), "weight": 2}, {"path": str(aligner), "weight": 1}], task="dpo",
             dpo={"prompt_format": "nemo_chat"}, seq_length=256)
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert m["summary"]["counts"]["rejected_total"] == 0 and m["summary"]["counts"]["dpo_prefix_fixed"] == 0
    assert rows[0] == {  # the guide's own example line
        "prompt": "<extra_id_0>System\n\n<extra_id_1>User\nWhich year was the Magna Carta signed?\n<extra_id_1>Assistant\n",
        "chosen_response": "1215\n<extra_id_1>", "rejected_response": "I refuse to answer this question.\n<extra_id_1>"}
    assert rows[1]["prompt"] == ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nBest pet?\n<extra_id_1>Assistant\n"
                                 "A cat.\n<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\n")
    assert (rows[1]["chosen_response"], rows[1]["rejected_response"]) == ("Purrs.\n<extra_id_1>", "No idea.\n<extra_id_1>")
    assert rows[2] == {"prompt": "<extra_id_0>System\n\n<extra_id_1>User\n2*10=?\n<extra_id_1>Assistant\n",
                       "chosen_response": "20\n<extra_id_1>",
                       "rejected_response": "I refuse to answer this question.\n<extra_id_1>"}
    encode = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER).encode
    assert all(aligner_check(encode, r, 256)[0] for r in rows)


# ---------------------------------------------------------------- tokenizer.library=huggingface


def _hf_tokenizer(path, eos=True):
    """A byte-level BPE trained on the shipped pretraining sample, saved as transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train([str(DATA_DIR / "sample" / "pretrain.txt")],
             trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    special = {"bos_token": "<s>", "eos_token": "</s>"} if eos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", **special)
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tok")
    return path, _hf_tokenizer(path)


def test_huggingface_tokenizer_lengths_eos_and_manifest(tmp_path, hf_tok, monkeypatch):
    import nemo_ft.data.pipeline as pl

    path, fast = hf_tok
    src = tmp_path / "sft.jsonl"
    rows = [{"input": f"Question: What is the capital of country {i}?\nAnswer:", "output": f" City {i}."}
            for i in range(40)]
    _write(src, rows)
    hf = {"library": "huggingface", "model": str(path)}
    monkeypatch.setattr(pl, "_workers", lambda cfg: 2)  # forked workers load the HF tokenizer too
    m = prep(tmp_path, [src], tokenizer=hf, pack=True, dedup={"near": False}, seq_length=128)
    t = m["summary"]["tokenizer"]
    assert (t["library"], t["model"], t["sha256"]) == ("huggingface", str(path), sha256_file(path / "tokenizer.json"))
    assert (t["bos_id"], t["eos_id"], t["pad_id"]) == (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id)
    assert t["vocab_size"] == len(fast) and m["summary"]["counts"]["accepted"] == 40 and m["summary"]["workers"] == 2

    # NeMo's "{input} {output}" with a space-sensitive tokenizer: input, " output" (stripped), EOS;
    # NeMo's HF tokenizer encodes with tokenize() + convert_tokens_to_ids (no special tokens).
    enc = lambda s: fast.convert_tokens_to_ids(fast.tokenize(s))
    want = sorted(len(enc(r["input"]) + enc(" " + r["output"].strip(" "))) + 1 for r in rows)
    packs = np.load(tmp_path / "out" / "packed_128_seed0.npy", allow_pickle=True)
    got = []
    for p in packs:
        bounds = list(p["seq_start_id"]) + [len(p["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            ids = p["input_ids"][a:b]
            assert ids[-1] == fast.eos_token_id and fast.eos_token_id not in ids[:-1]
            assert fast.bos_token_id not in ids  # add_bos=false
            got.append(len(ids))
    assert sorted(got) == want
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["splits"]["train"]["tokens"] == sum(want)


def test_huggingface_dpo_prefix_fix(tmp_path, hf_tok):
    # Byte-level BPE: a prompt ending in a space tokenizes that space alone, but prompt+response
    # glues it to the response's first word; a second space keeps the prompt's tokens intact.
    path, fast = hf_tok
    src = tmp_path / "dpo.jsonl"
    rows = [{"prompt": "The capital of Sweden is ", "chosen_response": "Stockholm.", "rejected_response": "Oslo."}]
    _write(src, rows)
    enc = lambda s: fast.convert_tokens_to_ids(fast.tokenize(s))
    assert not aligner_check(enc, rows[0], 64)[0]
    m = prep(tmp_path, [src], task="dpo", tokenizer={"library": "huggingface", "model": str(path)})
    assert m["summary"]["counts"]["dpo_prefix_fixed"] == 1
    row = read_jsonl(tmp_path / "out" / "train.jsonl")[0]
    assert row["chosen_response"] == " Stockholm." and aligner_check(enc, row, 64)[0]


def test_huggingface_tokenizer_without_eos_is_a_config_error(tmp_path):
    _hf_tokenizer(tmp_path / "tok", eos=False)
    with pytest.raises(ConfigError, match="template.add_eos"):
        prep(tmp_path, [FIX / "prompt_completion.jsonl"], tokenizer={"library": "huggingface",
                                                                      "model": str(tmp_path / "tok")})


def test_rm_task_writes_aligners_alternating_pairs_and_keeps_them_together(tmp_path):
    """task=rm: NeMo-Aligner's reward-model JSONL, chosen then rejected {"text": prompt + response}; an
    over-length pair is rejected whole (Aligner would skip it and its neighbour); mixing repeats pairs."""
    src = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": f" yes {i}.", "rejected": f" no {i}."} for i in range(6)]
    rows.append({"prompt": "Q long?", "chosen": " " + " ".join(["word"] * 80), "rejected": " no."})
    _write(src, rows)
    m = prep(tmp_path / "a", [src], task="rm", seq_length=64)
    c = m["summary"]["counts"]
    assert (c["in"], c["accepted"], c["rejected"]) == (7, 6, {"rm_over_length": 1})
    lines = read_jsonl(tmp_path / "a" / "out" / "train.jsonl")
    assert len(lines) == 12 and all(set(r) == {"text"} for r in lines)
    assert [r["text"] for r in lines[:2]] == ["Q0? yes 0.", "Q0? no 0."]
    assert all(a["text"].split()[-1] == b["text"].split()[-1] and "yes" in a["text"] and "no" in b["text"]
               for a, b in zip(lines[0::2], lines[1::2]))
    other = tmp_path / "other.jsonl"
    _write(other, [{"prompt": f"P{i}?", "chosen": f" a {i}.", "rejected": f" b {i}."} for i in range(2)])
    m = prep(tmp_path / "b", [{"path": str(src), "weight": 0.5}, {"path": str(other), "weight": 0.5}], task="rm",
             seq_length=64)
    lines = read_jsonl(tmp_path / "b" / "out" / "train.jsonl")
    assert len(lines) == 2 * m["summary"]["counts"]["train_rows_written"] > 16  # the small file was repeated...
    assert all(" a " in a["text"] and " b " in b["text"] or "yes" in a["text"] and "no" in b["text"]
               for a, b in zip(lines[0::2], lines[1::2]))  # ...as whole pairs, never split
    with pytest.raises(ConfigError, match="pack"):
        PrepConfig.from_dict({"input": str(src), "task": "rm", "pack": True})
