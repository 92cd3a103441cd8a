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

`run_prep` reads as its sections: open the outputs, detect formats, stream the rows, account
for every line, mix, pack, stats + plot, manifest.
"""
import itertools
import json
import multiprocessing
import os
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from nemo_ft import artifacts
from nemo_ft.artifacts import atomic_write, temp_path, write_json
from nemo_ft.data import formats, mix, pack as packing, stats
from nemo_ft.data.config import InputSpec, PrepConfig
from nemo_ft.data.dedup import Deduper, band_keys, decode_where, encode_where, lsh_params, signatures
from nemo_ft.data.errors import REASONS, PrepError, RowReject
from nemo_ft.data.normalize import dedup_text, example_key
from nemo_ft.data.pack import save_object_npy
from nemo_ft.data.split import SPLITS, assign_split
from nemo_ft.data.tokenize import Template, Tokenizer, check_template, encode_chat, fit_dpo, fit_sft, rlhf_prompt

DETECT_LINES = 1000  # how far into a file we look for the first row that reveals its format


class Kept(NamedTuple):
    """A row that passed every per-row check (dedup is decided later, in file order)."""
    lineno: int
    line: str        # the output JSON line
    key: str         # dedup/split key of the normalized example
    start: int       # answer start in its token ids (packing's loss mask)
    ntok: int
    truncated: bool
    fixed: bool      # a DPO response was given a leading space


class Rejected(NamedTuple):
    lineno: int
    reason: str
    detail: str


class ChunkResult(NamedTuple):
    rows: list               # Kept | Rejected, in line order
    bands: Optional[list]    # LSH band keys of the Kept rows (near dedup on)
    ids: Optional[np.ndarray]    # token ids of the Kept rows, concatenated (pack on)
    masks: Optional[np.ndarray]  # their chat loss masks, concatenated (pack on, task=chat)


# ---------------------------------------------------------------- worker side (one per core)

_W = {}


def _init_worker(cfg: PrepConfig) -> None:
    _W["cfg"] = cfg
    _W["tok"] = Tokenizer(cfg.tokenizer_library, cfg.tokenizer_model)
    _W["lsh"] = lsh_params(cfg.near_threshold, cfg.num_perm) if cfg.dedup_near else None


def _process_chunk(chunk, fmt: str):
    """Everything that needs no global state: parse → canonical → template/tokens → MinHash.

    Per chunk, numpy arrays instead of Python objects per row, which are slow to pickle and big.
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
            elif cfg.task == "rm":
                # Aligner's RewardModelDataset skips an over-length pair *and its neighbour*: reject it here
                ntok = max(len(tok.encode(row[k]["text"])) + int(cfg.rm_append_eod) for k in ("chosen", "rejected"))
                if ntok > cfg.seq_length:
                    raise RowReject("rm_over_length", f"{ntok} tokens > seq_length={cfg.seq_length} (Aligner would "
                                                      "skip this pair and the next one)")
            elif cfg.task == "rlhf":
                row, ntok = rlhf_prompt(tok, cfg.template, row, cfg.seq_length)
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
            line = ("\n".join(json.dumps(row[k], ensure_ascii=False) for k in ("chosen", "rejected"))
                    if cfg.task == "rm" else json.dumps(row, ensure_ascii=False))
            out.append(Kept(lineno, line, example_key(norm, normalized=True), start, ntok, truncated, fixed))
        except RowReject as rej:
            out.append(Rejected(lineno, rej.reason, rej.detail))
    bands = None
    if cfg.dedup_near:
        b, r = _W["lsh"]
        bands = band_keys(signatures(texts, cfg.shingle_size, cfg.num_perm), b, r)
    ids = np.fromiter(itertools.chain.from_iterable(id_parts), dtype=np.int32) if cfg.pack else None
    masks = (np.fromiter(itertools.chain.from_iterable(mask_parts), dtype=np.uint8)
             if cfg.pack and cfg.task == "chat" else None)
    return ChunkResult(out, bands, ids, masks)


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
        hint = "task=dpo or task=rm" if kind == "pref" else "task=sft or task=chat"
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


@dataclass
class _Outputs:
    """The split files, rejects.jsonl and the token stores, all at temp paths until renamed."""
    final: Dict[str, str]
    rejects: str
    tmp: Dict[str, str]
    tmp_rejects: str
    tmp_train_raw: str  # train before mixing
    handles: dict
    rej_f: object
    stores: dict
    general: Optional[str] = None  # general.jsonl when an input is general
    tmp_general: Optional[str] = None
    general_f: object = None

    def created(self) -> List[str]:
        return list(self.tmp.values()) + [self.tmp_rejects, self.tmp_train_raw] + \
            ([self.tmp_general] if self.tmp_general else [])

    def close(self) -> None:
        for h in list(self.handles.values()) + [self.rej_f, self.general_f]:
            if h is not None and not h.closed:
                h.close()


