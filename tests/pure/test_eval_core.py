"""Eval's scoring and gates on plain lists: the numbers report.json carries and the verdict they give."""
import math

import pytest

from nemo_ft.errors import ConfigError
from nemo_ft.eval import check_gate_config, check_gates, contains, exact_match, normalize, score_model, token_f1


def test_normalization_and_match_metrics():
    assert normalize("  Lima.\n") == "lima" and normalize("Mexico  City.") == "mexico city"
    assert exact_match("Lima.", " Lima.") and exact_match("lima", "Lima.") and not exact_match("Lima. Peru.", "Lima.")
    assert token_f1("the capital is Lima", "Lima") == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
    assert token_f1("Oslo.", "Lima.") == 0.0 and token_f1("", "") == 1.0
    assert contains("It is Lima, I think.", " Lima.") and not contains("Oslo", "Lima.")
    assert contains("answer: Lima.", " Lima.", regex=r"answer: {reference}$")
    assert not contains("answer: Lima!", " Lima.", regex=r"answer: {reference}$")  # the reference is escaped: "." is a dot


def _gen(text, ids, eos=True):
    return {"text": text, "ids": ids, "ended_with_eos": eos}


def test_score_model_aggregates_per_example_and_token_weighted_loss():
    refs = [" Lima.", " Oslo.", " Rome."]
    gens = [_gen("Lima.", [1, 2]), _gen("Paris.", [3]), _gen("Rome. Rome. Rome.", [4, 5, 6, 7], eos=False)]
    s = score_model("a", refs, gens, nll_sums=[2.0, 4.0, 0.0], token_counts=[2, 2, 4], general=([3.0], [3]))
    assert (s.n, s.exact_match, s.eos_rate, s.mean_length) == (3, 1 / 3, 2 / 3, 7 / 3)
    assert s.contains == 2 / 3
    assert s.loss == pytest.approx(6.0 / 8) and s.perplexity == pytest.approx(math.exp(0.75))  # not mean of means
    assert s.general_loss == pytest.approx(1.0)
    with pytest.raises(ValueError):
        score_model("a", refs, gens[:2], [1.0], [1])


def test_gates_compare_the_candidate_with_the_base():
    def scores(name, loss, em, eos, general):
        return score_model(name, ["x"], [_gen("x" if em else "y", [1], eos)], [loss], [1], general=([general], [1]))
    base = scores("base", 3.0, False, False, 2.0)
    good = scores("good", 1.0, True, True, 2.01)
    gates = {"min_loss_improvement": 0.05, "min_exact_match": 0.5, "min_eos_rate": 0.9,
             "max_general_loss_increase": 0.02, "min_token_f1": None}
    assert [g.passed for g in check_gates(gates, good, base)] == [True, True, True, True]
    forgot = scores("forgot", 1.0, True, True, 2.5)
    failed = [g.name for g in check_gates(gates, forgot, base) if not g.passed]
    assert failed == ["max_general_loss_increase"]
    assert [g.name for g in check_gates(gates, base, base) if not g.passed] == [
        "min_loss_improvement", "min_exact_match", "min_eos_rate"]
    no_general = score_model("n", ["x"], [_gen("x", [1])], [1.0], [1])
    gate = check_gates({"max_general_loss_increase": 0.02}, no_general, base)[0]
    assert gate.value is None and not gate.passed  # a gate without its measurement fails, never passes by default


def test_gate_config_errors_name_the_key():
    errors = check_gate_config({"min_exact_mach": 0.5, "min_eos_rate": "high", "max_general_loss_increase": 0.1},
                               have_general=False)
    keys = [e.key for e in errors]
    assert keys == ["eval.gates.min_exact_mach", "eval.gates.min_eos_rate", "eval.gates.max_general_loss_increase"]
    assert all(isinstance(e, ConfigError) for e in errors)
    assert check_gate_config({"max_general_loss_increase": None}, have_general=False) == []
