"""Scores of one model on the held-out set: response-only loss and perplexity, exact match, token F1,
a contains/regex metric, stop behaviour (EOS before the length limit, mean length).

Definitions (report.md repeats them):
- normalize: strip, collapse whitespace, lowercase, drop a trailing period (the sample answers end in
  "."); exact match compares normalized texts;
- token F1: SQuAD's, over whitespace tokens of the normalized texts with punctuation removed;
- contains: the normalized reference appears in the normalized generation, or, with a regex, the
  regex (with {reference} replaced by the escaped reference) matches the generation;
- loss: mean NLL over all response tokens (token-weighted, the tokens the SFT loss trains on);
  perplexity = exp(loss).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    text = " ".join(text.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


def _tokens(text: str) -> list:
    return _PUNCT.sub(" ", normalize(text)).split()


def token_f1(generated: str, reference: str) -> float:
    gen, ref = _tokens(generated), _tokens(reference)
    if not gen or not ref:
        return float(gen == ref)
    common = sum((Counter(gen) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(gen), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(generated: str, reference: str, regex: Optional[str] = None) -> bool:
    if regex:
        return re.search(regex.replace("{reference}", re.escape(reference.strip())), generated) is not None
    return normalize(reference) in normalize(generated)


@dataclass
class ModelScores:
    name: str
    n: int
    loss: Optional[float]            # token-weighted mean NLL on the response tokens
    perplexity: Optional[float]
    exact_match: float
    token_f1: float
    contains: float
    eos_rate: float                  # share of generations that ended with EOS before the limit
    mean_length: float               # generated tokens (EOS excluded)
    general_loss: Optional[float] = None
    per_example: list = field(default_factory=list)

    def metrics(self) -> dict:
        return {k: getattr(self, k) for k in ("n", "loss", "perplexity", "exact_match", "token_f1", "contains",
                                              "eos_rate", "mean_length", "general_loss")}


def mean_loss(nll_sums: list, token_counts: list) -> Optional[float]:
    tokens = sum(token_counts)
    return sum(nll_sums) / tokens if tokens else None


def score_model(name: str, references: list, generations: list, nll_sums: list, token_counts: list,
                general: Optional[tuple] = None, regex: Optional[str] = None) -> ModelScores:
    """generations: dicts with text, ids, ended_with_eos (nemo_ft.runtime.generation.Generation)."""
    if len(references) != len(generations):
        raise ValueError(f"{len(references)} references for {len(generations)} generations")
    rows = []
    for ref, gen in zip(references, generations):
        rows.append({"exact_match": exact_match(gen["text"], ref), "token_f1": token_f1(gen["text"], ref),
                     "contains": contains(gen["text"], ref, regex), "eos": bool(gen["ended_with_eos"]),
                     "length": len(gen["ids"])})
    n = len(rows)
    loss = mean_loss(nll_sums, token_counts)
    return ModelScores(
        name=name, n=n, loss=loss, perplexity=math.exp(loss) if loss is not None else None,
        exact_match=sum(r["exact_match"] for r in rows) / n if n else 0.0,
        token_f1=sum(r["token_f1"] for r in rows) / n if n else 0.0,
        contains=sum(r["contains"] for r in rows) / n if n else 0.0,
        eos_rate=sum(r["eos"] for r in rows) / n if n else 0.0,
        mean_length=sum(r["length"] for r in rows) / n if n else 0.0,
        general_loss=mean_loss(*general) if general else None,
        per_example=rows,
    )