def _open_outputs(cfg: PrepConfig) -> _Outputs:
    os.makedirs(cfg.out_dir, exist_ok=True)
    final = {s: os.path.join(cfg.out_dir, f"{s}.jsonl") for s in SPLITS}
    rejects = os.path.join(cfg.out_dir, "rejects.jsonl")
    tmp = {s: temp_path(p) for s, p in final.items()}
    tmp_train_raw = tmp["train"] + ".raw"
    handles = {s: open(tmp[s] if s != "train" else tmp_train_raw, "w", encoding="utf-8") for s in SPLITS}
    # Token ids of packed splits are spilled to a file: a few bytes a row stay in RAM.
    stores = {s: packing.SpillTokenStore(temp_path(os.path.join(cfg.out_dir, f"{s}.tokens")))
              for s in cfg.pack_splits} if cfg.pack else {}
    out = _Outputs(final, rejects, tmp, temp_path(rejects), tmp_train_raw, handles,
                   open(temp_path(rejects), "w", encoding="utf-8"), stores)
    if any(s.general for s in cfg.inputs):
        out.general = os.path.join(cfg.out_dir, "general.jsonl")
        out.tmp_general = temp_path(out.general)
        out.general_f = open(out.tmp_general, "w", encoding="utf-8")
    return out


@dataclass
class _FileCounts:
    lines: int = 0
    accepted: int = 0
    truncated: int = 0
    dpo_prefix_fixed: int = 0
    rejected: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)


@dataclass
class _Streamed:
    """What the streaming pass leaves: per-file counts, per-split lengths, train rows' sources."""
    per_file: List[_FileCounts]
    lengths: Dict[str, array]
    train_source: array  # source index of each train row, in file order (for mixing)


def _stream_rows(cfg: PrepConfig, fmts: List[str], out: _Outputs, pool, nworkers: int, bar) -> _Streamed:
    """Every line of every input is written to one split or to rejects.jsonl, in file order."""
    dedup = Deduper(cfg.dedup_exact, cfg.dedup_near, cfg.near_threshold, cfg.num_perm)
    per_file = [_FileCounts() for _ in cfg.inputs]
    lengths = {s: array("i") for s in SPLITS}
    train_source = array("i")
    for fi, (spec, fmt) in enumerate(zip(cfg.inputs, fmts)):
        pf = per_file[fi]
        for chunk, res in _results(pool, _chunks(spec.path, cfg.chunk_size), fmt, 2 * nworkers + 2):
            raw_of = dict(chunk)
            dedup.start_chunk([r.key for r in res.rows if isinstance(r, Kept)], res.bands)
            i_ok, tok_at = -1, 0
            for r in res.rows:
                pf.lines += 1
                if isinstance(r, Kept):
                    i_ok += 1
                    tok_at += r.ntok if res.ids is not None else 0
                    dup = dedup.check(i_ok, r.key, None if res.bands is None else res.bands[i_ok],
                                      encode_where(fi, r.lineno))
                    if dup is None:
                        split = spec.split or assign_split(r.key, cfg.split, cfg.split_seed)
                        if spec.general and split != "train":  # held out for eval's forgetting slice
                            out.general_f.write(r.line + "\n")
                            pf.accepted += 1
                            pf.splits["general"] += 1
                            continue
                        out.handles[split].write(r.line + "\n")
                        pf.accepted += 1
                        pf.splits[split] += 1
                        pf.truncated += int(r.truncated)
                        pf.dpo_prefix_fixed += int(r.fixed)
                        lengths[split].append(r.ntok)
                        if split == "train":
                            train_source.append(fi)
                        if split in out.stores:
                            out.stores[split].add(res.ids[tok_at - r.ntok:tok_at], r.start,
                                                  None if res.masks is None else res.masks[tok_at - r.ntok:tok_at])
                        continue
                    first_file, first_line = decode_where(dup[1])
                    r = Rejected(r.lineno, dup[0], f"same as {cfg.inputs[first_file].path}:{first_line}")
                pf.rejected[r.reason] += 1
                out.rej_f.write(json.dumps({"file": spec.path, "line": r.lineno, "reason": r.reason, "detail": r.detail,
                                            "raw": raw_of[r.lineno].decode("utf-8", "replace")},
                                           ensure_ascii=False) + "\n")
            bar.update(len(res.rows))
    return _Streamed(per_file, lengths, train_source)


