"""Sequence packing into NeMo's packed format, with best-fit-decreasing bin packing.

NeMo's conventions we follow (nemo/utils/sequence_packing_utils.py, GPTSFTPackedDataset):
- a sequence of L tokens costs L-1 of the pack size (the positions trained on: the model input
  drops the last token, the labels drop the first), but all L tokens are stored;
- each pack is a dict {input_ids, loss_mask, seq_start_id}; `seq_start_id` is a *list* (NeMo
  appends to it with `+ [len]`) of where each sequence starts in input_ids;
- loss_mask is stored *shifted*: loss_mask[j] = 1 means "the label at position j, i.e. token
  j+1, is trained on". NeMo builds it as `j >= answer_start_idx - 1 and ids[j] != eos(pad)` and
  the dataset drops each sequence's last position; we build it identically.
- chat rows (task=chat) carry GPTSFTChatDataset's own per-token mask (assistant turns), which its
  collate shifts as mask[1:]; packs store that shifted mask, so a packed chat row trains on exactly
  the labels the unpacked chat dataset does.
"""
import os
import pickle
from array import array
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np


class TokenStore:
    """All tokenized examples of one split, flat (ids in one int32 array) to bound memory."""

    def __init__(self):
        self.ids = array("i")
        self.offsets = array("q", [0])
        self.answer_start = array("i")
        self.masked = False  # rows carry their own per-token training mask (chat), else answer_start
        self.masks = array("B")  # those masks, a byte a token

    def add(self, ids: Sequence[int], answer_start: int, mask: Optional[Sequence[bool]] = None) -> None:
        self._check_mask(mask, len(ids))
        self._write_ids(ids)
        self.answer_start.append(answer_start)
        if mask is not None:
            self._write_mask(np.asarray(mask, dtype=np.uint8).tobytes())

    def _write_ids(self, ids) -> None:
        self.ids.extend(ids)
        self.offsets.append(len(self.ids))

    def _check_mask(self, mask, n: int) -> None:
        """Before anything is stored: a store holds masked (chat) rows or answer_start rows, and a
        mask has a flag per token."""
        if len(self) and self.masked != (mask is not None):
            raise ValueError("a store holds either masked (chat) rows or answer_start rows, not both")
        if mask is not None and len(mask) != n:
            raise ValueError(f"loss mask of {len(mask)} for {n} tokens")
        self.masked = mask is not None

    def _write_mask(self, data: bytes) -> None:
        self.masks.frombytes(data)

    def _read_mask(self, a: int, b: int) -> np.ndarray:
        return np.frombuffer(self.masks, dtype=np.uint8)[a:b]

    def mask_of(self, i: int) -> Optional[np.ndarray]:
        """The row's per-token training mask (chat rows), or None (the mask follows answer_start)."""
        if not self.masked:
            return None
        return self._read_mask(self.offsets[i], self.offsets[i + 1]).astype(bool)

    def __len__(self):
        return len(self.answer_start)

    def get(self, i: int) -> List[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def ids_of(self, i: int) -> np.ndarray:
        return np.frombuffer(self.ids, dtype=np.int32)[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        o = np.frombuffer(self.offsets, dtype=np.int64)
        return o[1:] - o[:-1]

    def close(self) -> None:
        pass


class SpillTokenStore(TokenStore):
    """A TokenStore whose ids live in a file (int32, in row order): 12 bytes of RAM per row.

    Token ids are most of prep's memory (4 bytes a token: ~640 MB at 1M rows of 160 tokens), so
    they go to disk as they arrive and are read back one row at a time when packing. Plain reads,
    not a memory map: mapped pages count as the process's resident memory.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.f = open(path, "w+b")
        self.mf = None
        self.n_ids = 0

    def _write_ids(self, ids) -> None:
        a = np.asarray(ids, dtype=np.int32)
        self.f.write(a.tobytes())
        self.n_ids += len(a)
        self.offsets.append(self.n_ids)

    def _write_mask(self, data: bytes) -> None:  # a byte a token, in a file beside the ids
        if self.mf is None:
            self.mf = open(self.path + ".mask", "w+b")
        self.mf.write(data)

    def _read_mask(self, a: int, b: int) -> np.ndarray:
        self.mf.flush()
        return np.frombuffer(os.pread(self.mf.fileno(), b - a, a), dtype=np.uint8)

    def ids_of(self, i: int) -> np.ndarray:
        if not self.f.closed:
            self.f.flush()
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.frombuffer(os.pread(self.f.fileno(), 4 * (b - a), 4 * a), dtype=np.int32)

    def get(self, i: int) -> List[int]:
        return self.ids_of(i).tolist()

    def close(self) -> None:
        self.f.close()
        if self.mf is not None:
            self.mf.close()
        for p in (self.path, self.path + ".mask"):
            if os.path.exists(p):
                os.remove(p)


def _bfd_assign(sizes: np.ndarray, capacity: int) -> Tuple[np.ndarray, np.ndarray]:
    """(order, bin of each item): best-fit-decreasing, items placed in `order`.

    Each item goes to the fullest bin it still fits in. Sizes are small integers, so bins are
    bucketed by free space and a big-int bit mask marks the non-empty buckets: "tightest bin with
    free >= s" is one shift and one lowest-set-bit. Ties keep input order (stable sort), so the
    result is deterministic. Arrays, not lists: at 1M rows lists of ints cost ~100 MB.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > capacity:
        raise ValueError(f"item of size {int(sizes.max())} does not fit capacity {capacity}")
    order = np.argsort(-sizes, kind="stable")
    bin_of = np.empty(len(sizes), dtype=np.int64)
    buckets: List[List[int]] = [[] for _ in range(capacity + 1)]
    mask = 0
    nbins = 0
    step = 1 << 16
    for lo in range(0, len(order), step):
        items = order[lo:lo + step].tolist()
        for i, s in zip(items, sizes[items].tolist()):
            m = mask >> s
            if m:
                f = s + (m & -m).bit_length() - 1
                b = buckets[f].pop()
                if not buckets[f]:
                    mask &= ~(1 << f)
            else:
                b = nbins
                nbins += 1
                f = capacity
            bin_of[i] = b
            nf = f - s
            buckets[nf].append(b)
            mask |= 1 << nf
    return order, bin_of


def _grouped(order: np.ndarray, bin_of: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Items grouped by bin, each bin's items in placement order; and where each bin starts."""
    placed = order[np.argsort(bin_of[order], kind="stable")]
    counts = np.bincount(bin_of, minlength=int(bin_of.max()) + 1 if len(bin_of) else 0)
    return placed, np.concatenate(([0], np.cumsum(counts)))


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of item indices (see `_bfd_assign`)."""
    placed, starts = _grouped(*_bfd_assign(sizes, capacity))
    return [placed[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


class PackPlan:
    """Bins in the order they are written, as two flat arrays (a list per bin costs ~10x more)."""

    def __init__(self, placed: np.ndarray, starts: np.ndarray, perm: np.ndarray):
        self.placed, self.starts, self.perm = placed, starts, perm

    def __len__(self):
        return len(self.perm)

    def __iter__(self) -> Iterator[List[int]]:
        for b in self.perm.tolist():
            yield self.placed[self.starts[b]:self.starts[b + 1]].tolist()


def plan_packs(store: TokenStore, rows: Sequence[int], seq_length: int, seed: int) -> Tuple[PackPlan, Dict]:
    """Bins (positions in `rows`, in the order they are written) and NeMo's metadata."""
    sizes = store.lengths()[np.asarray(rows, dtype=np.int64)] - 1
    order, bin_of = _bfd_assign(sizes, seq_length)
    placed, starts = _grouped(order, bin_of)
    nbins = len(starts) - 1
    # The seed orders the packs (NeMo's file name carries it); the dataset shuffles again anyway.
    perm = np.random.default_rng(seed).permutation(nbins)
    fill = np.bincount(bin_of, weights=sizes, minlength=nbins) if nbins else np.zeros(0)
    used = int(sizes.sum())
    meta = {
        "dataset_max_seqlen": int(sizes.max()) if len(sizes) else 0,
        "max_samples_per_bin": int(np.diff(starts).max()) if nbins else 0,
        "packing_factor": round(len(sizes) / max(nbins, 1), 2),
        "packing_efficiency": round(used / max(nbins, 1) / seq_length * 100, 2),
        "pack_size": seq_length,
        "min_packed_seqlen": int(fill.min()) if nbins else 0,
        "num_sequences": len(sizes),
        "num_packs": nbins,
        "algorithm": "best_fit_decreasing",
    }
    return PackPlan(placed, starts, perm), meta


def iter_packs(store: TokenStore, rows: Sequence[int], bins: Iterable[List[int]], eos_id: int) -> Iterator[Dict]:
    """NeMo pack dicts, built one at a time from the store."""
    # numpy arrays, not Python lists: lists of ints cost ~9x the memory (2.3 GB at 200k rows);
    # GPTSFTPackedDataset slices and np.concatenates them either way (tested in e2e).
    for b in bins:
        parts, masks, starts, n = [], [], [], 0
        for item in b:
            r = rows[item]
            ids = store.ids_of(r)
            starts.append(n)
            n += len(ids)
            parts.append(ids)
            m = np.zeros(len(ids), dtype=bool)
            trained = store.mask_of(r)
            if trained is None:
                m[max(store.answer_start[r] - 1, 0):] = True
                masks.append(m & (ids != eos_id))
            else:  # GPTSFTChatDataset's collate: loss_mask = mask[1:]
                m[:-1] = trained[1:]
                masks.append(m)
        yield {"input_ids": np.concatenate(parts), "loss_mask": np.concatenate(masks), "seq_start_id": starts}


def pack(store: TokenStore, rows: Sequence[int], seq_length: int, seed: int, eos_id: int
         ) -> Tuple[List[Dict], Dict]:
    """Pack `rows` (indices into store, repeats allowed) into NeMo packs of budget seq_length."""
    bins, meta = plan_packs(store, rows, seq_length, seed)
    return list(iter_packs(store, rows, bins, eos_id)), meta


class _Streamed:
    """Pickles as a list whose items are pulled from an iterator while being written."""

    def __init__(self, items: Iterable):
        self.items = items

    def __reduce__(self):
        return list, (), None, iter(self.items)


def save_object_npy(f, arr, count: Optional[int] = None) -> None:
    """np.save of a 1-D object array -- or of `count` objects from an iterator, never all in RAM.

    np.load reads the result unchanged. np.save itself pickles with protocol 3, which the C
    pickler buffers whole in memory before writing (a second copy of every pack), and any pickler
    memo keeps a reference to every object written. So: protocol 4 (written in 64 KiB frames),
    memo off (`fast`; nothing we write is shared or self-referencing), and the array's reduce
    tuple built by hand around a list that is filled from the iterator as it is written.
    """
    from numpy.lib import format as npy_format
    if count is None:
        count = len(arr)
    npy_format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (count,)})
    pickler = pickle.Pickler(f, protocol=4)
    pickler.fast = True
    n = [0]

    def counted():
        for x in arr:
            n[0] += 1
            yield x

    recon, args, state = np.empty(0, dtype=object).__reduce__()
    pickler.dump(_Reduce(recon, args, (state[0], (count,), state[2], state[3], _Streamed(counted()))))
    if n[0] != count:
        raise ValueError(f"expected {count} objects, got {n[0]}")


class _Reduce:
    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced
