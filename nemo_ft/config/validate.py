"""Checks on a composed stage config, run before any model is built or any GPU time is spent.

Each check returns ConfigErrors that name the key, say what was expected and how to fix it; the
stage prints them all at once and exits with status 2. Pure Python: no NeMo, no torch.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from nemo_ft import artifacts, slurm
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.nemo_archive import NemoArchive
from nemo_ft.peft import FAST_GATED, lora_targets, schemes_of
# Keys of a model profile (conf/model/*.yaml) that describe the architecture of the checkpoint.
ARCH_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "kv_channels", "normalization", "activation", "position_embedding_type", "bias",
             "share_embeddings_and_output_weights")
# Our own keys in the model profile that NeMo does not know: kept out of the config handed to NeMo.
PROFILE_ONLY_KEYS = ("vocab_size",)


def _int(cfg, key, default=None):
    value = OmegaConf.select(cfg, key, default=default)
    return None if value is None else int(value)


def world_size(cfg) -> int:
    return int(OmegaConf.select(cfg, "trainer.devices", default=1)) * int(OmegaConf.select(cfg, "trainer.num_nodes", default=1))


def _files(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def check_parallel(cfg) -> Iterable[ConfigError]:
    tp = _int(cfg, "model.tensor_model_parallel_size", 1)
    pp = _int(cfg, "model.pipeline_model_parallel_size", 1)
    world = world_size(cfg)
    launched = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if launched != world:
        yield ConfigError("trainer.devices",
                          f"the launcher started {launched} process(es) but trainer.devices x trainer.num_nodes = "
                          f"{world}; launch one process per device (torchrun --nproc_per_node {world}, or srun "
                          f"--ntasks {world}) or pick the matching parallel=<profile>")
    yield from _check_srun_layout(cfg, launched == world)
    if tp < 1 or pp < 1:
        yield ConfigError("model.tensor_model_parallel_size", f"TP={tp} and PP={pp} must both be >= 1")
        return
    if world % (tp * pp):
        yield ConfigError("model.tensor_model_parallel_size",
                          f"TP={tp} x PP={pp} = {tp * pp} does not divide the world size {world} "
                          f"(trainer.devices x trainer.num_nodes); set trainer.devices to a multiple of {tp * pp}")
        return
    heads = _int(cfg, "model.num_attention_heads")
    if heads is not None and heads % tp:
        yield ConfigError("model.tensor_model_parallel_size",
                          f"TP={tp} does not divide num_attention_heads={heads}; use a TP that divides {heads}")
    groups = _int(cfg, "model.num_query_groups")
    if groups is not None and groups % tp:
        yield ConfigError("model.tensor_model_parallel_size",
                          f"TP={tp} does not divide num_query_groups={groups} (GQA key/value heads); "
                          f"use a TP that divides {groups}")
    layers = _int(cfg, "model.num_layers")
    if layers is not None and layers % pp:
        yield ConfigError("model.pipeline_model_parallel_size",
                          f"PP={pp} does not divide num_layers={layers}; use a PP that divides {layers}")
    if OmegaConf.select(cfg, "model.sequence_parallel", default=False) and tp == 1:
        yield ConfigError("model.sequence_parallel", "sequence parallelism needs TP > 1; set it to false")
    yield from _check_recompute(cfg, layers // pp if layers else None)
    dp = world // (tp * pp)
    mbs = _int(cfg, "model.micro_batch_size", 1)
    gbs = _int(cfg, "model.global_batch_size", mbs)
    if mbs < 1 or gbs % (mbs * dp):
        yield ConfigError("model.global_batch_size",
                          f"global_batch_size={gbs} must be a multiple of micro_batch_size x data_parallel "
                          f"= {mbs} x {dp} = {mbs * dp}")


def check_steps(cfg) -> Iterable[ConfigError]:
    """Lightning refuses these only when the Trainer is built, with a traceback."""
    steps = OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        yield ConfigError("trainer.max_steps", f"{steps!r} must be a whole number of optimizer steps >= 1 (NeMo's "
                                               "SFT sampler sizes the epoch from it; -1, run by epochs, is not supported)")
    vci = OmegaConf.select(cfg, "trainer.val_check_interval")
    if vci is not None and (isinstance(vci, bool) or not isinstance(vci, (int, float)) or vci <= 0
                            or (isinstance(vci, float) and vci > 1)):
        yield ConfigError("trainer.val_check_interval", f"{vci!r} must be a step count >= 1 or a fraction of an epoch "
                                                        "in (0, 1]")


def _check_recompute(cfg, layers_per_stage) -> Iterable[ConfigError]:
    """Activation checkpointing as megatron-core's TransformerConfig accepts it, said before the model
    is built: granularity full (method uniform|block, 1..layers-per-stage layers) or selective (no
    method, no layer count)."""
    granularity = OmegaConf.select(cfg, "model.activations_checkpoint_granularity", default=None)
    method = OmegaConf.select(cfg, "model.activations_checkpoint_method", default=None)
    n = OmegaConf.select(cfg, "model.activations_checkpoint_num_layers", default=None)
    if granularity is None:
        if method is not None or n is not None:
            yield ConfigError("model.activations_checkpoint_granularity",
                              "activations_checkpoint_method/num_layers are set but granularity is null, so nothing "
                              "would be checkpointed; set granularity=full (or selective), or unset them")
        return
    if granularity not in ("full", "selective"):
        yield ConfigError("model.activations_checkpoint_granularity",
                          f"{granularity!r} is not a granularity: full (whole layers, needs method and num_layers) "
                          "or selective (attention core only)")
        return
    if granularity == "selective":
        if n is not None:
            yield ConfigError("model.activations_checkpoint_num_layers",
                              "selective checkpointing takes no layer count (megatron-core refuses one); set it to null")
        return
    if method not in ("uniform", "block"):
        yield ConfigError("model.activations_checkpoint_method",
                          f"granularity=full needs method uniform (checkpoint every num_layers layers) or block "
                          f"(the first num_layers layers of each stage), not {method!r}")
    top = f"1..{layers_per_stage} (the layers per pipeline stage)" if layers_per_stage else ">= 1"
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (layers_per_stage and n > layers_per_stage):
        yield ConfigError("model.activations_checkpoint_num_layers",
                          f"granularity=full needs a layer count in {top}, not {n!r}")


def _check_srun_layout(cfg, total_ok: bool) -> Iterable[ConfigError]:
    """Under srun: the step's nodes = trainer.num_nodes and its tasks on every node = trainer.devices."""
    step = slurm.srun_step()
    if step is None:
        return
    devices = _int(cfg, "trainer.devices", 1)
    nodes = _int(cfg, "trainer.num_nodes", 1)
    if step.nodes != nodes:
        yield ConfigError("trainer.num_nodes",
                          f"SLURM started this job step on {step.nodes} node(s) but trainer.num_nodes = {nodes}; "
                          f"sbatch --nodes {nodes} --ntasks-per-node {devices}, or pick the matching parallel=<profile>")
    # A wrong total is reported above; uneven placement with the right total (or on the wrong node count) here.
    if (total_ok or step.nodes != nodes) and any(n != devices for n in step.tasks_per_node):
        yield ConfigError("trainer.devices",
                          f"SLURM placed {','.join(map(str, step.tasks_per_node))} task(s) on its "
                          f"{step.nodes} node(s) but trainer.devices = {devices} (one task per device on every "
                          f"node); sbatch --ntasks-per-node {devices}")


def check_peft(cfg) -> Iterable[ConfigError]:
    scheme = str(OmegaConf.select(cfg, "model.peft.peft_scheme", default="none"))
    try:
        schemes = schemes_of(scheme)
    except ConfigError as err:
        yield err
        return
    optim = OmegaConf.select(cfg, "model.optim.name", default=None)
    if scheme != "none" and optim in ("distributed_fused_adam", "mcore_distributed_optim"):
        yield ConfigError("model.optim.name",
                          f"{optim} shards the whole model's optimizer state and NeMo refuses it with PEFT; "
                          "use model.optim.name=fused_adam (GPU, apex) or adam")
    if "qlora" in schemes and str(OmegaConf.select(cfg, "trainer.accelerator", default="gpu")) == "cpu":
        yield ConfigError("model.peft.peft_scheme",
                          "qlora quantizes the base to NF4 with Transformer Engine and NVIDIA modelopt, which exist "
                          "only on GPUs in the NGC container; use peft=lora on CPU (nemo-ft plan sizes qlora anywhere)")
    if "lora" in schemes or "qlora" in schemes:
        dim = _int(cfg, "model.peft.lora_tuning.adapter_dim", 0)
        if dim < 1:
            yield ConfigError("model.peft.lora_tuning.adapter_dim", f"must be a positive rank, got {dim}")
        try:
            targets = lora_targets(OmegaConf.select(cfg, "model.peft.lora_tuning.target_modules", default=None))
        except ConfigError as err:
            yield err
            return
        act = OmegaConf.select(cfg, "model.activation", default=None)
        if "mlp_fc1" in targets and act in ("swiglu", "geglu", "reglu"):
            yield ConfigError("model.activation",
                              f"LoRA on mlp_fc1 with activation={act} crashes in NeMo (it doubles the fc1 "
                              f"adapter width only for {', '.join(FAST_GATED)}); use fast-{act}")