def _account(cfg: PrepConfig, st: _Streamed, out: _Outputs) -> dict:
    """Every line read is either written once or rejected once; refuse an empty result."""
    counts_in = sum(p.lines for p in st.per_file)
    accepted = sum(p.accepted for p in st.per_file)
    rejected = Counter()
    for p in st.per_file:
        rejected.update(p.rejected)
        assert p.lines == p.accepted + sum(p.rejected.values())
    assert counts_in == accepted + sum(rejected.values())
    split_counts = {s: sum(p.splits[s] for p in st.per_file) for s in SPLITS}
    general = sum(p.splits["general"] for p in st.per_file)
    if accepted == 0:
        os.replace(out.tmp_rejects, out.rejects)
        raise PrepError(f"no examples left: all {counts_in} lines were rejected "
                        f"({dict(rejected)}); see {out.rejects}")
    empty = [s for s in SPLITS if cfg.split[s] > 0 and split_counts[s] == 0]
    if empty:
        raise PrepError(f"split(s) {empty} got no examples out of {accepted}: add data or set "
                        + " ".join(f"split.{s}=0" for s in empty) + " (and rebalance the others)", key="split")
    return {
        "in": counts_in,
        "accepted": accepted,
        "rejected_total": sum(rejected.values()),
        "rejected": {r: rejected[r] for r in REASONS if rejected[r]},
        "in_equals_accepted_plus_rejected": counts_in == accepted + sum(rejected.values()),
        "truncated": sum(p.truncated for p in st.per_file),
        "dpo_prefix_fixed": sum(p.dpo_prefix_fixed for p in st.per_file),  # responses given a leading space
        "splits": split_counts,
        "general_heldout": general,  # rows of general inputs written to general.jsonl instead of val/test
    }


def _mix_train(cfg: PrepConfig, st: _Streamed, out: _Outputs) -> tuple:
    """Write train.jsonl with each row repeated by its mixing multiplicity; (multiplicities, report)."""
    src = np.asarray(st.train_source, dtype=np.int64)
    mixing_sources = [i for i, s in enumerate(cfg.inputs) if s.split in (None, "train")]
    available = [int((src == i).sum()) for i in range(len(cfg.inputs))]
    mult = np.ones(len(src), dtype=np.int64)
    report = None
    if len(mixing_sources) > 1:
        weights = [cfg.inputs[i].weight if i in mixing_sources else 0.0 for i in range(len(cfg.inputs))]
        targets = mix.plan_counts(available, weights, cfg.mix_total)
        for i in range(len(cfg.inputs)):
            rows = np.nonzero(src == i)[0]
            mult[rows] = mix.multiplicities(len(rows), targets[i], cfg.mix_seed, i)
        written = [int(mult[src == i].sum()) for i in range(len(cfg.inputs))]
        report = mix.report([s.path for s in cfg.inputs], available, written, weights)
    per_row = 2 if cfg.task == "rm" else 1  # a reward-model pair is two lines: they repeat together
    with open(out.tmp_train_raw, encoding="utf-8") as fin, open(out.tmp["train"], "w", encoding="utf-8") as fout:
        rows = zip(*[fin] * per_row)
        for m, lines in zip(mult, rows):
            if m:
                fout.write("".join(lines) * int(m))
    os.remove(out.tmp_train_raw)
    return mult, report


def _pack(cfg: PrepConfig, out: _Outputs, mult: np.ndarray, eos_id: int) -> tuple:
    """NeMo's packed .npy per packed split (+ the metadata file); (report, files written)."""
    report, metas, files = {}, [], []
    for s in cfg.pack_splits:
        store = out.stores[s]
        rows = np.repeat(np.arange(len(store)), mult) if s == "train" else np.arange(len(store))
        if len(rows) == 0:
            continue
        t = time.time()
        bins, meta = packing.plan_packs(store, rows, cfg.seq_length, cfg.seed)
        name = f"packed_{cfg.seq_length}_seed{cfg.seed}.npy"
        path = os.path.join(cfg.out_dir, name if s == "train" else f"{s}_{name}")
        with atomic_write(path, "wb") as f:  # streamed: packs are never all in memory
            save_object_npy(f, packing.iter_packs(store, rows, bins, eos_id), count=len(bins))
        del bins
        meta["seconds"] = round(time.time() - t, 3)
        meta["split"] = s
        report[s] = {**meta, "file": os.path.basename(path)}
        metas.append({k: meta[k] for k in ("dataset_max_seqlen", "max_samples_per_bin", "packing_factor",
                                           "packing_efficiency", "pack_size", "min_packed_seqlen")})
        files.append((s, path))
    meta_path = os.path.join(cfg.out_dir, f"packed_{cfg.seq_length}_seed{cfg.seed}_metadata.json")
    write_json(meta_path, metas)
    files.append(("pack_metadata", meta_path))
    return report, files


