"""One NeMo base serving many PEFT adapters, the adapter chosen per request: what `nemo-ft serve
engine=triton` puts behind Triton, generating with nemo_ft.runtime.generation.greedy (eval's path).

NeMo cannot unload an adapter, nor hold two of the same kind on one model (`load_adapters` adds the
modules and refuses a second set). Two ways remain, and this module takes the first where it can:
- adapters whose PEFT config is the same (scheme, targets, rank, alpha, ...: the module shapes and the
  forward) share ONE restored model: its adapter modules are loaded once, and each request copies its
  adapter's weights into them (under the lock, only when the adapter changes). Memory: one base for all.
- adapters with another PEFT config get a model of their own (a "group" per config); a model per
  adapter would cost a whole base each for nothing (benchmarks/results/serve_cpu.md measures both).
Base requests use a restored model with its adapters switched off (`set_enabled_adapters(enabled=False)`
on the adapter modules, which equals a restore without them: ../shared/NEMO_CPU.md).

Requests run one batch at a time under one lock: NeMo's generate keeps per-call state on the model and
in megatron's globals, so two calls must not interleave. Triton batches requests per model, and a model
is one adapter, so a batch never mixes adapters.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


def peft_key(adapter_config: dict) -> str:
    """What must be equal for two adapters to share modules: the .nemo config's peft section (less where it
    was restored from) and the architecture it was built for."""
    model = adapter_config.get("model", adapter_config)
    peft = {k: v for k, v in dict(model.get("peft") or {}).items() if k != "restore_from_path"}
    arch = {k: model.get(k) for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                                      "kv_channels", "ffn_hidden_size", "activation")}
    return json.dumps({"peft": peft, "arch": arch}, sort_keys=True, default=str)


def _adapter_modules(model):
    from nemo.core.classes.mixins.adapter_mixins import AdapterModuleMixin

    return [m for m in model.modules() if isinstance(m, AdapterModuleMixin) and m.is_adapter_available()]


@dataclass
class _Group:
    model: object
    params: dict                     # adapter tensor key -> the model's live tensor
    weights: dict                    # adapter name -> {key: tensor}
    modules: list = field(default_factory=list)
    current: str | None = None       # whose weights are in the modules now
    enabled: bool = True


class AdapterBank:
    """Restored NeMo models holding `adapters` {name: adapter .nemo}; `generate(name, prompts, n)`.

    restore() must return a freshly restored base model (the stage's run.restore); read_weights(path) the
    adapter's {key: tensor} (nemo_archive, which refuses pickles that are not plain tensors)."""

    def __init__(self, restore: Callable[[], object], adapters: dict, configs: dict,
                 read_weights: Callable[[str], dict], base_name: str):
        self.base_name = base_name
        self.lock = threading.Lock()
        self.groups: list[_Group] = []
        self.group_of: dict[str, _Group] = {}
        self.timings = {"restore_s": [], "load_adapters_s": [], "swaps": 0, "swap_s": 0.0}
        by_key: dict[str, list[str]] = {}
        for name in adapters:
            by_key.setdefault(peft_key(configs[name]), []).append(name)
        for names in by_key.values():
            model = self._restore(restore)
            t = time.perf_counter()
            model.load_adapters(str(adapters[names[0]]))
            self.timings["load_adapters_s"].append(round(time.perf_counter() - t, 3))
            live = model.state_dict(keep_vars=True)
            weights = {n: read_weights(str(adapters[n])) for n in names}
            keys = set(weights[names[0]])
            for n in names:
                if set(weights[n]) != keys:  # same config, so the same tensors; anything else is a bug
                    raise RuntimeError(f"adapter {n} holds other tensors than {names[0]} with the same PEFT config")
                missing = [k for k in keys if k not in live]
                if missing:
                    raise RuntimeError(f"NeMo built no module for {missing[:2]} of adapter {n}")
            group = _Group(model=model, params={k: live[k] for k in keys}, weights=weights,
                           modules=_adapter_modules(model), current=names[0])
            self.groups.append(group)
            for n in names:
                self.group_of[n] = group
        if not self.groups:  # the base alone
            self.groups.append(_Group(model=self._restore(restore), params={}, weights={}, enabled=False))

    def _restore(self, restore):
        t = time.perf_counter()
        model = restore()
        model.eval()
        self.timings["restore_s"].append(round(time.perf_counter() - t, 3))
        return model

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.group_of]

    def _select(self, name: str):
        import torch

        if name == self.base_name:
            group, on = self.groups[0], False
        else:
            group, on = self.group_of[name], True
        if group.enabled != on:
            for m in group.modules:
                m.set_enabled_adapters(enabled=on)
            group.enabled = on
        if on and group.current != name:
            t = time.perf_counter()
            with torch.no_grad():
                for key, value in group.weights[name].items():
                    group.params[key].copy_(value)
            group.current = name
            self.timings["swaps"] += 1
            self.timings["swap_s"] += time.perf_counter() - t
        return group.model

    def generate(self, name: str, prompts: list, max_new_tokens: int):
        """Greedy generations (nemo_ft.runtime.generation.Generation) of `name` (base or an adapter)."""
        from nemo_ft.runtime import generation

        if name not in self.names:
            raise KeyError(f"unknown adapter {name!r}; served: {', '.join(self.names)}")
        with self.lock:
            return generation.greedy(self._select(name), prompts, max_new_tokens)


