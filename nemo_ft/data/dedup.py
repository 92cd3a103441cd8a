"""Exact and near-duplicate detection, keeping the first occurrence (input order).

Exact: the 16-byte normalized key of every kept row, mapped to where it was first seen (so a
reject can say "same as file:line"). Near: MinHash signatures over word shingles, cut into
LSH bands the way datasketch's MinHashLSH cuts them (its b and r for the threshold); a row
sharing any band with an earlier kept row is rejected, which is exactly MinHashLSH.query's
candidate rule.

Both are built for speed and flat memory at millions of rows:
- signatures are computed for a whole chunk of rows at once in numpy (workers), instead of one
  datasketch MinHash per row in Python: every shingle is hashed by a polynomial rolling hash over
  the chunk's bytes and permuted by num_perm multiply-shift hashes (a universal family);
- the parent keeps no MinHash objects: only 8-byte band keys and 16-byte exact keys, in sorted
  numpy runs (`FirstSeen`), about 16 + 24 bytes per band and per key instead of kilobytes.
"""
import hashlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

MINHASH_SEED = 1  # fixed, so near-duplicate decisions are the same on every run and worker count
_BASE = 0x100000001B3  # odd, so it has an inverse mod 2^64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: spreads every input bit over every output bit."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def shingle_hashes(texts: Sequence[str], n: int) -> Tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word n-grams of each normalized text, and where each text's start.

    Same shingles as `normalize.shingles` (texts split on single spaces; a text of <= n words is
    one shingle): a shingle is the byte span from its first word's start to its last word's end,
    hashed from prefix sums, so no Python code runs per word.
    """
    enc = [t.encode("utf-8") for t in texts]
    buf = np.frombuffer(b" ".join(enc), dtype=np.uint8)
    size = len(buf)
    spaces = np.flatnonzero(buf == 32)
    wstart = np.concatenate(([0], spaces + 1))
    wend = np.concatenate((spaces, [size]))
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    rstart = np.concatenate(([0], np.cumsum(lens + 1)[:-1]))
    first = np.searchsorted(wstart, rstart)  # rows are space-separated, so each starts a word
    nwords = np.diff(np.append(first, len(wstart)))
    count = np.maximum(nwords - n + 1, 1)
    row = np.repeat(np.arange(len(enc)), count)
    offsets = np.concatenate(([0], np.cumsum(count)[:-1]))
    sw = first[row] + np.arange(int(count.sum())) - offsets[row]
    ew = np.minimum(sw + (n - 1), first[row] + nwords[row] - 1)
    s, e = wstart[sw], wend[ew]
    pw, inv = _powers(size + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(size + 1, dtype=np.uint64)
        prefix[1:] = np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * pw[:-1])
        h = (prefix[e] - prefix[s]) * inv[s]  # sum of (byte+1) * BASE^(j-s): position-free
        h = _fmix64(h + (e - s).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return h, offsets


_POW = [np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64)]


def _powers(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """BASE^j and BASE^-j mod 2^64 for j < n, grown on demand and kept (they depend on j only)."""
    if len(_POW[0]) < n:
        m = max(n, 2 * len(_POW[0]))
        with np.errstate(over="ignore"):
            for i, base in enumerate((_BASE, _BASE_INV)):
                p = np.full(m, base, dtype=np.uint64)
                p[0] = 1
                _POW[i] = np.cumprod(p)
    return _POW[0][:n], _POW[1][:n]


_PERMS = {}


def _permutations(num_perm: int) -> Tuple[np.ndarray, np.ndarray]:
    p = _PERMS.get(num_perm)
    if p is None:
        rng = np.random.default_rng(MINHASH_SEED)
        a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False)
        p = _PERMS[num_perm] = (a, b)
    return p


def signatures(texts: Sequence[str], shingle_size: int, num_perm: int) -> np.ndarray:
    """MinHash signatures (len(texts), num_perm) uint32 of the texts' shingle sets.

    Permutation k maps a shingle hash x to the top 32 bits of a_k * x + b_k (mod 2^64), the
    multiply-add-shift universal family; signature k is the minimum over the row's shingles.
    A row's signature depends on nothing but its own text.
    """
    if not len(texts):
        return np.zeros((0, num_perm), dtype=np.uint32)
    x, offsets = shingle_hashes(texts, shingle_size)
    a, b = _permutations(num_perm)
    sig = np.empty((len(texts), num_perm), dtype=np.uint32)
    # One permutation at a time over 1-D arrays: numpy's broadcast (shingles x perms) is ~20x
    # slower per element, and the temporaries stay one chunk's shingles long.
    v = np.empty_like(x)
    shift = np.uint64(32)
    with np.errstate(over="ignore"):
        for k in range(num_perm):
            np.multiply(x, a[k], out=v)
            v += b[k]
            v >>= shift
            sig[:, k] = np.minimum.reduceat(v, offsets)
    return sig


def lsh_params(threshold: float, num_perm: int) -> Tuple[int, int]:
    """(bands, rows per band) minimizing false positives + false negatives, equally weighted.

    datasketch's MinHashLSH rule (`_optimal_param`), with its scipy quadrature replaced by
    Gauss-Legendre, exact for these polynomials (degree <= num_perm), so the choice is the same
    (tests check) without importing scipy in every run.
    """
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 2)

    def integral(f, lo, hi):
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        return (hi - lo) / 2 * float(np.dot(weights, f(s)))

    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = integral(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)
            fn = integral(lambda s: (1 - s ** float(r)) ** float(b), threshold, 1.0)
            if fp * 0.5 + fn * 0.5 < best:
                best, opt = fp * 0.5 + fn * 0.5, (b, r)
    if opt[0] < 2:
        raise ValueError("The number of bands are too small (b < 2)")  # as MinHashLSH says
    return opt


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(len(sig), bands) uint64: one key per LSH band; equal keys <=> equal band (2^-64 aside).

    The band number is hashed in, so all bands can share one index.
    """
    out = np.empty((len(sig), bands), dtype=np.uint64)
    data = np.ascontiguousarray(sig, dtype="<u4")
    for i in range(len(data)):
        row = data[i].tobytes()
        for j in range(bands):
            d = hashlib.blake2b(row[4 * j * rows:4 * (j + 1) * rows], digest_size=8, salt=j.to_bytes(16, "little"))
            out[i, j] = int.from_bytes(d.digest(), "little")
    return out