def _write_manifest(cfg: PrepConfig, fmts: List[str], st: _Streamed, outputs: List[tuple], summary: dict,
                    resolved_config: Optional[dict]) -> dict:
    inputs = [artifacts.file_record(s.path, "data", format=f, weight=s.weight, split=s.split, lines=p.lines,
                                    accepted=p.accepted, truncated=p.truncated, dpo_prefix_fixed=p.dpo_prefix_fixed,
                                    rejected={r: p.rejected[r] for r in REASONS if p.rejected[r]},
                                    splits=dict(p.splits))
              for s, f, p in zip(cfg.inputs, fmts, st.per_file)]
    records = [artifacts.file_record(path, role, relative_to=cfg.out_dir) for role, path in outputs]
    path = artifacts.write_manifest(cfg.out_dir, "prep", inputs=inputs, outputs=records, config=resolved_config,
                                    summary=summary, dists=("numpy", "sentencepiece", "datasketch", "hydra-core",
                                                            "tokenizers"))
    return json.loads(path.read_text())


def run_prep(cfg: PrepConfig, resolved_config: Optional[dict] = None, log=print) -> dict:
    """The whole stage; returns the manifest it wrote (see nemo_ft.artifacts for the schema)."""
    t0 = time.time()
    tok = Tokenizer(cfg.tokenizer_library, cfg.tokenizer_model)
    check_template(tok, cfg.template)
    out = _open_outputs(cfg)
    pool = None
    try:
        fmts = [_detect(s, cfg.task) for s in cfg.inputs]
        nworkers = _workers(cfg)
        from tqdm import tqdm
        bar = tqdm(unit=" rows", desc="prep", disable=not cfg.progress, mininterval=0.5)
        if nworkers > 1:
            pool = multiprocessing.get_context("fork").Pool(nworkers, _init_worker, (cfg,))
        else:
            _init_worker(cfg)
        try:
            st = _stream_rows(cfg, fmts, out, pool, nworkers, bar)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            bar.close()
        out.close()
        # The histogram (matplotlib: ~1 s, mostly import) is drawn by an idle worker while this
        # process mixes, packs and hashes.
        png = os.path.join(cfg.out_dir, "lengths.png")
        lens = {s: np.asarray(v, dtype=np.int64) for s, v in st.lengths.items()}
        counts = _account(cfg, st, out)
        plot_args = (png, lens, cfg.seq_length, counts["truncated"])
        plot_job = None
        if pool is not None:
            plot_job = pool.apply_async(stats.plot_lengths, plot_args)
            pool.close()

        mult, mix_report = _mix_train(cfg, st, out)
        counts["train_rows_written"] = int(mult.sum())
        counts["train_rows_downsampled"] = int((mult == 0).sum())
        for s in SPLITS:
            os.replace(out.tmp[s], out.final[s])
        os.replace(out.tmp_rejects, out.rejects)
        if out.general:
            os.replace(out.tmp_general, out.general)

        pack_report, packed = _pack(cfg, out, mult, tok.eos_id) if cfg.pack else (None, [])

        stats_path = os.path.join(cfg.out_dir, "stats.json")
        write_json(stats_path, {"seq_length": cfg.seq_length,
                                "splits": {s: stats.length_stats(v, cfg.seq_length) for s, v in lens.items()},
                                "truncated": counts["truncated"], "dpo_prefix_fixed": counts["dpo_prefix_fixed"],
                                "rejected": counts["rejected"], "mix": mix_report, "pack": pack_report})
        if plot_job is None:
            stats.plot_lengths(*plot_args)
        else:
            plot_job.get()
            pool.join()
            pool = None

        elapsed = time.time() - t0
        summary = {
            "task": cfg.task,
            "seconds": round(elapsed, 3),
            "examples_per_second": round(counts["in"] / elapsed, 1) if elapsed else None,
            "workers": nworkers,
            "counts": counts,
            "mix": mix_report,
            "pack": pack_report,
            "tokenizer": tok.info(),
            "template": {k: getattr(cfg.template, k) for k in Template.__dataclass_fields__},
        }
        outputs = [*((s, p) for s, p in out.final.items()), ("rejects", out.rejects), ("stats", stats_path),
                   *((("general", out.general),) if out.general else ()),
                   ("lengths_png", png), *(("packed_" + role if role in SPLITS else role, p) for role, p in packed)]
        return _write_manifest(cfg, fmts, st, outputs, summary, resolved_config)
    finally:
        if pool is not None:
            pool.terminate()
        out.close()
        for store in out.stores.values():
            store.close()
        for p in out.created():
            if os.path.exists(p):
                os.remove(p)
