"""The prep stage, top to bottom: config in, checked/deduplicated/split/mixed/packed files out.

One streaming pass over the inputs: the main process reads raw lines in chunks and hands them
to a pool of workers (parse, detect, normalize, template + tokenize, MinHash LSH band keys of
the whole chunk at once); results come back in order, and the main process alone decides
duplicates (first one wins, so order must be kept), assigns splits and appends to the split
files. A bounded window of chunks in flight keeps memory flat however big the input is; what
does grow with the row count is kept small: ~100 bytes a row for the dedup index, lengths and
offsets, while token ids go to a spill file and packs are streamed into the .npy. Then a short
second pass over train applies the mixing weights, packing runs on the kept token ids, and
manifest.json is written last: a directory with a manifest is a complete one.
"""
import itertools
import json
import multiprocessing
import os
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from nemo_ft.config import ConfigError
from nemo_ft.data import formats, mix, pack as packing, stats
from nemo_ft.data.dedup import Deduper, band_keys, decode_where, encode_where, lsh_params, signatures
from nemo_ft.data.errors import PrepError
from nemo_ft.data.formats import REASONS, RowReject
from nemo_ft.data.manifest import atomic_write, sha256_file, temp_path, versions, write_json
from nemo_ft.data.pack import save_object_npy
from nemo_ft.data.normalize import dedup_text, example_key
from nemo_ft.data.split import SPLITS, assign_split, check_ratios
from nemo_ft.data.tokenize import Template, Tokenizer, check_template, encode_chat, fit_dpo, fit_sft

TASKS = ("sft", "chat", "dpo")
PREFIX_MISMATCH = ("fix", "reject")
DETECT_LINES = 1000  # how far into a file we look for the first row that reveals its format


@dataclass
class InputSpec:
    path: str
    weight: float = 1.0
    format: str = "auto"
    split: Optional[str] = None  # force every row of this input into one split