def jaccard_estimate(s1: np.ndarray, s2: np.ndarray) -> float:
    return float(np.mean(s1 == s2))


class FirstSeen:
    """Key -> the value stored with it first, in sorted numpy runs plus a small dict of recent keys.

    About (key size + 8) bytes per key, against ~100+ for a dict of Python objects. Lookups of a
    whole chunk are vectorized (`lookup`); the chunk's own keys go through `recent`. Runs are
    merged geometrically, so there are O(log n) of them.
    """

    FLUSH = 1 << 16

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.runs: List[Tuple[np.ndarray, np.ndarray]] = []
        self.recent = {}

    def __len__(self):
        return sum(len(k) for k, _ in self.runs) + len(self.recent)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Values of the keys stored in runs (not `recent`), -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        for k, v in self.runs:
            i = np.searchsorted(k, keys)
            i[i == len(k)] = 0
            hit = k[i] == keys
            out[hit] = v[i[hit]]
        return out

    def flush(self, force: bool = False) -> None:
        if not self.recent or (len(self.recent) < self.FLUSH and not force):
            return
        keys = np.array(list(self.recent), dtype=self.dtype)
        vals = np.fromiter(self.recent.values(), dtype=np.int64, count=len(self.recent))
        self.recent = {}
        self.runs.append(self._sorted(keys, vals))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k1, v1), (k2, v2) = self.runs.pop(), self.runs.pop()
            self.runs.append(self._sorted(np.concatenate((k2, k1)), np.concatenate((v2, v1))))

    @staticmethod
    def _sorted(keys, vals):
        order = np.argsort(keys, kind="stable")
        return keys[order], vals[order]


def encode_where(file_index: int, lineno: int) -> int:
    return (file_index << 40) | lineno


def decode_where(v: int) -> Tuple[int, int]:
    return v >> 40, v & ((1 << 40) - 1)


class Deduper:
    """First-wins exact + near duplicate decisions, fed one chunk of worker results at a time."""

    def __init__(self, exact: bool = True, near: bool = True, threshold: float = 0.85, num_perm: int = 64):
        self.exact, self.near, self.num_perm = exact, near, num_perm
        self.seen = FirstSeen("S16")
        self.bands = FirstSeen(np.uint64) if near else None

    def start_chunk(self, keys: List[bytes], bands: Optional[np.ndarray]) -> None:
        """Vectorized look-up of a chunk's keys against everything kept before the chunk."""
        self.seen.flush()
        self._prior_key = self.seen.lookup(np.array(keys, dtype="S16")) if keys else np.zeros(0, np.int64)
        self._prior_band = None
        if self.bands is not None and bands is not None:
            self.bands.flush()
            self._prior_band = self.bands.lookup(bands.ravel()).reshape(bands.shape)

    def check(self, i: int, key: bytes, bands: Optional[np.ndarray], where: int) -> Optional[Tuple[str, int]]:
        """Row i of the chunk: None if new (and remember it), else (reason, `where` of the first)."""
        if self.exact:
            first = int(self._prior_key[i])
            if first < 0:
                first = self.seen.recent.get(key, -1)
            if first >= 0:
                return "duplicate", first
        if self._prior_band is not None and bands is not None:
            hits = self._prior_band[i]
            if (hits >= 0).any():
                return "near_duplicate", int(hits[hits >= 0][0])
            recent = self.bands.recent
            bl = bands.tolist()
            for b in bl:
                hit = recent.get(b)
                if hit is not None:
                    return "near_duplicate", hit
            for b in bl:
                recent[b] = where
        if self.exact:
            self.seen.recent[key] = where
        return None
