"""`nemo-ft eval`: does the adapter beat its base on held-out rows, without forgetting? Gates decide.

    nemo-ft eval from_run=runs/demo/export          (or an sft / dpo run; explicit base=, adapters=, eval.*)

It follows the manifests upstream (export -> sft/dpo -> prep) to the base, the adapter(s), the test
split, the general slice and the template the data was prepared with, checks all of it before any
model is built, then, through NeMo's own model restored once at TP=1:
- response-only loss and perplexity: NeMo's GPTSFTDataset (the SFT stage's tokens and loss mask) and
  the model's per-token loss;
- greedy generation through NeMo's generate with its KV cache (nemo_ft.runtime.generation), scored by
  nemo_ft.eval (exact match, token F1, contains/regex, EOS rate, mean length);
- the same for the base alone (the prompt-only baseline) and for every adapter on the same prompts;
  adapters with the same PEFT layout swap weights on the one restored base;
- forgetting: loss on the general slice, base vs adapter.
report.md / report.json / metrics.png / loss_curves.png (from the upstream run's TensorBoard events)
and generations.jsonl are written, then the gates: any failure exits 3 (distinct from config errors).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from nemo_ft import artifacts, reshard
from nemo_ft.config.entry import stage_main
from nemo_ft.errors import ConfigError, GateFailure, InputError
from nemo_ft.nemo_archive import NemoArchive, check_nemo
from nemo_ft.stages import lifecycle

DEFINITIONS = """- loss: mean negative log-likelihood per response token (the tokens SFT trains on: NeMo's
  GPTSFTDataset loss mask), token-weighted over the set; perplexity = exp(loss).
- generation: greedy, NeMo's generate with the KV cache, at most eval.max_new_tokens new tokens, stopping at EOS.
- exact match: the generation equals the reference after stripping, collapsing whitespace, lowercasing and
  dropping a final period. token F1: SQuAD's F1 over whitespace tokens (punctuation removed).