@dataclass
class PrepConfig:
    inputs: List[InputSpec]
    out_dir: str
    task: str = "sft"
    tokenizer_library: str = "sentencepiece"
    tokenizer_model: str = ""
    template: Template = field(default_factory=Template)
    seq_length: int = 2048
    over_length: str = "truncate"
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.85
    num_perm: int = 64
    shingle_size: int = 3
    split: Dict[str, float] = field(default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05})
    split_seed: int = 1234
    mix_total: Optional[int] = None
    mix_seed: int = 1234
    pack: bool = False
    pack_splits: List[str] = field(default_factory=lambda: ["train"])
    seed: int = 0
    workers: int = 0
    chunk_size: int = 1000
    progress: bool = True
    dpo_prefix_mismatch: str = "fix"
    dpo_append_eod: bool = False
    dpo_prompt_format: str = "plain"

    @classmethod
    def from_dict(cls, c: dict) -> "PrepConfig":
        """Validate the resolved Hydra config; every failure names its key."""
        raw_inputs = list(c.get("inputs") or [])
        if c.get("input"):
            raw_inputs = [c["input"]] + raw_inputs
        if not raw_inputs:
            raise ConfigError("input", "no input given: pass input=FILE.jsonl or inputs=[{path: FILE, weight: 1}]")
        inputs = []
        for i, item in enumerate(raw_inputs):
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict) or "path" not in item:
                raise ConfigError(f"inputs[{i}]", f"expected a path or {{path: ..., weight: ...}}, got {item!r}")
            unknown = set(item) - {"path", "weight", "format", "split"}
            if unknown:
                raise ConfigError(f"inputs[{i}]", f"unknown keys {sorted(unknown)}; allowed: path, weight, format, split")
            spec = InputSpec(path=str(item["path"]), weight=float(item.get("weight", 1.0)),
                             format=item.get("format") or c.get("format") or "auto", split=item.get("split"))
            if not os.path.isfile(spec.path):
                raise ConfigError(f"inputs[{i}].path", f"no such file: {spec.path}")
            if spec.format != "auto" and spec.format not in formats.FORMATS:
                raise ConfigError(f"inputs[{i}].format", f"unknown format {spec.format!r}; expected auto or one of {list(formats.FORMATS)}")
            if spec.split is not None and spec.split not in SPLITS:
                raise ConfigError(f"inputs[{i}].split", f"expected one of {SPLITS}, got {spec.split!r}")
            if spec.weight < 0:
                raise ConfigError(f"inputs[{i}].weight", f"must be >= 0, got {spec.weight}")
            inputs.append(spec)
        task = c.get("task", "sft")
        if task not in TASKS:
            raise ConfigError("task", f"expected one of {TASKS}, got {task!r}")
        tcfg = dict(c.get("template") or {})
        try:
            template = Template(**tcfg)
        except TypeError as err:
            raise ConfigError("template", f"{err}; allowed: {list(Template.__dataclass_fields__)}") from None
        if task == "sft":
            template.check_keys()
        seq_length = c.get("seq_length", 2048)
        if not isinstance(seq_length, int) or seq_length < 2:
            raise ConfigError("seq_length", f"expected an integer >= 2, got {seq_length!r}")
        over = c.get("over_length", "truncate")
        if over not in ("truncate", "reject"):
            raise ConfigError("over_length", f"expected truncate or reject, got {over!r}")
        if c.get("pack") and task == "dpo":
            raise ConfigError("pack", "prep packs NeMo's SFT format (GPTSFTPackedDataset): pack needs task=sft or "
                                      "task=chat; for packed DPO run NeMo-Aligner's prepare_packed_dpo_dataset.py "
                                      "on prep's DPO output (its packs hold chosen+rejected pairs)")
        dpo = dict(c.get("dpo") or {})
        unknown = set(dpo) - {"prefix_mismatch", "append_eod", "prompt_format"}
        if unknown:
            raise ConfigError("dpo", f"unknown keys {sorted(unknown)}; allowed: prefix_mismatch, append_eod, "
                                     "prompt_format")
        prompt_format = dpo.get("prompt_format", "plain")
        if prompt_format not in formats.DPO_PROMPT_FORMATS:
            raise ConfigError("dpo.prompt_format", f"expected one of {formats.DPO_PROMPT_FORMATS}, got {prompt_format!r}")
        prefix_mismatch = dpo.get("prefix_mismatch", "fix")
        if prefix_mismatch not in PREFIX_MISMATCH:
            raise ConfigError("dpo.prefix_mismatch", f"expected fix or reject, got {prefix_mismatch!r}")
        dedup = dict(c.get("dedup") or {})
        split = dict(c.get("split") or {})
        split_seed = split.pop("seed", 1234)
        pk = dict(c.get("pack_options") or {})
        pack_splits = list(pk.get("splits", ["train"]))
        for s in pack_splits:
            if s not in SPLITS:
                raise ConfigError("pack_options.splits", f"unknown split {s!r}")
        tok = dict(c.get("tokenizer") or {})
        m = dict(c.get("mix") or {})
        threshold = float(dedup.get("near_threshold", 0.85))
        if not 0 < threshold <= 1:
            raise ConfigError("dedup.near_threshold", f"must be in (0, 1], got {threshold}")
        return cls(
            inputs=inputs, out_dir=str(c.get("out_dir") or "runs/prep"), task=task,
            tokenizer_library=tok.get("library", "sentencepiece"), tokenizer_model=str(tok.get("model") or ""),
            template=template, seq_length=seq_length, over_length=over,
            dedup_exact=bool(dedup.get("exact", True)), dedup_near=bool(dedup.get("near", True)),
            near_threshold=threshold, num_perm=int(dedup.get("num_perm", 64)),
            shingle_size=int(dedup.get("shingle_size", 3)),
            split=check_ratios(split) if split else check_ratios({"train": 0.9, "validation": 0.05, "test": 0.05}),
            split_seed=int(split_seed), mix_total=m.get("total"), mix_seed=int(m.get("seed", 1234)),
            pack=bool(c.get("pack", False)), pack_splits=pack_splits, seed=int(c.get("seed", 0)),
            workers=int(c.get("workers", 0)), chunk_size=int(c.get("chunk_size", 1000)),
            progress=bool(c.get("progress", True)),
            dpo_prefix_mismatch=prefix_mismatch, dpo_append_eod=bool(dpo.get("append_eod", False)),
            dpo_prompt_format=prompt_format,
        )


# ---------------------------------------------------------------- worker side (one per core)

_W = {}


