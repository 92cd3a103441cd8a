"""The gates an adapter must pass before anyone ships it (eval.gates), each against the base on the
same prompts. A failed gate is a row in the report and makes the stage exit 3."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemo_ft.errors import ConfigError

# gate -> (what it measures, how it is compared, whether it needs the general slice)
GATES = {
    "min_loss_improvement": ("base loss - candidate loss on the held-out responses", ">=", False),
    "min_exact_match": ("exact match on the held-out set", ">=", False),
    "min_token_f1": ("token F1 on the held-out set", ">=", False),
    "min_contains": ("share of generations containing the reference (or matching eval.regex)", ">=", False),
    "min_eos_rate": ("share of generations ending with EOS before the length limit", ">=", False),
    "max_general_loss_increase": ("candidate loss - base loss on the general slice (forgetting)", "<=", True),
}


@dataclass
class Gate:
    name: str
    threshold: float
    value: Optional[float]
    passed: bool
    meaning: str

    def row(self) -> dict:
        return {"gate": self.name, "threshold": self.threshold, "value": self.value, "passed": self.passed,
                "meaning": self.meaning}


def check_gate_config(gates: dict, have_general: bool) -> list:
    """ConfigErrors for unknown gates, non-numbers, and a forgetting gate without general data."""
    errors = []
    for name, threshold in (gates or {}).items():
        if threshold is None:
            continue
        if name not in GATES:
            errors.append(ConfigError(f"eval.gates.{name}", f"unknown gate; expected some of {', '.join(GATES)}"))
            continue
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            errors.append(ConfigError(f"eval.gates.{name}", f"expected a number, got {threshold!r}"))
        if GATES[name][2] and not have_general:
            errors.append(ConfigError(f"eval.gates.{name}", "needs a general-data slice: prep an input with "
                                                          "general: true, or set eval.general_file (or the gate to null)"))
    return errors


def _value(name: str, candidate, base) -> Optional[float]:
    if name == "min_loss_improvement":
        return None if candidate.loss is None or base.loss is None else base.loss - candidate.loss
    if name == "max_general_loss_increase":
        if candidate.general_loss is None or base.general_loss is None:
            return None
        return candidate.general_loss - base.general_loss
    return getattr(candidate, name.removeprefix("min_"))


def check_gates(gates: dict, candidate, base) -> list[Gate]:
    """Each configured gate for `candidate` (ModelScores) against `base`; a gate without a value fails."""
    out = []
    for name, threshold in (gates or {}).items():
        if threshold is None:
            continue
        meaning, op, _ = GATES[name]
        value = _value(name, candidate, base)
        passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out.append(Gate(name, float(threshold), value, passed, f"{meaning} {op} {threshold:g}"))
    return out
