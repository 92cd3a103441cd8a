"""Our prep + pack vs NeMo's packing path, on the same generated SFT data and tokenizer.

NeMo side = what `prepare_packed_ft_dataset.py` / `nemo.collections.llm.gpt.data.packed_sequence`
do: tokenize every row through GPTSFTDataset, then create_hist, create_packing_strategy
(first_fit_shuffle, the script's default, and first_fit_decreasing) and fill_packing_strategy,
then np.save. Our side = the whole `run_prep` (parse, checks, exact + near dedup, split, stats,
plot, manifest, best-fit-decreasing pack) — it does more work than NeMo's path, not less.
Each side runs in its own subprocess so peak RSS is its own.

    .venv/bin/python benchmarks/prep_vs_nemo.py [--rows 20000] [--seq 512]
writes benchmarks/results/prep_vs_nemo.md;

    .venv/bin/python benchmarks/prep_vs_nemo.py --memory --rows 1000000
runs only our side (near-dup on, then off) on that many rows and writes its peak RSS into the
"Memory" section of the same file (kept when the speed table is rewritten, and vice versa).
"""
import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TOKENIZER = os.path.join(REPO, "data", "tiny", "tokenizer.model")
TEMPLATE = "{input} {output}"


def make_data(path: str, rows: int) -> None:
    """Question/answer rows built from the sample corpus' words (the tiny tokenizer knows them)."""
    with open(os.path.join(REPO, "data", "sample", "pretrain.txt")) as f:
        words = f.read().split()
    rnd = random.Random(0)
    with open(path, "w") as f:
        for i in range(rows):
            q = " ".join(rnd.choice(words) for _ in range(rnd.randint(10, 110)))
            a = " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 60)))
            f.write(json.dumps({"input": f"Question {i}: {q}?\nAnswer:", "output": f" {a}"}) + "\n")


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)  # Linux reports KiB; max: workers are separate processes


def side_ours(data: str, out: str, seq: int, near: bool) -> dict:
    t = time.time()
    from nemo_ft.data.pipeline import PrepConfig, run_prep
    cfg = PrepConfig.from_dict({"inputs": [data], "out_dir": out, "tokenizer": {"model": TOKENIZER},
                                "seq_length": seq, "pack": True, "progress": False,
                                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
                                "dedup": {"near": near}, "template": {"prompt_template": TEMPLATE}})
    t_import = time.time() - t
    t = time.time()
    m = run_prep(cfg)
    dt = time.time() - t
    p = m["pack"]["train"]
    return {"rows": m["counts"]["in"], "seconds": dt, "import_s": t_import, "packs": p["num_packs"],
            "fill": p["packing_efficiency"], "pack_s": p["seconds"], "workers": m["workers"],
            "rejected": m["counts"]["rejected_total"], "rss_mb": peak_rss_mb()}


def side_nemo(data: str, out: str, seq: int, algo: str) -> dict:
    os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")
    t = time.time()
    import numpy as np
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_dataset import GPTSFTDataset
    from nemo.utils.sequence_packing_utils import create_hist, create_packing_strategy, fill_packing_strategy
    t_import = time.time() - t
    t = time.time()
    tok = SentencePieceTokenizer(model_path=TOKENIZER)
    ds = GPTSFTDataset(data, tok, max_seq_length=seq, prompt_template=TEMPLATE, label_key="output",
                       truncation_field="input", add_eos=True, index_mapping_dir=out, is_test=True)
    dataset = np.array([ds[i] for i in range(len(ds))])
    t_tok = time.time() - t
    np.random.seed(0)
    sequences, hist = create_hist(dataset, seq)
    assignments, meta = create_packing_strategy(hist, seq, algo)
    packed = fill_packing_strategy(assignments, sequences, seq, tok.eos_id)
    np.save(os.path.join(out, f"packed_{seq}_seed0.npy"), packed)
    dt = time.time() - t
    return {"rows": len(dataset), "seconds": dt, "import_s": t_import, "tokenize_s": t_tok,
            "packs": len(assignments), "fill": meta["packing_efficiency"], "rss_mb": peak_rss_mb()}