def _init_worker(cfg: PrepConfig) -> None:
    _W["cfg"] = cfg
    _W["tok"] = Tokenizer(cfg.tokenizer_library, cfg.tokenizer_model)
    _W["lsh"] = lsh_params(cfg.near_threshold, cfg.num_perm) if cfg.dedup_near else None


def _process_chunk(chunk, fmt: str):
    """Everything that needs no global state: parse → canonical → template/tokens → MinHash.

    Returns (rows, band keys of the accepted rows or None, their token ids concatenated or None,
    their per-token chat loss masks concatenated or None):
    numpy arrays per chunk instead of Python objects per row, which are slow to pickle and big.
    """
    cfg: PrepConfig = _W["cfg"]
    tok: Tokenizer = _W["tok"]
    kind = formats.kind_of(fmt)
    out, texts, id_parts, mask_parts = [], [], [], []
    for lineno, raw in chunk:
        try:
            obj = formats.parse_line(raw)
            ex = formats.to_canonical(obj, fmt)
            row = formats.for_task(ex, kind, cfg.task, cfg.dpo_prompt_format)
            key_fields = formats.identity_fields(ex, kind)
            truncated, ids, start, fixed = False, None, 0, False
            if cfg.task == "sft":
                fit = fit_sft(tok, cfg.template, row, cfg.seq_length, cfg.over_length == "truncate")
                if fit is None:
                    n = len(fit_sft(tok, cfg.template, row, 10**9, False)[1])
                    raise RowReject("too_long", f"{n} tokens > seq_length={cfg.seq_length}"
                                    + (" and truncation_field cannot absorb it" if cfg.over_length == "truncate" else ""))
                row, ids, start, truncated = fit
                ntok = len(ids)
            elif cfg.task == "dpo":
                row, ntok, truncated, fixed = fit_dpo(tok, row, cfg.seq_length, cfg.over_length == "truncate",
                                                      cfg.dpo_prefix_mismatch == "fix", cfg.dpo_append_eod)
            else:
                # GPTSFTChatDataset's input_ids and loss mask for this row, token for token
                ids, chat_mask = encode_chat(tok, row)
                ntok = len(ids)
                if ntok > cfg.seq_length:
                    raise RowReject("too_long", f"{ntok} tokens > seq_length={cfg.seq_length}")
            norm = [dedup_text(f) for f in key_fields]  # once: both the key and the shingles use it
            if cfg.dedup_near:
                texts.append(" ".join(norm))
            if cfg.pack:
                id_parts.append(ids)
                if cfg.task == "chat":
                    mask_parts.append(chat_mask)
            line = json.dumps(row, ensure_ascii=False)
            out.append((lineno, None, line, example_key(norm, normalized=True), start, ntok, truncated, fixed))
        except RowReject as rej:
            out.append((lineno, rej.reason, rej.detail))
    bands = None
    if cfg.dedup_near:
        b, r = _W["lsh"]
        bands = band_keys(signatures(texts, cfg.shingle_size, cfg.num_perm), b, r)
    ids = np.fromiter(itertools.chain.from_iterable(id_parts), dtype=np.int32) if cfg.pack else None
    masks = (np.fromiter(itertools.chain.from_iterable(mask_parts), dtype=np.uint8)
             if cfg.pack and cfg.task == "chat" else None)
    return out, bands, ids, masks


# ---------------------------------------------------------------- main process


def _detect(spec: InputSpec, task: str) -> str:
    if spec.format != "auto":
        fmt = spec.format
        line = None
    else:
        fmt, line, seen = None, None, set()
        for lineno, raw in formats.read_lines(spec.path):
            try:
                obj = formats.parse_line(raw)
            except RowReject:
                continue
            seen.update(obj.keys())
            fmt = formats.detect_format(obj)
            if fmt:
                line = lineno
                break
            if lineno >= DETECT_LINES:
                break
        if fmt is None:
            raise PrepError(f"cannot detect the format: no row in the first {DETECT_LINES} lines has the keys of "
                            f"any known format (keys seen: {sorted(seen)[:12]}); known: {list(formats.FORMATS)}. "
                            f"Force one with format=<name>", path=spec.path, key="format")
    kind = formats.kind_of(fmt)
    if kind not in formats.TASK_KINDS[task]:
        hint = "task=dpo" if kind == "pref" else "task=sft or task=chat"
        raise PrepError(f"{fmt} rows ({kind}) cannot feed task={task}; use {hint}", path=spec.path, line=line,
                        key="task")
    return fmt


