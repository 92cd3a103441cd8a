"""Data prep core: golden counts on the messy fixtures, formats, split stability, mixing,
packing invariants, atomic/accounted outputs, and the CLI's one-line errors. No NeMo needed."""
import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nemo_ft.errors import ConfigError
from nemo_ft.data import formats
from nemo_ft.data.errors import PrepError
from nemo_ft.artifacts import sha256_file
from nemo_ft.data.pack import TokenStore, best_fit_decreasing, pack
from nemo_ft.data.config import PrepConfig
from nemo_ft.data.pipeline import run_prep
from nemo_ft.paths import DATA_DIR, REPO_ROOT
from tests.conftest import ALL_TRAIN, TOKENIZER, outputs_by_path, prep, read_jsonl

FIX = DATA_DIR / "fixtures"


GOLDEN = {  # file -> (lines, accepted, rejected by reason)
    "sft_messy.jsonl": (22, 12, {"blank_line": 1, "invalid_utf8": 1, "invalid_json": 1, "not_object": 1,
                                 "missing_key": 1, "empty_value": 1, "wrong_type": 1, "duplicate": 1,
                                 "near_duplicate": 1, "too_long": 1}),
    "alpaca.jsonl.gz": (5, 4, {"missing_key": 1}),
    "prompt_completion.jsonl": (4, 3, {"wrong_type": 1}),
    "openai_chat.jsonl": (5, 3, {"bad_conversation": 2}),
    "sharegpt.jsonl": (3, 2, {"empty_value": 1}),
}


def test_golden_counts_on_fixture_corpus(tmp_path):
    files = [FIX / f for f in GOLDEN]
    m = prep(tmp_path, files)
    out = tmp_path / "out"
    for inp, (name, (lines, accepted, rejected)) in zip(m["inputs"], GOLDEN.items()):
        assert (inp["lines"], inp["accepted"], inp["rejected"]) == (lines, accepted, rejected), name
        assert inp["sha256"] == sha256_file(FIX / name)
    c = m["summary"]["counts"]
    assert c["in"] == 39 and c["accepted"] == 24 and c["rejected_total"] == 15
    assert c["in_equals_accepted_plus_rejected"] and c["truncated"] == 1
    assert [i["format"] for i in m["inputs"]] == ["nemo_sft", "alpaca", "prompt_completion", "openai", "sharegpt"]
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == c["train_rows_written"] and all(set(r) == {"input", "output"} for r in train)
    assert any("Österreich" in r["input"] for r in train) and any("☕" in r["output"] for r in train)
    assert not any("\r" in r["input"] + r["output"] for r in train)  # CRLF stripped
    assert not train[0]["input"].startswith("\ufeff")  # BOM stripped
    rejects = read_jsonl(out / "rejects.jsonl")
    assert len(rejects) == 15 and all({"file", "line", "reason", "detail", "raw"} <= set(r) for r in rejects)
    messy = {r["line"]: r["reason"] for r in rejects if r["file"].endswith("sft_messy.jsonl")}
    assert messy == {4: "invalid_json", 5: "not_object", 6: "invalid_utf8", 7: "missing_key", 8: "empty_value",
                     9: "wrong_type", 10: "blank_line", 11: "duplicate", 13: "near_duplicate", 14: "too_long"}
    dup = [r for r in rejects if r["reason"] == "duplicate"][0]
    assert dup["detail"].endswith("sft_messy.jsonl:1")
    outputs = outputs_by_path(m)
    for name, meta in outputs.items():  # every output hashed, nothing half-written left behind
        assert meta["sha256"] == sha256_file(out / name)
    assert {"train.jsonl", "validation.jsonl", "test.jsonl", "rejects.jsonl", "stats.json", "lengths.png"} <= set(outputs)
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert m["summary"]["tokenizer"]["sha256"] == sha256_file(TOKENIZER) and m["config"]["seq_length"] == 64
    assert json.load(open(out / "manifest.json"))["summary"]["counts"] == c