def _have_nvidia_apex() -> bool:
    # PyPI's "apex" is another project; NVIDIA's ships the amp_C extension.
    return importlib.util.find_spec("amp_C") is not None


def check_stack(cfg) -> Iterable[ConfigError]:
    """Settings that need NVIDIA apex, which exists only in the NGC container."""
    if _have_nvidia_apex():
        return
    optim = OmegaConf.select(cfg, "model.optim.name", default=None)
    if optim in ("fused_adam", "distributed_fused_adam"):
        yield ConfigError("model.optim.name", f"{optim} needs NVIDIA apex (NGC container), which is not installed "
                                              "here; use model.optim.name=adam")
    if OmegaConf.select(cfg, "model.megatron_amp_O2", default=False):
        yield ConfigError("model.megatron_amp_O2", "O2 (bf16 weights with fp32 main params) needs NVIDIA apex (NGC "
                                                   "container), which is not installed here; set it to false")


def check_data(cfg) -> Iterable[ConfigError]:
    packed = OmegaConf.select(cfg, "model.data.train_ds.packed_sequence", default=False)
    if packed and _int(cfg, "model.micro_batch_size", 1) != 1:
        yield ConfigError("model.micro_batch_size",
                          "packed sequences need micro_batch_size=1 (each pack already holds many examples)")
    for split, required in (("train_ds", True), ("validation_ds", True), ("test_ds", False)):
        key = f"model.data.{split}.file_names"
        if OmegaConf.is_missing(cfg, key):
            yield ConfigError(key, "is required: a list of JSONL files (e.g. the train.jsonl written by `nemo-ft prep`)")
            continue
        files = _files(OmegaConf.select(cfg, key, default=None))
        if required and not files:
            yield ConfigError(key, "is empty: give at least one JSONL file")
        for f in files:
            if not Path(f).exists():
                yield ConfigError(key, f"file not found: {f}")
    yield from _check_data_sizes(cfg, packed)
    probs = OmegaConf.select(cfg, "model.data.train_ds.concat_sampling_probabilities", default=None)
    train_files = [] if OmegaConf.is_missing(cfg, "model.data.train_ds.file_names") else \
        _files(OmegaConf.select(cfg, "model.data.train_ds.file_names", default=None))
    if probs is not None and train_files:
        if len(probs) != len(train_files):
            yield ConfigError("model.data.train_ds.concat_sampling_probabilities",
                              f"{len(probs)} probabilities for {len(train_files)} train files; give one per file")
        elif abs(sum(float(p) for p in probs) - 1.0) > 1e-6:
            yield ConfigError("model.data.train_ds.concat_sampling_probabilities",
                              f"must sum to 1, got {sum(float(p) for p in probs):g}")
    template = OmegaConf.select(cfg, "model.data.train_ds.prompt_template", default=None)
    label = OmegaConf.select(cfg, "model.data.train_ds.label_key", default="output")
    if OmegaConf.select(cfg, "model.data.chat", default=False):
        template = None  # chat data is rendered by NeMo's chat dataset, not by the prompt template
    if template and not str(template).rstrip().endswith("{" + str(label) + "}"):
        yield ConfigError("model.data.train_ds.prompt_template",
                          f"{template!r} must end with the label {{{label}}} (NeMo trains on what follows the prompt)")
    seq = _int(cfg, "model.data.train_ds.max_seq_length")
    max_pos = _int(cfg, "model.max_position_embeddings")
    if seq is not None and max_pos is not None and seq > max_pos:
        yield ConfigError("model.data.train_ds.max_seq_length",
                          f"{seq} exceeds the model's max_position_embeddings={max_pos}")