- contains: the normalized reference appears in the normalized generation (or eval.regex matches).
- EOS rate: share of generations that ended with EOS before the length limit."""
TEMPLATE_KEYS = ("prompt_template", "label_key", "add_eos", "add_bos", "truncation_field")
TEMPLATE_DEFAULTS = {"prompt_template": "{input} {output}", "label_key": "output", "add_eos": True,
                     "add_bos": False, "truncation_field": "input"}


@dataclass
class Upstream:
    """What the upstream manifests say: every field may be None."""
    base: Optional[str] = None
    adapters: tuple = ()           # ((name, path), ...)
    test_file: Optional[str] = None
    general_file: Optional[str] = None
    template: Optional[dict] = None
    prep: Optional[artifacts.Manifest] = None
    training_run: Optional[Path] = None  # the sft/dpo run dir: its TensorBoard events give the curves


def follow(from_run) -> Upstream:
    """export -> (the sft/dpo/reinforce run that trained its adapter) -> the prep run of its training data."""
    up = Upstream()
    m = artifacts.read_manifest(from_run, stage=("export", "sft", "dpo", "reinforce", "ppo"), key="from_run")
    if m.stage == "export":
        name = m.summary.get("adapter_name") or Path(from_run).name
        if m.records("adapter_tp1"):
            up.adapters = ((name, str(m.output("adapter_tp1"))),)
        up.base = (m.input("base") or {}).get("path")
        trained = (m.input("adapter") or {}).get("path")
        m = artifacts.manifest_next_to(trained) if trained and Path(trained).exists() else None
        if m is None:
            return up
    up.training_run = m.dir
    if not up.adapters and m.records("adapter"):
        up.adapters = ((m.dir.name, str(m.output("adapter"))),)
    # a DPO run started from an SFT adapter wrote the SFT-merged base its adapter applies to (output "base")
    up.base = up.base or (str(m.output("base")) if m.records("base") else (m.input("base") or {}).get("path"))
    data_run = m  # whose training data holds the task's held-out split: a DPO run's SFT run
    sft = (m.input("sft_adapter") or {}).get("path") if m.stage in ("dpo", "reinforce", "ppo") else None
    if sft and Path(sft).exists():
        data_run = artifacts.manifest_next_to(sft) or m
    for record in data_run.records("train", "inputs"):
        prep = artifacts.manifest_next_to(record["path"]) if Path(record["path"]).exists() else None
        if prep is not None and prep.stage == "prep":
            up.prep = prep
            up.test_file = str(prep.output("test"))
            up.general_file = str(prep.output("general")) if prep.records("general") else None
            up.template = prep.summary.get("template")
            break
    return up


def _adapter_list(items) -> list:
    out = []
    for item in items or []:
        name, sep, path = str(item).partition("=")
        if not sep:
            name, path = Path(str(item)).parent.name or Path(str(item)).stem, str(item)
        out.append((name.strip(), path.strip()))
    return out


def derive(cfg: DictConfig) -> list[str]:
    """Fill base, adapters, data files and the template from the manifests (explicit keys win)."""
    notes = []
    up = follow(cfg.from_run) if cfg.from_run else Upstream()
    if cfg.from_run:
        notes.append(f"from {cfg.from_run}: base {up.base}, adapters {[n for n, _ in up.adapters]}, "
                     f"test split {up.test_file}, general slice {up.general_file}")
    cfg.base = cfg.base or up.base
    cfg.adapters = [f"{n}={p}" for n, p in (_adapter_list(cfg.adapters) or list(up.adapters))]
    cfg.eval.test_file = cfg.eval.test_file or up.test_file
    cfg.eval.general_file = cfg.eval.general_file or up.general_file
    template = up.template
    if template is None and cfg.eval.test_file and Path(str(cfg.eval.test_file)).exists():
        prep = artifacts.manifest_next_to(cfg.eval.test_file)  # a prep split given directly: its template
        template = prep.summary.get("template") if prep is not None and prep.stage == "prep" else None
    template = template or {}
    for key in TEMPLATE_KEYS:
        if cfg.data[key] is None:
            cfg.data[key] = template.get(key, TEMPLATE_DEFAULTS[key])
    if cfg.data.max_seq_length is None and cfg.base and Path(str(cfg.base)).exists():
        try:
            with NemoArchive(cfg.base) as a:
                cfg.data.max_seq_length = int(a.config().get("encoder_seq_length") or 2048)
        except InputError:
            pass  # checks() reports an unreadable base
    cfg.eval.heldout = cfg.eval.heldout or (
        "Rows of the test split prep held out by a hash of each example: their prompts were never trained on. "
        "Whether their answers are new facts (not learnable from the training rows) or new combinations of "
        "seen items depends on the data; say which with eval.heldout.")
    return notes


def _rows(path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    from nemo_ft.eval import check_gate_config

    errors = []
    if not cfg.base:
        errors.append(ConfigError("base", "is required (or from_run=<an export/sft/dpo run dir>)"))
    elif not Path(str(cfg.base)).exists():
        errors.append(ConfigError("base", f"file not found: {cfg.base}"))
    trust = bool(cfg.run.trust_checkpoint)
    base_conf = None
    if cfg.base and Path(str(cfg.base)).exists() and "base" not in skip:
        with NemoArchive(cfg.base, key="base") as a:
            base_conf, base_tok = a.config(), a.tokenizer_sha256()
    names = set()
    for name, path in _adapter_list(cfg.adapters):
        key = f"adapters[{name}]"
        if name in names or name == "base":
            errors.append(ConfigError(key, f"the name {name!r} is taken; give each adapter its own (name=path)"))
        names.add(name)
        if not Path(path).exists():
            errors.append(ConfigError(key, f"file not found: {path}"))
            continue
        try:
            check_nemo(path, key=key, trust=trust)
            with NemoArchive(path, key=key) as a:
                conf = a.config()
        except InputError as err:
            errors.append(err)
            continue
        if base_conf is not None:
            for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
                if conf.get(k) != base_conf.get(k):
                    errors.append(InputError(f"was trained on another base: {k} is {conf.get(k)!r}, the base's "
                                             f"{base_conf.get(k)!r}", path=path, key=key))
                    break
    test = cfg.eval.test_file
    if not test:
        errors.append(ConfigError("eval.test_file", "no held-out data: give eval.test_file or a from_run whose "
                                                    "training data came from nemo-ft prep"))
    for key, path in (("eval.test_file", test), ("eval.general_file", cfg.eval.general_file)):
        if not path:
            continue
        if not Path(path).exists():
            errors.append(ConfigError(key, f"file not found: {path}"))
            continue
        if not _rows(path):
            errors.append(InputError("is empty: nothing to evaluate (did prep write split.test=0?)", path=path, key=key))
            continue
        try:  # data prep tokenized for another tokenizer would be scored on other tokens than trained
            m = artifacts.manifest_next_to(path)
            if m is not None and m.stage == "prep":
                m.verify(m.record_for(path))
                prep_tok = (m.summary.get("tokenizer") or {}).get("sha256")
                if base_conf is not None and prep_tok and base_tok and prep_tok != base_tok:
                    errors.append(InputError(f"was prepared with another tokenizer ({m.summary['tokenizer'].get('model')}, "
                                             f"sha256 {prep_tok[:12]}) than the base's (sha256 {base_tok[:12]}); "
                                             "re-run prep with the base's tokenizer", path=path, key=key))
        except InputError as err:
            errors.append(err)
    label = cfg.data.label_key
    if test and Path(test).exists() and _rows(test) and label not in _rows(test)[0]:
        errors.append(InputError(f"rows have no {label!r} key (data.label_key); is this NeMo SFT JSONL?",
                                 path=test, key="data.label_key"))
    if not str(cfg.data.prompt_template).rstrip().endswith("{" + str(label) + "}"):
        errors.append(ConfigError("data.prompt_template", f"{cfg.data.prompt_template!r} must end with {{{label}}}"))
    errors += check_gate_config(OmegaConf.to_container(cfg.eval.gates), bool(cfg.eval.general_file))
    return errors


# --------------------------------------------------------------------------------------------- model work

def _dataset(run, model, path: str):
    """NeMo's own GPTSFTDataset for `path`, built the way the SFT model builds its validation set."""
    cfg = run.cfg
    data_cfg = OmegaConf.create({
        "file_names": [str(path)], "global_batch_size": 1, "micro_batch_size": 1, "shuffle": False,
        "num_workers": 0, "memmap_workers": 1, "pin_memory": False, "max_seq_length": int(cfg.data.max_seq_length),
        "min_seq_length": 1, "drop_last": False, "label_key": cfg.data.label_key, "add_eos": cfg.data.add_eos,
        "add_sep": False, "add_bos": cfg.data.add_bos, "truncation_field": cfg.data.truncation_field,
        "index_mapping_dir": str(run.dir / "data_index"), "prompt_template": cfg.data.prompt_template,
        "truncation_method": "right", "tokens_to_generate": int(cfg.eval.max_new_tokens)})
    (run.dir / "data_index").mkdir(exist_ok=True)
    return model._build_dataset(data_cfg, is_train=False)[0]


