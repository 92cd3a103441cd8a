"""Sequence packing into NeMo's packed format, with best-fit-decreasing bin packing.

NeMo's conventions we follow (nemo/utils/sequence_packing_utils.py, GPTSFTPackedDataset):
- a sequence of L tokens costs L-1 of the pack size (the positions trained on: the model input
  drops the last token, the labels drop the first), but all L tokens are stored;
- each pack is a dict {input_ids, loss_mask, seq_start_id}; `seq_start_id` is a *list* (NeMo
  appends to it with `+ [len]`) of where each sequence starts in input_ids;
- loss_mask is stored *shifted*: loss_mask[j] = 1 means "the label at position j, i.e. token
  j+1, is trained on". NeMo builds it as `j >= answer_start_idx - 1 and ids[j] != eos(pad)` and
  the dataset drops each sequence's last position; we build it identically.
"""
import pickle
from array import array
from typing import Dict, List, Sequence, Tuple

import numpy as np


class TokenStore:
    """All tokenized examples of one split, flat (ids in one int32 array) to bound memory."""

    def __init__(self):
        self.ids = array("i")
        self.offsets = array("q", [0])
        self.answer_start = array("i")

    def add(self, ids: Sequence[int], answer_start: int) -> None:
        self.ids.extend(ids)
        self.offsets.append(len(self.ids))
        self.answer_start.append(answer_start)

    def __len__(self):
        return len(self.answer_start)

    def get(self, i: int) -> List[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def lengths(self) -> np.ndarray:
        o = np.frombuffer(self.offsets, dtype=np.int64)
        return o[1:] - o[:-1]


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of item indices. Each item goes to the fullest bin it still fits in.

    Sizes are small integers, so bins are bucketed by free space and a big-int bit mask marks
    the non-empty buckets: "tightest bin with free >= s" is one shift and one lowest-set-bit.
    Ties keep input order (stable sort), so the result is deterministic.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    buckets: List[List[int]] = [[] for _ in range(capacity + 1)]
    mask = 0
    bins: List[List[int]] = []
    free: List[int] = []
    for i in order:
        s = sizes[i]
        if s > capacity:
            raise ValueError(f"item of size {s} does not fit capacity {capacity}")
        m = mask >> s
        if m:
            f = s + (m & -m).bit_length() - 1
            b = buckets[f].pop()
            if not buckets[f]:
                mask &= ~(1 << f)
            bins[b].append(i)
        else:
            b = len(bins)
            bins.append([i])
            free.append(capacity)
            f = capacity
        nf = f - s
        free[b] = nf
        buckets[nf].append(b)
        mask |= 1 << nf
    return bins


def pack(store: TokenStore, rows: Sequence[int], seq_length: int, seed: int, eos_id: int
         ) -> Tuple[List[Dict], Dict]:
    """Pack `rows` (indices into store, repeats allowed) into NeMo packs of budget seq_length."""
    lengths = store.lengths()
    sizes = [int(lengths[r]) - 1 for r in rows]
    bins = best_fit_decreasing(sizes, seq_length)
    # The seed orders the packs (NeMo's file name carries it); the dataset shuffles again anyway.
    perm = np.random.default_rng(seed).permutation(len(bins))
    # numpy arrays, not Python lists: lists of ints cost ~9x the memory (2.3 GB at 200k rows);
    # GPTSFTPackedDataset slices and np.concatenates them either way (tested in e2e).
    flat = np.frombuffer(store.ids, dtype=np.int32)
    offsets = np.frombuffer(store.offsets, dtype=np.int64)
    packs = []
    for b in perm:
        parts, masks, starts, n = [], [], [], 0
        for item in bins[b]:
            r = rows[item]
            ids = flat[offsets[r]:offsets[r + 1]]
            starts.append(n)
            n += len(ids)
            parts.append(ids)
            m = np.zeros(len(ids), dtype=bool)
            m[max(store.answer_start[r] - 1, 0):] = True
            masks.append(m & (ids != eos_id))
        packs.append({"input_ids": np.concatenate(parts), "loss_mask": np.concatenate(masks),
                      "seq_start_id": starts})
    used = sum(sizes)
    meta = {
        "dataset_max_seqlen": max(sizes) if sizes else 0,
        "max_samples_per_bin": max((len(b) for b in bins), default=0),
        "packing_factor": round(len(sizes) / max(len(bins), 1), 2),
        "packing_efficiency": round(used / max(len(bins), 1) / seq_length * 100, 2),
        "pack_size": seq_length,
        "min_packed_seqlen": min((sum(sizes[i] for i in b) for b in bins), default=0),
        "num_sequences": len(sizes),
        "num_packs": len(bins),
        "algorithm": "best_fit_decreasing",
    }
    return packs, meta


def save_object_npy(f, arr: np.ndarray) -> None:
    """np.save for an object array, but pickled with protocol 4.

    np.save pickles with protocol 3, which the C pickler buffers whole in memory before writing
    (a second copy of every pack); protocol 4 writes in 64 KiB frames. np.load reads both.
    """
    from numpy.lib import format as npy_format
    npy_format.write_array_header_1_0(f, npy_format.header_data_from_array_1_0(arr))
    pickle.dump(arr, f, protocol=4)