def test_preference_fixtures_for_dpo(tmp_path):
    m = prep(tmp_path, [FIX / "preference.jsonl", FIX / "aligner_dpo.jsonl"], task="dpo")
    assert m["summary"]["counts"]["rejected"] == {"missing_key": 1, "dpo_prompt_mismatch": 1, "chosen_equals_rejected": 1}
    rows = [r for s in ("train", "validation", "test") for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    assert all(set(r) == {"prompt", "chosen_response", "rejected_response"} for r in rows)
    assert {"prompt": "User: Best pet?\nAssistant:", "chosen_response": " A cat.",
            "rejected_response": " A rock."} in rows
    # TRL style: the prompt repeated as the messages' user turn (whitespace aside) is one prompt
    assert {"prompt": "Tallest animal?", "chosen_response": " The giraffe.", "rejected_response": " The ant."} in rows
    mismatch = [r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl") if r["reason"] == "dpo_prompt_mismatch"]
    assert len(mismatch) == 1 and "Best fruit" in mismatch[0]["raw"] and mismatch[0]["line"] == 6
    assert "'chosen' and 'rejected' continue different conversations" in mismatch[0]["detail"]


def test_chat_task_writes_nemo_chat(tmp_path):
    prep(tmp_path, [FIX / "sharegpt.jsonl", FIX / "sft_messy.jsonl"], task="chat", seq_length=256)
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert all(set(r) == {"system", "conversations", "mask", "type"} for r in rows)
    assert rows[0]["system"] == "You are helpful." and rows[0]["conversations"][0] == {"from": "User", "value": "Largest ocean?"}


def test_chat_length_is_nemo_rendering_exactly(tmp_path):
    # encode_chat is checked token for token against NeMo in tests/test_prep_nemo.py; here: prep
    # uses that exact length for the cut-off (the old estimate was about half of it).
    from nemo_ft.data.tokenize import Tokenizer, encode_chat
    row = {"system": "Be brief.", "conversations": [{"from": "User", "value": "Largest ocean?"},
                                                    {"from": "Assistant", "value": "The Pacific."}],
           "mask": "User", "type": None}
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"system": row["system"], "conversations": row["conversations"]}) + "\n")
    ids, mask = encode_chat(Tokenizer("sentencepiece", TOKENIZER), row)
    assert prep(tmp_path, [src], task="chat", seq_length=len(ids))["summary"]["counts"]["accepted"] == 1
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == [row]
    with pytest.raises(PrepError, match="all 1 lines were rejected"):
        prep(tmp_path, [src], task="chat", seq_length=len(ids) - 1)
    trained = Tokenizer("sentencepiece", TOKENIZER).decode([i for i, keep in zip(ids, mask) if keep])
    assert "The Pacific." in trained and "ocean" not in trained and "brief" not in trained


@pytest.mark.parametrize("obj,fmt", [
    ({"input": "a", "output": "b"}, "nemo_sft"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"instruction": "a", "context": "c", "response": "b"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}]}, "openai"),
    ({"conversations": [{"from": "human", "value": "a"}], "system": ""}, "sharegpt"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
    ({"prompt": "a", "chosen_response": "b", "rejected_response": "c"}, "aligner_dpo"),
    ({"question": "a"}, None),
])
def test_detect_every_format(obj, fmt):
    assert formats.detect_format(obj) == fmt


def test_format_forced(tmp_path):
    m = prep(tmp_path, [FIX / "prompt_completion.jsonl"], format="prompt_completion")
    assert m["inputs"][0]["format"] == "prompt_completion"
    with pytest.raises(ConfigError, match="format"):
        prep(tmp_path, [FIX / "prompt_completion.jsonl"], format="nonsense")


