"""Eval's pure core: scoring generations against references, the gates, and the report (md, json, PNGs).

Plain Python on lists (matplotlib only inside the plotting functions): the eval stage feeds it what
NeMo computed (per-example losses, greedy generations) and it decides. Tested in seconds.
"""
from nemo_ft.eval.gates import GATES, Gate, check_gates, check_gate_config
from nemo_ft.eval.scoring import ModelScores, contains, exact_match, normalize, score_model, token_f1

__all__ = ["GATES", "Gate", "check_gates", "check_gate_config", "ModelScores", "contains", "exact_match",
           "normalize", "score_model", "token_f1"]
