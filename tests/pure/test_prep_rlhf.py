"""prep task=rlhf (NeMo-Aligner's RLHF prompt rows) and the rule reward that scores rollouts of them.
No NeMo needed."""
import json

import pytest
import sentencepiece

from nemo_ft.data.config import PrepConfig
from nemo_ft.data.tokenize import Template, Tokenizer, encode_sft
from nemo_ft.errors import ConfigError
from nemo_ft.eval.reward import RuleReward, UnknownPrompt
from nemo_ft.paths import DATA_DIR
from tests.conftest import TOKENIZER, prep, read_jsonl

SAMPLE = DATA_DIR / "sample"
SP = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_rlhf_prompts_are_exactly_the_context_sft_trained_on(tmp_path):
    """Every prompt encodes (whole, as Aligner does) to the context ids NeMo's SFT dataset builds from the
    template pieces, and the reference is the label SFT trained on."""
    m = prep(tmp_path, [SAMPLE / "lookup_validation.jsonl"], task="rlhf")
    c = m["summary"]["counts"]
    assert c["in"] == c["accepted"] > 0 and c["in_equals_accepted_plus_rejected"]
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    src = read_jsonl(SAMPLE / "lookup_validation.jsonl")
    assert len(rows) == c["accepted"] and set(rows[0]) == {"text", "reference"}
    by_prompt = {r["text"]: r for r in rows}
    tok, tpl = Tokenizer("sentencepiece", TOKENIZER), Template()
    for ex in src:
        ids, context_len, _, _ = encode_sft(tok, tpl, ex)
        row = by_prompt[ex["input"]]
        assert SP.encode(row["text"]) == ids[:context_len]
        assert row["reference"].strip() == ex["output"].strip()
    assert m["summary"]["task"] == "rlhf"


def test_rlhf_long_prompts_are_rejected_where_aligner_would_skip_them(tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src, [{"input": "Town: Oslo. Name: Peru.\nTown?", "output": " Oslo."},
                 {"input": " ".join(["Town: Oslo. Name: Peru."] * 6) + "\nTown?", "output": " Oslo."}])
    m = prep(tmp_path, [src], task="rlhf", seq_length=40)
    c = m["summary"]["counts"]
    assert (c["in"], c["accepted"], c["rejected_total"]) == (2, 1, 1) and c["in_equals_accepted_plus_rejected"]
    (rej,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert rej["line"] == 2 and rej["reason"] == "rlhf_prompt_too_long" and "seq_length // 2 = 20" in rej["detail"]


def test_rlhf_from_preference_rows_keeps_the_chosen_answer_as_reference(tmp_path):
    m = prep(tmp_path, [SAMPLE / "lookup_pref_validation.jsonl"], task="rlhf")
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    src = read_jsonl(SAMPLE / "lookup_pref_validation.jsonl")
    assert m["summary"]["counts"]["accepted"] == len(rows) == len(src)
    assert [(r["text"], r["reference"]) for r in rows if r["text"] == src[0]["prompt"]] == \
        [(src[0]["prompt"], src[0]["chosen"])]


@pytest.mark.parametrize("over, key", [({"template": {"add_bos": True}}, "template.add_bos"),
                                       ({"pack": True}, "pack")])
def test_rlhf_refuses_what_aligners_prompt_dataset_cannot_read(over, key):
    c = {"inputs": [str(SAMPLE / "lookup_train.jsonl")], "out_dir": "/nonexistent", "task": "rlhf",
         "tokenizer": {"library": "sentencepiece", "model": TOKENIZER}, **over}
    with pytest.raises(ConfigError) as err:
        PrepConfig.from_dict(c)
    assert err.value.key == key


# ---------------------------------------------------------------- the rule reward

def _rule(metric="f1"):
    prompts = [{"text": "Town: Oslo. Name: Peru.\nTown?", "reference": " Oslo."},
               {"text": "Town: Oslo. Name: Peru.\nTown? Again, town?", "reference": " Oslo!"},
               {"text": "Name: Rome. Town: Chad.\nName?", "reference": " Rome."}]
    return RuleReward.from_rows(prompts, SP.encode, lambda ids: SP.decode(list(ids)), SP.eos_id(), metric), prompts


def test_rule_reward_scores_the_response_after_the_longest_known_prompt():
    rule, prompts = _rule()
    eos, pad = SP.eos_id(), 0
    for p, answer, want in [(prompts[0], " Oslo.", 1.0), (prompts[2], " Peru.", 0.0),
                            (prompts[1], " Oslo!", 1.0), (prompts[0], " Oslo. Peru.", 2 * 0.5 * 1 / 1.5)]:
        ids = SP.encode(p["text"]) + SP.encode(answer) + [eos]
        row = ids + [pad] * 7  # the actor pads rollouts to one length and sends each length
        prompt, response = rule.split(row, len(ids))
        assert list(prompt) == SP.encode(p["text"]) and eos not in response
        assert rule.score(row, len(ids)) == pytest.approx(want, abs=1e-6), (p, answer)
    assert rule.scored == 4


def test_rule_reward_exact_match_and_unknown_prompts():
    rule, prompts = _rule("exact")
    ids = SP.encode(prompts[2]["text"]) + SP.encode(" Rome.")
    assert rule.score(ids, len(ids)) == 1.0
    wrong = SP.encode(prompts[2]["text"]) + SP.encode(" Rome, Chad.")
    assert rule.score(wrong, len(wrong)) == 0.0
    with pytest.raises(UnknownPrompt, match="other prompt files"):
        rule.score(SP.encode("Name: Lima. Town: Mali.\nName?"), 5)
    with pytest.raises(ValueError, match="metric 'bleu'"):
        RuleReward({}, str, 0, "bleu")
    with pytest.raises(ValueError, match="row 2: prompt .* two references"):
        RuleReward.from_rows([{"text": "a", "reference": "b"}, {"text": "a", "reference": "c"}], SP.encode, str, 2)