def run_side(args: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    r = subprocess.run([sys.executable, __file__, "--side", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


RESULTS = os.path.join(REPO, "benchmarks", "results", "prep_vs_nemo.md")
MEMORY_MARK = "<!-- memory section: written by --memory -->"


def write_results(speed: str = None, memory: str = None) -> None:
    """Rewrite one of the two sections of the results file, keeping the other."""
    old = open(RESULTS).read() if os.path.exists(RESULTS) else ""
    old_speed, _, old_memory = old.partition(MEMORY_MARK)
    speed = speed if speed is not None else old_speed.rstrip("\n")
    memory = memory if memory is not None else old_memory.strip("\n")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(speed + "\n\n" + MEMORY_MARK + "\n" + memory + "\n")


def memory_run(rows: int, seq: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.jsonl")
        make_data(data, rows)
        size_mb = os.path.getsize(data) / 1e6
        runs = {}
        for name, extra in (("near-dup on", "near"), ("near-dup off", "off")):
            out = tempfile.mkdtemp(dir=tmp)
            runs[name] = run_side(["ours", data, out, str(seq), extra])
            print(name, runs[name], flush=True)
    lines = [
        "## Memory (our side only)",
        "",
        f"{rows:,} generated rows ({size_mb:,.0f} MB of JSONL, same generator), pack size {seq}, "
        f"{os.cpu_count()} CPU cores. Peak RSS = largest single process (main or a worker), from "
        f"getrusage. Made by `benchmarks/prep_vs_nemo.py --memory --rows {rows}`.",
        "",
        "| run | rows/s | wall s | packs | fill % | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['rows'] / r['seconds']:,.0f} | {r['seconds']:.1f} | {r['packs']} | "
                     f"{r['fill']:.2f} | {r['rss_mb']} |")
    write_results(memory="\n".join(lines))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the four runs (the machine is noisy)")
    ap.add_argument("--memory", action="store_true", help="our side only, peak RSS at --rows rows")
    ap.add_argument("--side", nargs="*")
    a = ap.parse_args()
    if a.side:
        kind, data, out, seq, extra = a.side
        res = side_ours(data, out, int(seq), extra == "near") if kind == "ours" else side_nemo(data, out, int(seq), extra)
        print(json.dumps(res))
        return
    if a.memory:
        memory_run(a.rows, a.seq)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.jsonl")
        make_data(data, a.rows)
        runs = []
        for rep in range(a.repeat):
            runs.append({})
            for name, args in [("ours (near-dup on)", ["ours", "near"]), ("ours (near-dup off)", ["ours", "off"]),
                               ("NeMo first_fit_shuffle", ["nemo", "first_fit_shuffle"]),
                               ("NeMo first_fit_decreasing", ["nemo", "first_fit_decreasing"])]:
                out = tempfile.mkdtemp(dir=tmp)
                runs[-1][name] = run_side([args[0], data, out, str(a.seq), args[1]])
                print(rep, name, runs[-1][name], flush=True)
    lines = [
        "# prep + pack vs NeMo's packing path",
        "",
        f"Generated {a.rows} SFT rows (words from data/sample/pretrain.txt), tiny SentencePiece tokenizer "
        f"(vocab 512), pack size {a.seq}, template `{TEMPLATE}`. Machine: {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, OMP_NUM_THREADS=1. Made by `benchmarks/prep_vs_nemo.py "
        f"--repeat {a.repeat}`: {a.repeat} rounds of the four runs, in turn; ratios are within a round.",
        "",
        "Examples/s = rows / wall seconds of the work itself, module imports excluded (listed apart). "
        "Fill = NeMo's `packing_efficiency`: sum of (len-1) over packs x pack size.",
        "",
        "| round | run | examples/s | vs NeMo shuffle | vs NeMo FFD | wall s | import s | packs | fill % | peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rep, rnd in enumerate(runs, 1):
        base = rnd["NeMo first_fit_shuffle"]["rows"] / rnd["NeMo first_fit_shuffle"]["seconds"]
        ffd = rnd["NeMo first_fit_decreasing"]["rows"] / rnd["NeMo first_fit_decreasing"]["seconds"]
        for name, r in rnd.items():
            eps = r["rows"] / r["seconds"]
            lines.append(f"| {rep} | {name} | {eps:,.0f} | {eps / base:.2f}x | {eps / ffd:.2f}x | {r['seconds']:.2f} | "
                         f"{r['import_s']:.1f} | {r['packs']} | {r['fill']:.2f} | {r['rss_mb']} |")
    runs = runs[-1]
    o = runs["ours (near-dup on)"]
    lines += ["", f"Ours used {o['workers']} worker process(es); best-fit-decreasing packing took {o['pack_s']:.2f} s "
              f"of its wall time. Our run also parses/validates every row, deduplicates (exact, and MinHash LSH "
              f"when on), splits, writes stats.json, lengths.png and manifest.json with sha256 of every file; "
              f"NeMo's path does none of that. Peak RSS is the largest single process (ours: main or a worker).", ""]
    write_results(speed="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