def _qa_rows(start, n):
    return [{"input": f"Question: what is {i} plus {i * 7 % 13} apples?\nAnswer:", "output": f" {i + i * 7 % 13} q{i}."}
            for i in range(start, start + n)]


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_split_is_stable_when_rows_are_appended(tmp_path):
    split = {"train": 0.6, "validation": 0.2, "test": 0.2}
    src = tmp_path / "a.jsonl"
    _write(src, _qa_rows(0, 150))
    prep(tmp_path / "r1", [src], split=split)
    before = {s: [json.dumps(r) for r in read_jsonl(tmp_path / "r1" / "out" / f"{s}.jsonl")] for s in split}
    _write(src, _qa_rows(1000, 100) + _qa_rows(0, 150))  # new rows first: positions all change
    prep(tmp_path / "r2", [src], split=split)
    after = {s: set(json.dumps(r) for r in read_jsonl(tmp_path / "r2" / "out" / f"{s}.jsonl")) for s in split}
    for s in split:
        assert before[s] and set(before[s]) <= after[s], s
    assert all(len(before[s]) > 10 for s in split)  # the ratios are roughly honoured


def test_mixing_weights_reach_target_shares(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, _qa_rows(0, 100))
    _write(b, _qa_rows(500, 20))
    m = prep(tmp_path, [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}])
    ra, rb = m["summary"]["mix"][str(a)], m["summary"]["mix"][str(b)]
    assert ra["written"] == 100 and rb["written"] == 43  # nothing dropped; b up-sampled x2.15
    assert abs(rb["achieved_share"] - 0.3) < 0.01
    assert m["summary"]["counts"]["train_rows_written"] == 143 and m["summary"]["counts"]["accepted"] == 120
    m = prep(tmp_path / "t", [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 0.5}], mix={"total": 30})
    assert m["summary"]["counts"]["train_rows_written"] == 30 and m["summary"]["counts"]["train_rows_downsampled"] == 85 + 5


def test_over_length_truncate_or_reject(tmp_path):
    src = tmp_path / "long.jsonl"
    _write(src, [{"input": "Question: " + " ".join(f"w{i}" for i in range(100)) + "?\nAnswer:", "output": " Yes."}])
    m = prep(tmp_path / "t", [src], seq_length=32)
    row = read_jsonl(tmp_path / "t" / "out" / "train.jsonl")[0]
    assert m["summary"]["counts"]["truncated"] == 1 and row["output"] == " Yes." and len(row["input"]) < 200
    assert m["summary"]["counts"]["splits"]["train"] == 1
    with pytest.raises(PrepError, match="no examples left"):
        prep(tmp_path / "r", [src], seq_length=32, over_length="reject")
    assert read_jsonl(tmp_path / "r" / "out" / "rejects.jsonl")[0]["reason"] == "too_long"
    assert not (tmp_path / "r" / "out" / "train.jsonl").exists()  # empty result: error, not an empty file


def test_template_rules():
    with pytest.raises(ConfigError, match="must end with"):
        PrepConfig.from_dict({"input": str(FIX / "sharegpt.jsonl"), "template": {"prompt_template": "{output} {input}"}})
    with pytest.raises(ConfigError, match="truncation_field"):
        PrepConfig.from_dict({"input": str(FIX / "sharegpt.jsonl"), "template": {"truncation_field": "context"}})
    with pytest.raises(ConfigError, match="split"):
        PrepConfig.from_dict({"input": str(FIX / "sharegpt.jsonl"), "split": {"train": 0.5, "test": 0.2}})
    with pytest.raises(ConfigError, match="pack needs task=sft or task=chat"):
        PrepConfig.from_dict({"input": str(FIX / "sharegpt.jsonl"), "task": "dpo", "pack": True})
    assert PrepConfig.from_dict({"input": str(FIX / "sharegpt.jsonl"), "task": "chat", "pack": True}).pack


def _ffd_bins(sizes, cap):  # NeMo's first_fit_decreasing, restated (NeMo itself is tested in e2e)
    bins = []
    for s in sorted(sizes, reverse=True):
        for b in bins:
            if sum(b) + s <= cap:
                b.append(s)
                break
        else:
            bins.append([s])
    return bins


