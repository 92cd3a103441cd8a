"""A rule-based reward for RLHF: the policy's answer to a known prompt scored against that prompt's
reference with eval's own metrics (token F1 or exact match, scoring.py's definitions).

The RLHF actor sends what NeMo-Aligner's reward server receives: one row of token ids per rollout,
prompt and response together (padded), and the length of each. The prompt is recognised by its token
ids (the longest known prompt that prefixes the row), so the rule needs no text round trip of the
prompt and cannot confuse two prompts that decode alike. The response is what follows, up to the
length, without a final EOS, decoded by the policy's tokenizer.

Pure: no NeMo, torch or PyTriton (the server in nemo_ft.stages.reward_server wraps it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from nemo_ft.eval.scoring import exact_match, token_f1

METRICS = {"f1": token_f1, "exact": lambda g, r: float(exact_match(g, r))}


class UnknownPrompt(ValueError):
    """A rollout whose prompt is none of the rule's: the actor and the rule read different data."""


@dataclass
class RuleReward:
    prompts: dict  # tuple(prompt token ids) -> reference text
    decode: Callable[[Sequence[int]], str]
    eos_id: int
    metric: str = "f1"
    scored: int = 0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}: expected one of {sorted(METRICS)}")
        self.by_length = {}  # prompt length -> the prompts of that length
        for ids in self.prompts:
            self.by_length.setdefault(len(ids), set()).add(ids)
        self._lengths = sorted(self.by_length, reverse=True)

    @classmethod
    def from_rows(cls, rows: list, encode: Callable[[str], list], decode, eos_id: int, metric: str = "f1"):
        """From prep task=rlhf rows {"text", "reference"}; a prompt given twice must have one reference."""
        prompts = {}
        for i, row in enumerate(rows):
            ids = tuple(encode(row["text"]))
            if prompts.get(ids, row["reference"]) != row["reference"]:
                raise ValueError(f"row {i + 1}: prompt {row['text']!r} appears with two references")
            prompts[ids] = row["reference"]
        return cls(prompts, decode, eos_id, metric)

    def split(self, tokens: Sequence[int], length: int) -> tuple[tuple, list]:
        """(prompt ids, response ids) of one rollout row."""
        row = tuple(int(t) for t in tokens[:length])
        for n in self._lengths:
            if n <= len(row) and row[:n] in self.by_length[n]:
                response = list(row[n:])
                if response and response[-1] == self.eos_id:
                    response = response[:-1]
                return row[:n], response
        raise UnknownPrompt(f"no known prompt prefixes this rollout (first tokens {list(row[:12])}): the reward "
                            "rule was given other prompt files than the actor trains on")

    def score(self, tokens: Sequence[int], length: int) -> float:
        prompt, response = self.split(tokens, length)
        self.scored += 1
        return float(METRICS[self.metric](self.decode(response), self.prompts[prompt]))