# ---------------------------------------------------------------------------------------- Triton side

def continuation(tokenizer, prompt_ids: list, new_ids: list) -> str:
    """The text the new tokens add to the prompt's, as vLLM and HF return it: SentencePiece drops the word
    boundary of a first piece decoded alone (" Lima." would come back as "Lima.")."""
    if not new_ids:
        return ""
    before = tokenizer.ids_to_text(list(prompt_ids))
    full = tokenizer.ids_to_text(list(prompt_ids) + list(new_ids))
    return full[len(before):] if full.startswith(before) else tokenizer.ids_to_text(list(new_ids))

def triton_model(bank: AdapterBank, name: str, tokenizer, max_context: int, max_new_default: int):
    """(infer_func, inputs, outputs) for PyTriton: one Triton model per served name. Request: `prompts`
    (bytes [1]), optional `max_tokens` (int32 [1]). Response per row: `text` (bytes), `token_ids`
    (int64, padded with -1 to the batch's longest), `finish_reason` (b"stop" at EOS, b"length"), and
    `error` (b"" or why this row could not be served: a row's problem never fails its batch-mates)."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import Tensor

    @batch
    def infer(prompts, max_tokens=None):
        texts = [p[0].decode("utf-8") if isinstance(p[0], bytes) else str(p[0]) for p in prompts]
        wanted = [int(m[0]) for m in max_tokens] if max_tokens is not None else [max_new_default] * len(texts)
        ids = [tokenizer.text_to_ids(t) for t in texts]
        errors = [""] * len(texts)
        for i, (p, n) in enumerate(zip(ids, wanted)):
            if n < 1:
                errors[i] = f"max_tokens must be >= 1, got {n}"
            elif not p:
                errors[i] = "empty prompt"
            elif len(p) + n > max_context:
                errors[i] = f"prompt ({len(p)} tokens) + max_tokens ({n}) exceeds the model's context of {max_context}"
        ok = [i for i, e in enumerate(errors) if not e]
        gens = {}
        if ok:
            # One call for the batch at its largest max_tokens; greedy is causal, so a row's first n tokens
            # are the same as when asked for n, and each row is cut to its own n below.
            out = bank.generate(name, [ids[i] for i in ok], max(wanted[i] for i in ok))
            gens = dict(zip(ok, out))
        rows, texts_out, reasons = [], [], []
        for i in range(len(texts)):
            g = gens.get(i)
            if g is None:
                rows.append([]), texts_out.append(b""), reasons.append(b"error")
                continue
            toks = g.ids[:wanted[i]]
            eos = g.ended_with_eos and len(g.ids) < wanted[i]  # EOS came within this row's own budget
            rows.append(toks)
            texts_out.append(continuation(tokenizer, ids[i], toks).encode("utf-8"))
            reasons.append(b"stop" if eos else b"length")
        width = max(1, max(len(r) for r in rows))
        token_ids = np.full((len(rows), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            token_ids[i, :len(r)] = r
        as_col = lambda xs: np.array(xs, dtype=object).reshape(-1, 1)  # noqa: E731
        return {"text": as_col(texts_out), "token_ids": token_ids, "finish_reason": as_col(reasons),
                "error": as_col([e.encode() for e in errors])}

    inputs = [Tensor(name="prompts", dtype=bytes, shape=(1,)),
              Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True)]
    outputs = [Tensor(name="text", dtype=bytes, shape=(1,)), Tensor(name="token_ids", dtype=np.int64, shape=(-1,)),
               Tensor(name="finish_reason", dtype=bytes, shape=(1,)), Tensor(name="error", dtype=bytes, shape=(1,))]
    return infer, inputs, outputs