def test_best_fit_decreasing_at_least_as_tight_as_ffd():
    rnd = random.Random(0)
    for trial in range(20):
        sizes = [rnd.randint(1, 200) for _ in range(rnd.randint(1, 400))]
        bins = best_fit_decreasing(sizes, 256)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in b) <= 256 for b in bins)
        assert len(bins) <= len(_ffd_bins(sizes, 256))


def test_packs_keep_examples_whole_and_mask_only_responses():
    rnd = random.Random(1)
    store, spans = TokenStore(), []
    for i in range(300):
        n_ctx, n_ans = rnd.randint(1, 40), rnd.randint(1, 30)
        ids = [rnd.randint(3, 511) for _ in range(n_ctx + n_ans)] + [2]
        store.add(ids, n_ctx)
        spans.append((tuple(ids), n_ctx))
    rows = list(range(300)) + [5, 5, 17]  # repeats, as mixing produces
    packs, meta = pack(store, rows, 128, seed=3, eos_id=2)
    seen = []
    for p in packs:
        ids, mask, starts = p["input_ids"], p["loss_mask"], p["seq_start_id"]
        assert isinstance(starts, list) and starts[0] == 0 and len(mask) == len(ids)
        bounds = starts + [len(ids)]
        assert sum(b - a - 1 for a, b in zip(bounds, bounds[1:])) <= 128  # NeMo's budget: L-1 per sequence
        for a, b in zip(bounds, bounds[1:]):
            seq = tuple(ids[a:b])
            n_ctx = dict(spans)[seq]
            seen.append(seq)
            for j in range(a, b):
                # shifted mask: position j trains the label ids[j+1], which must be a response token
                # of the same example (never a prompt token, never the next example's first token)
                assert bool(mask[j]) == (a + n_ctx <= j + 1 < b)
    assert sorted(seen) == sorted(spans[r][0] for r in rows)
    assert meta["num_sequences"] == 303 and 0 < meta["packing_efficiency"] <= 100


def test_pack_writes_nemo_named_file(tmp_path):
    m = prep(tmp_path, [DATA_DIR / "sample" / "sft_train.jsonl"], pack=True, seq_length=128, seed=7)
    out = tmp_path / "out"
    arr = np.load(out / "packed_128_seed7.npy", allow_pickle=True)
    assert len(arr) == m["summary"]["pack"]["train"]["num_packs"] and set(arr[0]) == {"input_ids", "loss_mask", "seq_start_id"}
    assert sum(len(p["seq_start_id"]) for p in arr) == m["summary"]["counts"]["train_rows_written"]
    meta = json.load(open(out / "packed_128_seed7_metadata.json"))
    assert meta[0]["pack_size"] == 128 and "packed_128_seed7.npy" in outputs_by_path(m)


def test_parallel_workers_give_identical_output(tmp_path):
    src = tmp_path / "big.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in _qa_rows(0, 3000))
    c = dict(split={"train": 0.8, "validation": 0.1, "test": 0.1}, chunk_size=200, pack=True, seq_length=64)
    m1 = prep(tmp_path / "a", [src], workers=1, **c)
    cfg = PrepConfig.from_dict({"inputs": [str(src)], "out_dir": str(tmp_path / "b" / "out"),
                                "tokenizer": {"model": TOKENIZER}, "progress": False, "workers": 2, **c})
    import nemo_ft.data.pipeline as pl
    orig = pl._workers
    pl._workers = lambda cfg: 2  # the fixture is below the size at which a pool pays off
    try:
        m2 = run_prep(cfg)
    finally:
        pl._workers = orig
    assert m2["summary"]["workers"] == 2
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "rejects.jsonl", "packed_64_seed0.npy"):
        assert outputs_by_path(m1)[name]["sha256"] == outputs_by_path(m2)[name]["sha256"], name


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nemo_ft.cli", "prep", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env)


