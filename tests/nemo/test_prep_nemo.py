"""prep's packed .npy through NeMo's own code: GPTSFTPackedDataset must load it unchanged and
train on exactly the labels the unpacked GPTSFTDataset would, and our fill must be >= NeMo's.

Needs the heavy stack (.venv) and `.venv/bin` first on PATH (NeMo may build a C++ helper with
`python3 -m pybind11`)."""
import json
import os
import random

import numpy as np
import pytest

from nemo_ft.data.pack import TokenStore, pack
from nemo_ft.data.config import PrepConfig
from nemo_ft.data.pipeline import run_prep
from nemo_ft.paths import DATA_DIR

pytestmark = pytest.mark.e2e
os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")  # NeMo parses it unguarded (NEMO_CPU.md)

TOKENIZER = str(DATA_DIR / "tiny" / "tokenizer.model")
TEMPLATE = "{input} {output}"


def _nemo_tokenizer():
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer(model_path=TOKENIZER)


def test_packed_round_trip_through_nemo(tmp_path):
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_dataset import (
        GPTSFTDataset, GPTSFTPackedDataset)

    seq = 128
    out = tmp_path / "out"
    cfg = {"inputs": [str(DATA_DIR / "sample" / "sft_train.jsonl"), str(DATA_DIR / "sample" / "sft_validation.jsonl")],
           "out_dir": str(out), "tokenizer": {"model": TOKENIZER}, "seq_length": seq, "pack": True,
           "pack_options": {"splits": ["train", "validation"]},
           "split": {"train": 0.8, "validation": 0.2, "test": 0.0}, "progress": False,
           "template": {"prompt_template": TEMPLATE}}
    m = run_prep(PrepConfig.from_dict(cfg))
    tok = _nemo_tokenizer()
    kw = dict(tokenizer=tok, max_seq_length=seq, prompt_template=TEMPLATE, label_key="output",
              truncation_field="input", add_eos=True, add_bos=False, answer_only_loss=True)

    # NeMo's unpacked reading of our train.jsonl: the reference ids and labels.
    plain = GPTSFTDataset(str(out / "train.jsonl"), index_mapping_dir=str(tmp_path / "idx"), **kw)
    reference = {}
    for i in range(len(plain)):
        ex = plain[i]
        batch = plain.collate_fn([ex])
        n = len(ex["input_ids"]) - 1
        reference.setdefault(tuple(ex["input_ids"]), batch["loss_mask"][0, :n].tolist())

    packed = GPTSFTPackedDataset(str(out / f"packed_{seq}_seed0.npy"), **kw)
    assert len(packed) == m["summary"]["pack"]["train"]["num_packs"]
    n_seqs = 0
    for i in range(len(packed)):
        item = packed[i]
        b = item["seq_boundaries"]
        batch = packed.collate_fn([item])
        cu = batch["cu_seqlens"][0].tolist()
        assert cu[-1] == -1 or cu[-1] <= seq
        mask = batch["loss_mask"][0].tolist()
        pos = 0
        for a, e in zip(b, b[1:]):
            ids = tuple(item["input_ids"][a:e])
            assert ids in reference, "a packed sequence is not an example NeMo tokenizes identically"
            # the same labels trained on as unpacked, and the next example's first token never is
            assert mask[pos:pos + e - a - 1] == reference[ids]
            assert batch["position_ids"][0, pos].item() == 0
            pos += e - a - 1
            n_seqs += 1
    assert n_seqs == m["summary"]["counts"]["train_rows_written"]

    val = GPTSFTPackedDataset(str(out / f"validation_packed_{seq}_seed0.npy"), **kw)
    assert sum(len(val[i]["seq_boundaries"]) - 1 for i in range(len(val))) == m["summary"]["counts"]["splits"]["validation"]
    meta = json.load(open(out / f"packed_{seq}_seed0_metadata.json"))
    assert [d["pack_size"] for d in meta] == [seq, seq]