def _rows(files) -> int:
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(1 for line in fh if line.strip())
    return n


def _check_data_sizes(cfg, packed: bool) -> Iterable[ConfigError]:
    """NeMo's SFT sampler repeats a train set smaller than one global batch without a word (one row
    trains "2 steps, 16 samples"), and a validation set smaller than one micro batch per data-parallel
    rank gives no validation batch (drop_last). Refused unless run.allow_repeat=true."""
    if packed or OmegaConf.select(cfg, "run.allow_repeat", default=False):
        return
    world = world_size(cfg)
    tp, pp = _int(cfg, "model.tensor_model_parallel_size", 1), _int(cfg, "model.pipeline_model_parallel_size", 1)
    dp = max(1, world // (tp * pp)) if world else 1
    mbs = _int(cfg, "model.micro_batch_size", 1)
    gbs = _int(cfg, "model.global_batch_size", mbs)
    for split, need, what in (("train_ds", gbs, f"one global batch (model.global_batch_size={gbs})"),
                              ("validation_ds", mbs * dp, f"one micro batch per data-parallel rank "
                                                          f"(model.micro_batch_size x DP = {mbs} x {dp})")):
        key = f"model.data.{split}.file_names"
        if OmegaConf.is_missing(cfg, key):
            continue
        files = _files(OmegaConf.select(cfg, key, default=None))
        if not files or not all(Path(f).exists() for f in files):
            continue
        n = _rows(files)
        if n < need:
            yield ConfigError(key, f"{n} row(s), fewer than {what}: NeMo would "
                                   + ("repeat them to fill every batch" if split == "train_ds" else
                                      "run no validation batch") + "; add rows, lower the batch size, or set "
                                   "run.allow_repeat=true")


def check_prep_provenance(cfg) -> Iterable[ConfigError | InputError]:
    """Data written by `nemo-ft prep` carries its run's manifest: the file must be the one prep wrote,
    and prep's task, template, lengths and tokenizer must match what SFT will use."""
    if OmegaConf.is_missing(cfg, "model.data.train_ds.file_names"):
        return
    key = "model.data.train_ds.file_names"
    seen = set()
    for f in _files(OmegaConf.select(cfg, key, default=None)):
        if not Path(f).exists():
            continue
        try:
            m = artifacts.manifest_next_to(f)
            if m is None or m.path in seen:
                continue
            seen.add(m.path)
            if m.stage != "prep":
                continue
            m.verify(m.record_for(f))
        except InputError as err:
            yield err
            continue
        task, chat = m.summary.get("task", "sft"), bool(OmegaConf.select(cfg, "model.data.chat", default=False))
        if task == "dpo":
            yield ConfigError(key, f"{f} is preference (DPO) data ({m.path}); SFT needs prep task=sft or task=chat")
            continue
        if (task == "chat") != chat:
            yield ConfigError("model.data.chat",
                              f"{f} was prepared with task={task} ({m.path}) but model.data.chat={chat}; "
                              + ("use data=chat (model.data.chat=true)" if task == "chat" else
                                 "set model.data.chat=false or re-run prep with task=chat"))
            continue
        longest = _prep_longest(m)
        max_len = OmegaConf.select(cfg, "model.data.train_ds.max_seq_length", default=None)
        if longest is not None and max_len is not None and int(longest) > int(max_len):
            yield ConfigError("model.data.train_ds.max_seq_length",
                              f"{f} has examples of up to {longest} tokens ({m.dir / 'stats.json'}) but "
                              f"max_seq_length={max_len}: NeMo would cut them silently; re-run prep with "
                              f"seq_length={max_len} or raise it")
        template = m.summary.get("template") or {}
        ds = "model.data.train_ds"
        for k in ("prompt_template", "label_key", "add_eos", "add_bos") if task == "sft" else ():
            want, have = template.get(k), OmegaConf.select(cfg, f"{ds}.{k}", default=None)
            if want is not None and have is not None and want != have:
                yield ConfigError(f"{ds}.{k}", f"{f} was prepared with {k}={want!r} ({m.path}) but sft uses "
                                               f"{have!r}; set {ds}.{k}={want!r} or re-run prep")
        tokenizer = m.summary.get("tokenizer") or {}
        base = OmegaConf.select(cfg, "model.restore_from_path", default=None)
        if tokenizer.get("sha256") and base and Path(base).exists():
            try:
                with NemoArchive(base) as archive:
                    base_tok = archive.tokenizer_sha256()
            except InputError:
                base_tok = None  # check_restore reports an unreadable base
            if base_tok and base_tok != tokenizer["sha256"]:
                yield ConfigError(f"{ds}.file_names",
                                  f"{f} was tokenized by prep with {tokenizer.get('model')} (sha256 "
                                  f"{tokenizer['sha256'][:12]}), but {Path(base).name} carries another tokenizer "
                                  f"(sha256 {base_tok[:12]}); re-run prep with tokenizer.model set to the base's "
                                  "tokenizer")


def _prep_longest(m) -> int | None:
    """The longest train example prep wrote, from its stats.json (if that is listed and intact)."""
    import json

    record = m.records("stats")
    if not record:
        return None
    try:
        m.verify(record[0])
        return json.loads(m.output("stats", verify=False).read_text())["splits"]["train"]["max"]
    except (InputError, ValueError, KeyError, TypeError):
        return None


def check_restore(cfg, key: str = "model.restore_from_path") -> Iterable[ConfigError | InputError]:
    """The base .nemo `key` names: readable, the profile's architecture, TE, a layout NeMo can load."""
    if OmegaConf.is_missing(cfg, key) or not OmegaConf.select(cfg, key):
        yield ConfigError(key, "is required: the base model .nemo to fine-tune")
        return
    path = Path(OmegaConf.select(cfg, key))
    if not path.exists():
        yield ConfigError(key, f"file not found: {path}")
        return
    try:
        with NemoArchive(path, key=key) as archive:
            base, layout = archive.config(), archive.layout()
    except InputError as err:
        yield err
        return
    if OmegaConf.select(cfg, "run.check_arch", default=True):
        for k in ARCH_KEYS:
            want = OmegaConf.select(cfg, f"model.{k}", default=None)
            have = base.get(k)
            if want is not None and have is not None and want != have:
                yield ConfigError(f"model.{k}",
                                  f"the model profile says {want!r} but {path.name} was built with {have!r}; "
                                  "pick the matching model=<profile> (or run.check_arch=false)")
    te_wanted = OmegaConf.select(cfg, "model.transformer_engine", default=None)
    if base.get("transformer_engine") and te_wanted is not False and importlib.util.find_spec("transformer_engine") is None:
        yield ConfigError(key,
                          f"{path.name} was built with Transformer Engine's layer spec (transformer_engine: true), "
                          "whose weights only load with TE installed (NGC container); run there")
    # NeMo's mcore .nemo checkpoints (a model_weights/ directory) reshard on load; the legacy per-rank
    # layout (mp_rank_XX/model_weights.ckpt) only restores at the TP/PP it was saved with.
    tp = _int(cfg, "model.tensor_model_parallel_size", 1)
    pp = _int(cfg, "model.pipeline_model_parallel_size", 1)
    if layout.kind != "distributed" and (layout.tp, layout.pp) != (tp, pp):
        yield ConfigError("model.tensor_model_parallel_size",
                          f"{path.name} holds legacy per-rank weights saved at TP={layout.tp} PP={layout.pp}, which "
                          f"NeMo cannot load at TP={tp} PP={pp}; reshard it first "
                          f"(`nemo-ft export` writes TP=1) or request TP={layout.tp} PP={layout.pp}")


def fill_defaults(cfg: DictConfig) -> list[str]:
    """Fill what NeMo insists on but can be derived; returns notes on what was changed."""
    notes = []
    # Lightning refuses val_check_interval > the number of training batches (= max_steps here).
    vci, max_steps = OmegaConf.select(cfg, "trainer.val_check_interval"), OmegaConf.select(cfg, "trainer.max_steps")
    if isinstance(vci, int) and isinstance(max_steps, int) and 0 < max_steps < vci:
        cfg.trainer.val_check_interval = max_steps
        notes.append(f"trainer.val_check_interval {vci} -> {max_steps} (= trainer.max_steps)")
    # NeMo insists on concat_sampling_probabilities even for one file; default to equal shares.
    ds = OmegaConf.select(cfg, "model.data.train_ds")
    if ds is not None and ds.get("concat_sampling_probabilities") is None and not OmegaConf.is_missing(ds, "file_names"):
        n = len(_files(ds.file_names))
        if n:
            ds.concat_sampling_probabilities = [1.0 / n] * n
    return notes


def check_adapter_layout(cfg, key: str = "model.peft.restore_from_path") -> Iterable[ConfigError | InputError]:
    """A PEFT .nemo holds one weights file per TP/PP rank; NeMo's load_adapters reads the file of this
    rank's (tp, pp) coordinates without resharding: at another layout it fails on shapes or (a TP=1
    adapter at TP=2, every rank reading the one file) loads what does not belong to it (NeMo #8642,
    #10280). Refused here, with the layout the adapter has and how to convert it."""
    path = OmegaConf.select(cfg, key, default=None)
    if not path or not Path(str(path)).exists():
        return
    with NemoArchive(path, key=key) as archive:
        try:
            layout = archive.layout()
        except InputError as err:
            yield err
            return
    tp = _int(cfg, "model.tensor_model_parallel_size", 1)
    pp = _int(cfg, "model.pipeline_model_parallel_size", 1)
    if layout.kind != "distributed" and (layout.tp, layout.pp) != (tp, pp):  # distributed ones reshard on load
        how = (f"`nemo-ft export adapter={path} base=<its base .nemo> out_dir=DIR` writes DIR/adapter_tp1.nemo, "
               "the same adapter at TP=1 PP=1" if (tp, pp) == (1, 1) else
               f"run at TP={layout.tp} PP={layout.pp} (parallel=...), or train from it at TP=1 PP=1 "
               "(`nemo-ft export` writes adapter_tp1.nemo)")
        yield ConfigError(key, f"{Path(str(path)).name} was saved at TP={layout.tp} PP={layout.pp}; this run is TP={tp} "
                               f"PP={pp}, and NeMo loads adapters only at the layout they were saved with (no "
                               f"reshard): {how}")


def validate_sft(cfg: DictConfig, skip=frozenset()) -> list[ConfigError | InputError]:
    """Every SFT check; `skip` = keys whose .nemo already failed its safety check (not read again)."""
    errors: list = []
    checks = [check_steps, check_parallel, check_peft, check_stack, check_data, check_prep_provenance]
    if "model.restore_from_path" not in skip:
        checks.insert(0, check_restore)
    if "model.peft.restore_from_path" not in skip:
        checks.append(check_adapter_layout)
    for check in checks:
        errors.extend(check(cfg))
    return errors


def check_aligner_loop(cfg, section: str) -> Iterable[ConfigError]:
    """NeMo-Aligner's trainer loops (trainer.dpo, trainer.rm, ...) assert these mid-run."""
    loop = OmegaConf.select(cfg, f"trainer.{section}")
    if loop is None:
        return
    vci, save = loop.get("val_check_interval"), loop.get("save_interval")
    if isinstance(vci, int) and isinstance(save, int) and vci > 0 and save % vci:
        yield ConfigError(f"trainer.{section}.save_interval", f"{save} must be a multiple of val_check_interval={vci} "
                                                             "(NeMo-Aligner asserts it after the model is built)")