def _losses(model, dataset, n: int, batch: int) -> tuple[list, list]:
    """Per-example (sum of response-token NLL, response-token count), from the model's per-token loss."""
    import torch

    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, n, batch):
            b = dataset.collate_fn([dataset[i] for i in range(start, min(n, start + batch))])
            loss = model.model(input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=None,
                               labels=b["labels"]).float()
            mask = b["loss_mask"].float()
            sums += (loss * mask).sum(dim=1).tolist()
            counts += mask.sum(dim=1).tolist()
    return sums, counts


def _evaluate(run, model, name: str, data: dict, general) -> tuple:
    from nemo_ft.eval import score_model
    from nemo_ft.runtime.generation import greedy

    cfg = run.cfg
    sums, counts = _losses(model, data["dataset"], data["n"], int(cfg.eval.batch_size))
    gens = []
    for start in range(0, data["n"], int(cfg.eval.batch_size)):
        gens += greedy(model, data["contexts"][start:start + int(cfg.eval.batch_size)], int(cfg.eval.max_new_tokens))
    gens = [g.__dict__ for g in gens]
    general_nll = _losses(model, general["dataset"], general["n"], int(cfg.eval.batch_size)) if general else None
    scores = score_model(name, data["references"], gens, sums, counts, general=general_nll, regex=cfg.eval.regex)
    run.log(f"{name}: loss {scores.loss:.4f}, exact match {scores.exact_match:.3f}, EOS rate {scores.eos_rate:.3f}"
            + (f", general loss {scores.general_loss:.4f}" if scores.general_loss is not None else ""))
    return scores, gens


def _peft_signature(conf: dict) -> tuple:
    peft = conf.get("peft") or {}
    return (peft.get("peft_scheme"), json.dumps({k: v for k, v in peft.items() if k != "restore_from_path"},
                                               sort_keys=True, default=str))


def _tp1_adapter(run, name: str, path: str) -> str:
    """Eval runs at TP=1: an adapter saved at TP/PP > 1 is gathered first (nemo_ft.reshard)."""
    out, resharded = reshard.tp1_path(path, run.dir, name)
    if resharded:
        run.log(f"{name}: saved at another layout; gathered to TP=1 ({out.name})")
    return str(out)


def _swap_in(model, path: str) -> None:
    """Load another adapter of the same PEFT layout into the modules already attached."""
    import torch

    with NemoArchive(path) as a:
        state = next(iter(a.tensors().values()))
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise InputError(f"does not fit the adapter modules already on the base: {missing[:3]}", path=path)
    with torch.no_grad():  # NeMo's load_state_dict insists on the whole model (strict): copy in place
        for k, v in state.items():
            params[k].copy_(v)