def test_cli_runs_with_input_and_out_dir(tmp_path):
    r = _cli(f"input={DATA_DIR / 'sample' / 'sft_train.jsonl'}", f"out_dir={tmp_path}", "progress=false")
    assert r.returncode == 0, r.stderr
    assert "96 rows in" in r.stdout and (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("args,expect", [
    (["input=data/fixtures/preference.jsonl"], "data/fixtures/preference.jsonl:1: task: preference rows"),
    (["input=data/fixtures/unknown_format.jsonl"], "data/fixtures/unknown_format.jsonl: format: cannot detect"),
    (["input=data/fixtures/missing.jsonl"], "inputs[0].path: no such file"),
    (["input=data/fixtures/sft_messy.jsonl", "over_length=maybe"], "over_length: expected truncate or reject"),
    (["input=data/fixtures/sft_messy.jsonl", "tokenizer.model=/nope.model"], "tokenizer.model: no such file"),
])
def test_cli_errors_are_one_readable_line(tmp_path, args, expect):
    r = _cli(*args, f"out_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("nemo-ft prep: ") and " error" in r.stderr.splitlines()[0], r.stderr
    assert expect in r.stderr, r.stderr


@pytest.mark.parametrize("row, ok", [
    ({"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "user", "content": "Hi?"},
      {"role": "assistant", "content": "Hello."}], "rejected": "Go away."}, True),
    ({"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "user", "content": "Bye?"},
      {"role": "assistant", "content": "Hello."}], "rejected": "Go away."}, False),
    ({"prompt": "Which?", "chosen": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B."}]}, False),
    ({"prompt": "User: Which?\nAssistant:", "chosen": [{"role": "user", "content": "Which?"},
      {"role": "assistant", "content": "A."}], "rejected": "B."}, True),  # the rendered prefix itself
    ({"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                 {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}, False),  # system differs
])
def test_preference_prompt_carried_by_messages_must_agree(row, ok):
    from nemo_ft.data.formats import RowReject, to_canonical
    if ok:
        assert to_canonical(row, "preference")["prompt"]
    else:
        with pytest.raises(RowReject) as err:
            to_canonical(row, "preference")
        assert err.value.reason == "dpo_prompt_mismatch"


def test_general_input_trains_and_holds_out_its_rows_for_eval_only(tmp_path):
    """A general input (kept to measure forgetting) trains with its share; its held-out rows go to
    general.jsonl, never into validation/test, which stay the task's."""
    task, general = DATA_DIR / "sample" / "lookup_train.jsonl", DATA_DIR / "sample" / "sft_train.jsonl"
    m = prep(tmp_path, [{"path": str(task), "weight": 0.8}, {"path": str(general), "weight": 0.2, "general": True}],
             split={"train": 0.7, "validation": 0.15, "test": 0.15}, seq_length=128)
    out, c = tmp_path / "out", m["summary"]["counts"]
    held = read_jsonl(out / "general.jsonl")
    task_rows = {r["input"] for r in read_jsonl(task)}
    assert held and all(r["input"] not in task_rows for r in held)
    for split in ("validation", "test"):
        rows = read_jsonl(out / f"{split}.jsonl")
        assert rows and all(r["input"] in task_rows for r in rows), split
    assert c["general_heldout"] == len(held) and c["in"] == c["accepted"] + c["rejected_total"]
    assert c["accepted"] == sum(c["splits"].values()) + len(held)
    train_general = [r for r in read_jsonl(out / "train.jsonl") if r["input"] not in task_rows]
    assert not {r["input"] for r in train_general} & {r["input"] for r in held}  # held out means held out
    assert "general.jsonl" in outputs_by_path(m) and outputs_by_path(m)["general.jsonl"]["role"] == "general"
    with pytest.raises(ConfigError, match="general"):
        PrepConfig.from_dict({"inputs": [{"path": str(general), "general": True, "split": "test"}]})