def test_fill_ratio_at_least_nemo_first_fit_decreasing():
    from nemo.utils.sequence_packing_utils import create_hist, create_packing_strategy, fill_packing_strategy

    rnd = random.Random(0)
    store, dataset = TokenStore(), []
    for _ in range(3000):
        n_ctx, n_ans = rnd.randint(5, 120), rnd.randint(2, 80)
        ids = [rnd.randint(3, 511) for _ in range(n_ctx + n_ans)] + [2]
        store.add(ids, n_ctx)
        dataset.append({"input_ids": ids, "answer_start_idx": n_ctx})
    size = 512
    ours, meta = pack(store, list(range(len(dataset))), size, seed=0, eos_id=2)
    np.random.seed(0)
    sequences, hist = create_hist(np.array(dataset), size)
    for algo in ("first_fit_decreasing", "first_fit_shuffle"):
        assignments, nemo_meta = create_packing_strategy(hist, size, algo)
        assert meta["packing_efficiency"] >= nemo_meta["packing_efficiency"], algo
        assert meta["num_packs"] <= len(assignments)
    # NeMo's own fill of the same examples builds the same per-sequence (ids, loss_mask) pairs we do
    theirs = fill_packing_strategy(assignments, sequences, size, pad_id=2)

    def pairs(packs):
        got = []
        for p in packs:
            b = list(p["seq_start_id"]) + [len(p["input_ids"])]
            got += [(tuple(p["input_ids"][a:e]), tuple(bool(x) for x in p["loss_mask"][a:e])) for a, e in zip(b, b[1:])]
        return sorted(got)
    assert pairs(ours) == pairs(theirs)