def tensorboard_curves(run_dir: Optional[Path]) -> dict:
    """Training and validation loss of the upstream run, read from its TensorBoard events."""
    if run_dir is None or not (run_dir / "nemo").is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for events in sorted((run_dir / "nemo").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        for tag, label in (("reduced_train_loss", "train loss"), ("val_loss", "validation loss"),
                           ("validation_loss", "validation loss"),  # NeMo's SFT names; Aligner's loops log these:
                           ("train/loss", "train loss"), ("val/loss", "validation loss")):
            if tag in tags:
                curves.setdefault(label, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(set(v)) for k, v in curves.items()}


def run(cfg: DictConfig) -> dict:
    from nemo_ft.eval import check_gates
    from nemo_ft.eval import report as rep

    run = lifecycle.start("eval", cfg, checks=checks, derive=derive, nemo_inputs=("base",))
    model = run.restore(cfg.base)
    model.eval()
    test_rows = _rows(cfg.eval.test_file)
    n = min(len(test_rows), int(cfg.eval.max_examples or len(test_rows)))
    dataset = _dataset(run, model, cfg.eval.test_file)
    data = {"dataset": dataset, "n": n, "references": [str(r[cfg.data.label_key]) for r in test_rows[:n]],
            "contexts": [list(map(int, dataset[i]["context_ids"])) for i in range(n)]}
    general = None
    if cfg.eval.general_file:
        general_ds = _dataset(run, model, cfg.eval.general_file)
        general = {"dataset": general_ds, "n": len(general_ds)}

    scores, generations = [], {}
    s, g = _evaluate(run, model, "base", data, general)
    scores.append(s)
    generations["base"] = g
    loaded = None  # the PEFT layout attached to `model`
    for name, path in _adapter_list(cfg.adapters):
        path = _tp1_adapter(run, name, path)
        with NemoArchive(path) as a:
            signature = _peft_signature(a.config())
        if loaded is None:
            model.load_adapters(path)
        elif signature == loaded:
            _swap_in(model, path)
        else:  # another PEFT layout: NeMo cannot detach adapters, so a fresh base
            model = run.restore(cfg.base)
            model.load_adapters(path)
        loaded = signature
        model.eval()
        s, g = _evaluate(run, model, name, data, general)
        scores.append(s)
        generations[name] = g

    base = scores[0]
    candidates = scores[1:] or scores  # the base alone is judged when there is no adapter
    gates = {c.name: check_gates(OmegaConf.to_container(cfg.eval.gates), c, base) for c in candidates}
    passed, headline = rep.verdict(gates)
    outputs = {}
    if run.rank0:
        gen_path = run.dir / "generations.jsonl"
        with artifacts.atomic_write(gen_path) as f:
            for i in range(n):
                row = {"index": i, "prompt": model.tokenizer.ids_to_text(data["contexts"][i]),
                       "reference": data["references"][i]}
                for name, gens in generations.items():
                    row[name] = gens[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        images = {"metrics": rep.plot_metrics(scores, headline, passed, run.dir / "metrics.png",
                                              OmegaConf.to_container(cfg.eval.gates))}
        trained = _training_run(cfg)
        curves = rep.plot_curves(tensorboard_curves(trained), run.dir / "loss_curves.png",
                                 f"training run {trained.name}: loss from its TensorBoard events" if trained else "")
        if curves:
            images["curves"] = curves
        examples = [{"prompt": model.tokenizer.ids_to_text(data["contexts"][i]), "reference": data["references"][i],
                     **{name: gens[i]["text"] for name, gens in generations.items()}}
                    for i in range(min(n, int(cfg.eval.examples_in_report)))]
        sources = {"base": cfg.base, **{f"adapter {n}": p for n, p in _adapter_list(cfg.adapters)},
                   "test_file": cfg.eval.test_file, "general_file": cfg.eval.general_file}
        md, js = rep.write_report(run.dir, headline=headline, passed=passed, scores=scores, gates_by_model=gates,
                                  examples=examples, heldout=cfg.eval.heldout, sources=sources, images=images,
                                  definitions=DEFINITIONS, extra={"generations_file": gen_path.name})
        outputs = {"report_md": md, "report_json": js, "generations": gen_path, **{f"{k}_png": v for k, v in images.items()}}
        summary = {"passed": passed, "verdict": headline, "models": {s.name: s.metrics() for s in scores},
                   "failed_gates": [f"{n}: {g.name}" for n, gs in gates.items() for g in gs if not g.passed]}
        run.finish(summary, outputs=outputs, inputs={"base": cfg.base, "test": cfg.eval.test_file,
                                                      "general": cfg.eval.general_file,
                                                      "adapter": [p for _, p in _adapter_list(cfg.adapters)]})
        run.log(headline)
        run.log(f"report: {md}")
    if not passed:
        raise GateFailure([f"{n}: {g.name} = {g.value if g.value is None else round(g.value, 4)} ({g.meaning})"
                           for n, gs in gates.items() for g in gs if not g.passed])
    return {"passed": passed}


def _training_run(cfg) -> Optional[Path]:
    if not cfg.from_run:
        return None
    try:
        return follow(cfg.from_run).training_run
    except InputError:
        return None


@stage_main("eval", "eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
