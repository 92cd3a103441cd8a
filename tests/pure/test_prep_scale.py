"""The parts of prep that make it fast and flat in memory: vectorized MinHash, compact dedup
index, spilled token store, streamed .npy writer. Each must agree with the simple thing it replaces."""
import json
import random
import re
import sys

import numpy as np
import pytest

from nemo_ft.data.dedup import (Deduper, FirstSeen, band_keys, jaccard_estimate, lsh_params, shingle_hashes,
                                signatures)
from nemo_ft.data.normalize import dedup_text, shingles
from nemo_ft.data.pack import SpillTokenStore, TokenStore, pack, plan_packs, iter_packs, save_object_npy
from nemo_ft.data.config import PrepConfig
from nemo_ft.data.pipeline import run_prep
from nemo_ft.paths import DATA_DIR

TOKENIZER = str(DATA_DIR / "tiny" / "tokenizer.model")


def _words(n, rnd, vocab=300):
    return [f"w{rnd.randrange(vocab)}" for _ in range(n)]


def _pairs(rnd, count=25):
    out = []
    for _ in range(count):
        w = _words(rnd.randint(20, 120), rnd)
        v = list(w)
        for _ in range(rnd.randint(0, len(v) // 2)):
            v[rnd.randrange(len(v))] = f"x{rnd.randrange(10**6)}"
        out.append((" ".join(w), " ".join(v)))
    return out


def test_shingle_hashes_are_the_shingle_sets():
    rnd = random.Random(0)
    texts = ["", "a", "a b", "a b c", "a b c d", "a  b", " a", "é ü 東京 ☕ x"] + [" ".join(_words(rnd.randint(1, 40), rnd))
                                                                              for _ in range(200)]
    h, offsets = shingle_hashes(texts, 3)
    ends = list(offsets[1:]) + [len(h)]
    for t, a, b in zip(texts, offsets, ends):
        ref = shingles(t, 3, normalized=True)
        assert b - a == len(ref), t
        # same partition into equal / distinct shingles, i.e. the same set up to hash collisions
        by_hash = {}
        for x, s in zip(h[a:b].tolist(), ref):
            assert by_hash.setdefault(x, s) == s, t
        assert len(by_hash) == len(set(ref))


def test_vectorized_minhash_estimates_jaccard_like_datasketch():
    from datasketch import MinHash
    rnd = random.Random(1)
    ours_err, theirs_err = [], []
    for a, b in _pairs(rnd):
        sa, sb = set(shingles(a, 3, normalized=True)), set(shingles(b, 3, normalized=True))
        true = len(sa & sb) / len(sa | sb)
        sig = signatures([a, b], 3, 256)
        assert sig.dtype == np.uint32 and sig.shape == (2, 256)
        ours_err.append(abs(jaccard_estimate(sig[0], sig[1]) - true))
        m1, m2 = MinHash(num_perm=256), MinHash(num_perm=256)
        m1.update_batch(list(sa))
        m2.update_batch(list(sb))
        theirs_err.append(abs(m1.jaccard(m2) - true))
    assert max(ours_err) < 0.12 and np.mean(ours_err) < 0.04
    assert np.mean(ours_err) < 1.5 * np.mean(theirs_err) + 0.01  # as good an estimator as datasketch's


def test_signatures_depend_only_on_the_row_not_the_batch():
    rnd = random.Random(2)
    texts = [" ".join(_words(rnd.randint(1, 80), rnd)) for _ in range(300)] + [""]
    whole = signatures(texts, 3, 64)
    for size in (1, 7, 64):
        parts = np.concatenate([signatures(texts[i:i + size], 3, 64) for i in range(0, len(texts), size)])
        assert (parts == whole).all()
    assert (band_keys(whole, 4, 15) == np.concatenate([band_keys(whole[i:i + 5], 4, 15)
                                                        for i in range(0, len(whole), 5)])).all()


def test_lsh_params_are_datasketchs():
    from datasketch import MinHashLSH
    for threshold in (0.5, 0.7, 0.85, 0.9):
        for num_perm in (32, 64, 128):
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            assert lsh_params(threshold, num_perm) == (lsh.b, lsh.r)


def test_first_seen_index_keeps_first_values_across_runs():
    rnd = np.random.default_rng(0)
    idx = FirstSeen(np.uint64)
    idx.FLUSH = 50
    truth = {}
    for chunk in range(40):
        keys = rnd.integers(0, 400, size=30).astype(np.uint64)
        prior = idx.lookup(keys)
        for k, p in zip(keys.tolist(), prior.tolist()):
            stored = p if p >= 0 else idx.recent.get(k, -1)
            assert stored == truth.get(k, -1)
            if stored < 0:
                idx.recent[k] = truth[k] = chunk * 100 + len(truth)
        idx.flush()
    assert len(idx.runs) < 8 and len(idx) == len(truth)


def test_deduper_rejects_near_copies_not_different_rows():
    rnd = random.Random(3)
    base = [" ".join(_words(100, rnd, vocab=5000)) for _ in range(50)]
    near = [t.replace(t.split()[50], "changed", 1) for t in base[:10]]  # one word of 100: J ~ 0.94
    texts = base + near
    b, r = lsh_params(0.85, 64)
    bands = band_keys(signatures(texts, 3, 64), b, r)
    keys = [bytes([i]) * 16 for i in range(len(texts))]
    d = Deduper(True, True, 0.85, 64)
    d.start_chunk(keys[:50], bands[:50])
    assert all(d.check(i, keys[i], bands[i], i) is None for i in range(50))
    d.start_chunk(keys[50:], bands[50:])
    got = [d.check(i, keys[50 + i], bands[50 + i], 50 + i) for i in range(10)]
    assert got == [("near_duplicate", i) for i in range(10)]


def test_dedup_text_whitespace_rule_unchanged():
    ws = re.compile(r"\s+")
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if ws.fullmatch(chr(c))]
    assert spaces == [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    rnd = random.Random(4)
    for _ in range(2000):
        t = "".join(rnd.choice(spaces + list("aB Ä\u00a0")) for _ in range(rnd.randint(0, 12)))
        assert dedup_text(t) == ws.sub(" ", __import__("unicodedata").normalize("NFKC", t).casefold()).strip()


def _store_rows(store, n=400, seed=5):
    rnd = random.Random(seed)
    for _ in range(n):
        n_ctx, n_ans = rnd.randint(1, 60), rnd.randint(1, 40)
        store.add([rnd.randint(3, 511) for _ in range(n_ctx + n_ans)] + [2], n_ctx)
    return store


def _same_packs(p1, p2):
    assert len(p1) == len(p2)
    for a, b in zip(p1, p2):
        assert a["seq_start_id"] == b["seq_start_id"]
        assert a["input_ids"].dtype == b["input_ids"].dtype and (a["input_ids"] == b["input_ids"]).all()
        assert a["loss_mask"].dtype == b["loss_mask"].dtype and (a["loss_mask"] == b["loss_mask"]).all()


def test_spilled_token_store_packs_like_the_in_memory_one(tmp_path):
    mem = _store_rows(TokenStore())
    spill = _store_rows(SpillTokenStore(str(tmp_path / "ids.bin")))
    rows = list(range(400)) + [3, 3, 9]
    assert (mem.lengths() == spill.lengths()).all() and mem.get(7) == spill.get(7)
    p1, m1 = pack(mem, rows, 256, seed=1, eos_id=2)
    p2, m2 = pack(spill, rows, 256, seed=1, eos_id=2)
    assert m1 == m2
    _same_packs(p1, p2)
    spill.close()
    assert not (tmp_path / "ids.bin").exists()


def test_masked_chat_rows_spill_and_pack_with_their_own_mask(tmp_path):
    rnd = random.Random(3)
    mem, spill = TokenStore(), SpillTokenStore(str(tmp_path / "ids.bin"))
    rows = []
    for _ in range(200):
        n = rnd.randint(4, 90)
        ids = [rnd.randint(3, 511) for _ in range(n)]
        mask = [rnd.random() < 0.5 for _ in range(n)]
        rows.append((ids, mask))
        for store in (mem, spill):
            store.add(ids, 0, mask)
    p1, _ = pack(mem, list(range(200)), 256, seed=0, eos_id=2)
    p2, _ = pack(spill, list(range(200)), 256, seed=0, eos_id=2)
    _same_packs(p1, p2)
    by_ids = {tuple(ids): mask for ids, mask in rows}
    for p in p1:
        b = list(p["seq_start_id"]) + [len(p["input_ids"])]
        for a, e in zip(b, b[1:]):
            mask = by_ids[tuple(p["input_ids"][a:e].tolist())]
            # shifted as GPTSFTChatDataset's collate does (loss_mask = mask[1:]); last position unused
            assert p["loss_mask"][a:e].tolist() == mask[1:] + [False]
    with pytest.raises(ValueError, match="either masked"):
        mem.add([5, 6], 1)
    with pytest.raises(ValueError, match="loss mask of 1 for 2"):
        mem.add([5, 6], 0, [True])
    assert len(mem) == 200  # refused rows left no trace
    spill.close()
    assert not (tmp_path / "ids.bin").exists() and not (tmp_path / "ids.bin.mask").exists()


def test_streamed_npy_loads_like_np_save(tmp_path):
    store = _store_rows(TokenStore())
    rows = list(range(len(store)))
    packs, _ = pack(store, rows, 256, seed=0, eos_id=2)
    arr = np.empty(len(packs), dtype=object)
    arr[:] = packs
    np.save(tmp_path / "ref.npy", arr)
    bins, _ = plan_packs(store, rows, 256, seed=0)
    with open(tmp_path / "ours.npy", "wb") as f:
        save_object_npy(f, iter_packs(store, rows, bins, 2), count=len(bins))
    ref, ours = (np.load(tmp_path / n, allow_pickle=True) for n in ("ref.npy", "ours.npy"))
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    _same_packs(list(ref), list(ours))
    with open(tmp_path / "bad.npy", "wb") as f, pytest.raises(ValueError):
        save_object_npy(f, iter(packs[:3]), count=4)


def test_same_outputs_for_any_worker_count_and_chunk_size(tmp_path):
    """> 1 MB so that the pool really runs; near copies spread over chunks and workers."""
    rnd = random.Random(6)
    words = [f"tok{i}" for i in range(2000)]
    rows = []
    for i in range(2600):
        if i > 100 and i % 50 == 0:
            src = dict(rows[rnd.randrange(len(rows))])
            w = src["input"].split(" ")
            w[len(w) // 2] = "edited"
            src["input"] = " ".join(w)
            rows.append(src)
        else:
            rows.append({"input": " ".join(rnd.choice(words) for _ in range(rnd.randint(40, 80))),
                         "output": " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 30)))})
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.stat().st_size > (1 << 20)
    outs = []
    for name, workers, chunk in (("a", 1, 1000), ("b", 2, 1000), ("c", 2, 37)):
        out = tmp_path / name
        c = {"inputs": [str(data)], "out_dir": str(out), "tokenizer": {"model": TOKENIZER}, "seq_length": 256,
             "progress": False, "workers": workers, "chunk_size": chunk, "pack": True}
        m = run_prep(PrepConfig.from_dict(c))
        assert m["summary"]["counts"]["rejected"].get("near_duplicate", 0) >= 25  # of 50 (LSH recall at J~0.92: ~0.8)
        files = {f: (out / f).read_bytes() for f in ("train.jsonl", "validation.jsonl", "test.jsonl",
                                                     "rejects.jsonl", "packed_256_seed0.npy")}
        outs.append((m["summary"]["counts"], files))
    assert outs[0] == outs[1] == outs[2]
    assert not list(tmp_path.glob("*/.*tmp*"))  # no spill or temp files left


def _bfd_reference(sizes, capacity):
    """The list-based best-fit-decreasing this module's array version replaced, verbatim in effect."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    buckets, mask, bins = [[] for _ in range(capacity + 1)], 0, []
    for i in order:
        s = sizes[i]
        m = mask >> s
        if m:
            f = s + (m & -m).bit_length() - 1
            b = buckets[f].pop()
            if not buckets[f]:
                mask &= ~(1 << f)
            bins[b].append(i)
        else:
            b, f = len(bins), capacity
            bins.append([i])
        buckets[f - s].append(b)
        mask |= 1 << (f - s)
    return bins


def test_best_fit_decreasing_unchanged():
    from nemo_ft.data.pack import best_fit_decreasing
    rnd = random.Random(7)
    for _ in range(30):
        sizes = [rnd.randint(0, 300) for _ in range(rnd.randint(0, 3000))]
        assert best_fit_decreasing(sizes, 300) == _bfd_reference(sizes, 300)
    with pytest.raises(ValueError):
        best_fit_decreasing([5, 301], 300)