# Varied chat rows, one file per format (prep detects the format per file).
CHAT_ROWS = {
    "sharegpt.jsonl": [
        {"system": "You are a terse assistant.", "conversations": [
            {"from": "human", "value": "Largest ocean?"}, {"from": "gpt", "value": "The Pacific."},
            {"from": "human", "value": "And the smallest one?"}, {"from": "gpt", "value": "The Arctic Ocean."}]},
        {"conversations": [{"from": "human", "value": "Line one\nline two\n\n  indented"},
                           {"from": "gpt", "value": "Two lines:\n- one\n- two"}]},
        # starts with the assistant: NeMo masks the first turn whoever speaks it
        {"conversations": [{"from": "gpt", "value": "Hello! Ask me anything."},
                           {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    ],
    "openai.jsonl": [
        {"messages": [{"role": "system", "content": "Réponds en français, s'il te plaît."},
                      {"role": "user", "content": "Quelle est la capitale du Japon ? 日本"},
                      {"role": "assistant", "content": "Tokyo (東京) 🗼."}]},
        {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."},
                      {"role": "user", "content": "Now backwards, ünïcödé."},
                      {"role": "assistant", "content": " 3, 2, 1 — done. "},
                      {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Any time."}]},
    ],
    "sft.jsonl": [{"input": "Translate 'cat' to German.", "output": " Katze"}],
}


def test_chat_lengths_match_nemo_chat_dataset(tmp_path):
    """prep task=chat's per-row length is len(input_ids) of NeMo's GPTSFTChatDataset for that row,
    and its loss mask is NeMo's (assistant turns and their hand-back markers only)."""
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_chat_dataset import GPTSFTChatDataset

    from nemo_ft.data.tokenize import Tokenizer, encode_chat

    inputs = []
    for name, rows in CHAT_ROWS.items():
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        inputs.append({"path": str(tmp_path / name), "weight": len(rows)})  # shares as given: each row once
    out = tmp_path / "out"
    m = run_prep(PrepConfig.from_dict({
        "inputs": inputs, "out_dir": str(out), "task": "chat", "tokenizer": {"model": TOKENIZER},
        "seq_length": 1024, "split": {"train": 1.0, "validation": 0.0, "test": 0.0}, "progress": False,
        "workers": 1}))
    n_rows = sum(len(r) for r in CHAT_ROWS.values())
    assert m["summary"]["counts"]["splits"]["train"] == m["summary"]["counts"]["train_rows_written"] == n_rows
    rows = [json.loads(line) for line in open(out / "train.jsonl", encoding="utf-8")]

    # As MegatronGPTSFTModel._build_dataset builds it for model.data.chat=true (chat_prompt_tokens unset).
    ds = GPTSFTChatDataset(
        file_path=str(out / "train.jsonl"), tokenizer=_nemo_tokenizer(), max_seq_length=4096, min_seq_length=1,
        pad_seq_length_to_mult=16, add_bos=False, add_eos=True, add_sep=False, sep_id=None, max_num_samples=None,
        seed=1234, label_key="answer", answer_only_loss=True, truncation_field="text", pad_to_max_length=False,
        index_mapping_dir=str(tmp_path / "idx"), prompt_template=None, special_tokens=None, is_test=False)
    assert len(ds) == n_rows
    tok = Tokenizer("sentencepiece", TOKENIZER)
    lengths = []
    for i, row in enumerate(rows):
        ids, mask = encode_chat(tok, row)
        item = ds[i]
        assert ids == item["input_ids"].tolist(), row
        assert mask == item["mask"].tolist(), row
        batch = ds.collate_fn([item])
        assert sum(mask) == int(batch["loss_mask"].sum()) > 0  # trained tokens
        lengths.append(len(ids))
        # trained: the assistant turns (after the first turn) — never the system prompt or a user turn
        trained = " ".join(tok.decode([t for t, keep in zip(ids, mask) if keep]).split())
        turns = row["conversations"]
        for j, t in enumerate(turns):
            text = " ".join(t["value"].split())
            assert (text in trained) == (t["from"] == "Assistant" and j > 0), (t, trained)
        assert not row["system"] or row["system"] not in trained
        # ...exactly: each trained span is one answer and its end-of-turn marker, no piece of the
        # "<extra_id_1>Assistant\n" header (a tokenizer that drops "\n" made NeMo train "ant" here)
        spans, run = [], []
        for t, keep in zip(ids + [None], mask + [False]):
            if keep:
                run.append(t)
            elif run:
                spans.append(tok.decode(run))
                run = []
        answers = [t["value"] for j, t in enumerate(turns) if t["from"] == "Assistant" and j > 0]
        assert [sp.strip() for sp in spans] == [f"{a.lstrip()}\n<extra_id_1>" for a in answers], (spans, answers)
    st = json.load(open(out / "stats.json"))["splits"]["train"]
    assert (st["tokens"], st["min"], st["max"]) == (sum(lengths), min(lengths), max(lengths))


def test_packed_chat_round_trip_through_nemo(tmp_path):
    """prep task=chat pack=true: GPTSFTPackedDataset trains every packed conversation on exactly the
    labels NeMo's GPTSFTChatDataset trains it on unpacked (assistant turns only)."""
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_chat_dataset import GPTSFTChatDataset
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_dataset import GPTSFTPackedDataset

    inputs = []
    for name, rows in CHAT_ROWS.items():
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        inputs.append({"path": str(tmp_path / name), "weight": len(rows)})
    out, seq = tmp_path / "out", 512
    m = run_prep(PrepConfig.from_dict({
        "inputs": inputs, "out_dir": str(out), "task": "chat", "tokenizer": {"model": TOKENIZER},
        "seq_length": seq, "pack": True, "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
        "progress": False, "workers": 1}))
    chat = GPTSFTChatDataset(
        file_path=str(out / "train.jsonl"), tokenizer=_nemo_tokenizer(), max_seq_length=4096, min_seq_length=1,
        pad_seq_length_to_mult=16, add_bos=False, add_eos=True, add_sep=False, sep_id=None, max_num_samples=None,
        seed=1234, label_key="answer", answer_only_loss=True, truncation_field="text", pad_to_max_length=False,
        index_mapping_dir=str(tmp_path / "idx"), prompt_template=None, special_tokens=None, is_test=False)
    reference = {}
    for i in range(len(chat)):
        item = chat[i]
        n = len(item["input_ids"]) - 1
        reference[tuple(item["input_ids"].tolist())] = chat.collate_fn([item])["loss_mask"][0, :n].tolist()

    packed = GPTSFTPackedDataset(str(out / f"packed_{seq}_seed0.npy"), tokenizer=_nemo_tokenizer(), max_seq_length=seq,
                                 answer_only_loss=True, prompt_template=TEMPLATE, label_key="output",
                                 truncation_field="input")  # what sft_lora.yaml passes; unused by packs
    assert m["summary"]["counts"]["rejected_total"] == 0
    assert len(packed) == m["summary"]["pack"]["train"]["num_packs"] < len(reference)  # some pack holds several conversations
    n_seqs, seen = 0, set()
    for i in range(len(packed)):
        item = packed[i]
        b = item["seq_boundaries"]
        mask = packed.collate_fn([item])["loss_mask"][0].tolist()
        pos = 0
        for a, e in zip(b, b[1:]):
            ids = tuple(int(x) for x in item["input_ids"][a:e])
            assert ids in reference, "a packed conversation is not one NeMo's chat dataset tokenizes identically"
            assert mask[pos:pos + e - a - 1] == reference[ids]
            assert sum(reference[ids]) > 0
            pos += e - a - 1
            n_seqs += 1
            seen.add(ids)
    assert n_seqs == m["summary"]["counts"]["train_rows_written"] and seen == set(reference)


def test_dpo_nemo_chat_prompts_continue_as_nemo_chat_sft_trains(tmp_path):
    """dpo.prompt_format=nemo_chat: prompt + chosen_response is, character for character, the
    conversation GPTSFTChatDataset builds (and trains on) for the same turns with the chosen answer
    last, so DPO sees the format a data=chat SFT model was trained on."""
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_chat_dataset import (
        _get_header_conversation_type_mask_role)

    from nemo_ft.data.tokenize import CHAT_TOKENS

    rows = [{"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Best pet?"},
                        {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "Purrs.\nLoudly."}],
             "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Best pet?"},
                          {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Why?"},
                          {"role": "assistant", "content": "No idea."}]},
            {"prompt": [{"role": "user", "content": "Capital of Peru?"}], "chosen": "Lima.", "rejected": "Oslo."}]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run_prep(PrepConfig.from_dict({
        "input": str(tmp_path / "pref.jsonl"), "out_dir": str(tmp_path / "out"), "task": "dpo",
        "tokenizer": {"model": TOKENIZER}, "seq_length": 256, "dpo": {"prompt_format": "nemo_chat"},
        "split": {"train": 1.0, "validation": 0.0, "test": 0.0}, "progress": False, "workers": 1}))
    written = [json.loads(line) for line in open(tmp_path / "out" / "train.jsonl", encoding="utf-8")]
    assert len(written) == 2
    roles = {"system": None, "user": "User", "assistant": "Assistant"}
    for row, out in zip(rows, written):
        turns = row.get("prompt") or row["chosen"][:-1]
        system = next((t["content"] for t in turns if t["role"] == "system"), "")
        chosen = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][-1]["content"]
        conv = [{"from": roles[t["role"]], "value": t["content"]} for t in turns if t["role"] != "system"]
        source = {"system": system, "conversations": conv + [{"from": "Assistant", "value": chosen}],
                  "mask": "User", "type": None}
        _, conversation, _, _ = _get_header_conversation_type_mask_role(source, dict(CHAT_TOKENS))
        assert out["prompt"] + out["chosen_response"] == conversation


@pytest.mark.parametrize("dpo", [{}, {"append_eod": True}, {"prompt_format": "nemo_chat"}])
def test_dpo_output_through_nemo_aligners_dataset(tmp_path, dpo):
    """prep task=dpo output read by NeMo-Aligner 0.7.0's own DPOModelDataset: no row trips its
    prompt-prefix assert, none is over length (Aligner would keep it with zero loss), and the
    lengths prep reports are Aligner's."""
    from nemo_aligner.data.nlp.datasets import DPOModelDataset
    from omegaconf import OmegaConf

    fix = DATA_DIR / "fixtures"
    seq = 48
    m = run_prep(PrepConfig.from_dict({
        "inputs": [str(fix / "dpo_prefix.jsonl"), str(fix / "preference.jsonl"), str(fix / "aligner_dpo.jsonl")],
        "out_dir": str(tmp_path / "out"), "task": "dpo", "tokenizer": {"model": TOKENIZER}, "seq_length": seq,
        "dpo": dpo, "split": {"train": 1.0, "validation": 0.0, "test": 0.0}, "progress": False, "workers": 1}))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "train.jsonl", encoding="utf-8")]
    assert len(rows) == m["summary"]["counts"]["train_rows_written"] >= 8
    cfg = OmegaConf.create({"data": {"append_eod": bool(dpo.get("append_eod", False))}})
    ds = DPOModelDataset(cfg=cfg, tokenizer=_nemo_tokenizer(), name="train", data_prefix=str(tmp_path / "out"),
                         documents=np.arange(len(rows)), data=rows, seq_length=seq, seed=1234)
    lengths = []
    for i in range(len(ds)):
        item = ds[i]  # raises AssertionError where "the tokenizer for DPO has merged tokens"
        assert not item["ignore_example"], rows[i]
        assert (item["chosen_labels"] != -100).any() and (item["rejected_labels"] != -100).any()
        lengths.append(max(item["chosen_length"], item["rejected_length"]))
    # stats.json counts each accepted row once (mixing up-samples the written train file)
    once = {json.dumps(r, sort_keys=True): n for r, n in zip(rows, lengths)}
    st = json.load(open(tmp_path / "out" / "stats.json"))["splits"]["train"]
    assert st["count"] == len(once) == m["summary"]["counts"]["accepted"]
    assert (st["tokens"], st["max"]) == (sum(once.values()), max(once.values()))