def _chunks(path: str, size: int):
    chunk = []
    for item in formats.read_lines(path):
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _results(pool, chunks, fmt, window):
    if pool is None:
        for c in chunks:
            yield c, _process_chunk(c, fmt)
        return
    pending = deque()
    for c in chunks:
        pending.append((c, pool.apply_async(_process_chunk, (c, fmt))))
        if len(pending) >= window:
            c0, r = pending.popleft()
            yield c0, r.get()
    while pending:
        c0, r = pending.popleft()
        yield c0, r.get()


def _workers(cfg: PrepConfig) -> int:
    n = cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)
    total = sum(os.path.getsize(s.path) for s in cfg.inputs)
    # Below ~1 MB a pool costs more than it saves (fork + tokenizer load per worker).
    return 1 if total < (1 << 20) else n


def run_prep(cfg: PrepConfig, resolved_config: Optional[dict] = None, log=print) -> dict:
    t0 = time.time()
    tok = Tokenizer(cfg.tokenizer_library, cfg.tokenizer_model)
    check_template(tok, cfg.template)
    os.makedirs(cfg.out_dir, exist_ok=True)
    out = {s: os.path.join(cfg.out_dir, f"{s}.jsonl") for s in SPLITS}
    rejects_path = os.path.join(cfg.out_dir, "rejects.jsonl")
    tmp = {s: temp_path(p) for s, p in out.items()}
    tmp_rejects = temp_path(rejects_path)
    tmp_train_raw = tmp["train"] + ".raw"
    handles = {s: open(tmp[s] if s != "train" else tmp_train_raw, "w", encoding="utf-8") for s in SPLITS}
    rej_f = open(tmp_rejects, "w", encoding="utf-8")
    created = list(tmp.values()) + [tmp_rejects, tmp_train_raw]

    fmts = [_detect(s, cfg.task) for s in cfg.inputs]
    nworkers = _workers(cfg)
    dedup = Deduper(cfg.dedup_exact, cfg.dedup_near, cfg.near_threshold, cfg.num_perm)
    per_file = [{"lines": 0, "accepted": 0, "rejected": Counter(), "truncated": 0, "dpo_prefix_fixed": 0,
                 "splits": Counter()} for _ in cfg.inputs]
    # Per kept row only a few bytes stay in RAM (arrays, not lists of ints); token ids are
    # spilled to a file per packed split.
    lengths = {s: array("i") for s in SPLITS}
    stores = {s: packing.SpillTokenStore(temp_path(os.path.join(cfg.out_dir, f"{s}.tokens")))
              for s in cfg.pack_splits} if cfg.pack else {}
    train_source = array("i")  # source index of each train row, in file order (for mixing)
    pool = None

    try:
        from tqdm import tqdm
        bar = tqdm(unit=" rows", desc="prep", disable=not cfg.progress, mininterval=0.5)
        if nworkers > 1:
            pool = multiprocessing.get_context("fork").Pool(nworkers, _init_worker, (cfg,))
        else:
            _init_worker(cfg)
        try:
            for fi, (spec, fmt) in enumerate(zip(cfg.inputs, fmts)):
                pf = per_file[fi]
                chunks = _results(pool, _chunks(spec.path, cfg.chunk_size), fmt, 2 * nworkers + 2)
                for chunk, (results, bands, ids_flat, masks_flat) in chunks:
                    raw_of = dict(chunk)
                    dedup.start_chunk([res[3] for res in results if res[1] is None], bands)
                    i_ok, tok_at = -1, 0
                    for res in results:
                        lineno = res[0]
                        pf["lines"] += 1
                        reason = res[1]
                        if reason is None:
                            _, _, line, key, start, ntok, truncated, fixed = res
                            i_ok += 1
                            tok_at += ntok if ids_flat is not None else 0
                            dup = dedup.check(i_ok, key, None if bands is None else bands[i_ok],
                                              encode_where(fi, lineno))
                            if dup is not None:
                                reason = dup[0]
                                first_file, first_line = decode_where(dup[1])
                                detail = f"same as {cfg.inputs[first_file].path}:{first_line}"
                        else:
                            detail = res[2]
                        if reason is not None:
                            pf["rejected"][reason] += 1
                            rej_f.write(json.dumps({"file": spec.path, "line": lineno, "reason": reason,
                                                    "detail": detail,
                                                    "raw": raw_of[lineno].decode("utf-8", "replace")},
                                                   ensure_ascii=False) + "\n")
                            continue
                        split = spec.split or assign_split(key, cfg.split, cfg.split_seed)
                        handles[split].write(line + "\n")
                        pf["accepted"] += 1
                        pf["splits"][split] += 1
                        pf["truncated"] += int(truncated)
                        pf["dpo_prefix_fixed"] += int(fixed)
                        lengths[split].append(ntok)
                        if split == "train":
                            train_source.append(fi)
                        if split in stores:
                            stores[split].add(ids_flat[tok_at - ntok:tok_at], start,
                                              None if masks_flat is None else masks_flat[tok_at - ntok:tok_at])
                    bar.update(len(results))
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            bar.close()
        for h in list(handles.values()) + [rej_f]:
            h.close()
        dedup = None  # its index is the biggest thing left in memory; packing needs the room
        # The histogram (matplotlib: ~1 s, mostly import) is drawn by an idle worker while this
        # process mixes, packs and hashes.
        png = os.path.join(cfg.out_dir, "lengths.png")
        lens = {s: np.asarray(v, dtype=np.int64) for s, v in lengths.items()}
        truncated = sum(p["truncated"] for p in per_file)
        dpo_fixed = sum(p["dpo_prefix_fixed"] for p in per_file)
        plot_args = (png, lens, cfg.seq_length, truncated)
        plot_job = None
        if pool is not None:
            plot_job = pool.apply_async(stats.plot_lengths, plot_args)
            pool.close()

        # ---- accounting: every line read is either written once or rejected once
        counts_in = sum(p["lines"] for p in per_file)
        accepted = sum(p["accepted"] for p in per_file)
        rejected = Counter()
        for p in per_file:
            rejected.update(p["rejected"])
            assert p["lines"] == p["accepted"] + sum(p["rejected"].values())
        assert counts_in == accepted + sum(rejected.values())
        split_counts = {s: sum(p["splits"][s] for p in per_file) for s in SPLITS}
        if accepted == 0:
            os.replace(tmp_rejects, rejects_path)
            raise PrepError(f"no examples left: all {counts_in} lines were rejected "
                            f"({dict(rejected)}); see {rejects_path}")
        empty = [s for s in SPLITS if cfg.split[s] > 0 and split_counts[s] == 0]
        if empty:
            raise PrepError(f"split(s) {empty} got no examples out of {accepted}: add data or set "
                            + " ".join(f"split.{s}=0" for s in empty) + " (and rebalance the others)", key="split")

        # ---- mixing: multiplicity of each train row
        src = np.asarray(train_source, dtype=np.int64)
        mixing_sources = [i for i, s in enumerate(cfg.inputs) if s.split in (None, "train")]
        available = [int((src == i).sum()) for i in range(len(cfg.inputs))]
        mult = np.ones(len(src), dtype=np.int64)
        mix_report = None
        if len(mixing_sources) > 1:
            weights = [cfg.inputs[i].weight if i in mixing_sources else 0.0 for i in range(len(cfg.inputs))]
            targets = mix.plan_counts(available, weights, cfg.mix_total)
            for i in range(len(cfg.inputs)):
                rows = np.nonzero(src == i)[0]
                mult[rows] = mix.multiplicities(len(rows), targets[i], cfg.mix_seed, i)
            written = [int(mult[src == i].sum()) for i in range(len(cfg.inputs))]
            mix_report = mix.report([s.path for s in cfg.inputs], available, written, weights)
        with open(tmp_train_raw, encoding="utf-8") as fin, open(tmp["train"], "w", encoding="utf-8") as fout:
            for m, line in zip(mult, fin):
                if m:
                    fout.write(line * int(m))
        os.remove(tmp_train_raw)
        train_written = int(mult.sum())
        downsampled = int((mult == 0).sum())

        for s in SPLITS:
            os.replace(tmp[s], out[s])
        os.replace(tmp_rejects, rejects_path)

        # ---- packing
        pack_report = None
        packed_files = []
        if cfg.pack:
            pack_report, metas = {}, []
            for s in cfg.pack_splits:
                rows = np.repeat(np.arange(len(stores[s])), mult) if s == "train" else np.arange(len(stores[s]))
                if len(rows) == 0:
                    continue
                t = time.time()
                bins, meta = packing.plan_packs(stores[s], rows, cfg.seq_length, cfg.seed)
                name = f"packed_{cfg.seq_length}_seed{cfg.seed}.npy"
                path = os.path.join(cfg.out_dir, name if s == "train" else f"{s}_{name}")
                with atomic_write(path, "wb") as f:  # streamed: packs are never all in memory
                    save_object_npy(f, packing.iter_packs(stores[s], rows, bins, tok.eos_id), count=len(bins))
                del bins
                meta["seconds"] = round(time.time() - t, 3)
                meta["split"] = s
                pack_report[s] = {**meta, "file": os.path.basename(path)}
                metas.append({k: meta[k] for k in ("dataset_max_seqlen", "max_samples_per_bin", "packing_factor",
                                                   "packing_efficiency", "pack_size", "min_packed_seqlen")})
                packed_files.append(path)
            meta_path = os.path.join(cfg.out_dir, f"packed_{cfg.seq_length}_seed{cfg.seed}_metadata.json")
            write_json(meta_path, metas)
            packed_files.append(meta_path)

        # ---- stats + plot
        st = {"seq_length": cfg.seq_length, "splits": {s: stats.length_stats(v, cfg.seq_length) for s, v in lens.items()},
              "truncated": truncated, "dpo_prefix_fixed": dpo_fixed, "rejected": dict(rejected), "mix": mix_report, "pack": pack_report}
        stats_path = os.path.join(cfg.out_dir, "stats.json")
        write_json(stats_path, st)
        if plot_job is None:
            stats.plot_lengths(*plot_args)
        else:
            plot_job.get()
            pool.join()
            pool = None

        # ---- manifest, last
        outputs = [*out.values(), rejects_path, stats_path, png, *packed_files]
        elapsed = time.time() - t0
        manifest = {
            "stage": "prep",
            "task": cfg.task,
            "created_unix": int(time.time()),
            "seconds": round(elapsed, 3),
            "examples_per_second": round(counts_in / elapsed, 1) if elapsed else None,
            "workers": nworkers,
            "inputs": [{"path": os.path.abspath(s.path), "sha256": sha256_file(s.path), "bytes": os.path.getsize(s.path),
                        "format": f, "weight": s.weight, "split": s.split, "lines": p["lines"],
                        "accepted": p["accepted"], "truncated": p["truncated"],
                        "dpo_prefix_fixed": p["dpo_prefix_fixed"],
                        "rejected": {r: p["rejected"][r] for r in REASONS if p["rejected"][r]},
                        "splits": dict(p["splits"])}
                       for s, f, p in zip(cfg.inputs, fmts, per_file)],
            "outputs": {os.path.basename(p): {"sha256": sha256_file(p), "bytes": os.path.getsize(p)} for p in outputs},
            "counts": {
                "in": counts_in,
                "accepted": accepted,
                "rejected_total": sum(rejected.values()),
                "rejected": {r: rejected[r] for r in REASONS if rejected[r]},
                "in_equals_accepted_plus_rejected": counts_in == accepted + sum(rejected.values()),
                "truncated": truncated,
                "dpo_prefix_fixed": dpo_fixed,  # rows written with a space prepended to a response
                "splits": split_counts,
                "train_rows_written": train_written,
                "train_rows_downsampled": downsampled,
            },
            "mix": mix_report,
            "pack": pack_report,
            "tokenizer": tok.info(),
            "template": {k: getattr(cfg.template, k) for k in Template.__dataclass_fields__},
            "config": resolved_config,
            "versions": versions(),
        }
        write_json(os.path.join(cfg.out_dir, "manifest.json"), manifest)
        return manifest
    finally:
        if pool is not None:
            pool.terminate()
        for h in list(handles.values()) + [rej_f]:
            if not h.closed:
                h.close()
        for store in stores.values():
            store.close()
        for p in created:
            if os.path.exists(p):
                os.remove(p)
