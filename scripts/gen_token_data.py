#!/usr/bin/env python3
"""Writes pre-tokenized rows, as a tokenizer's output saved for an encoder looks.

Columns: `id` (int64), `input_ids` and `attention_mask` (lists of int64, SEQ per row). Each row
has a real length (log-normal around --median-length, cut to 2..SEQ): the [CLS] id, word ids
drawn uniformly from [FIRST_WORD_ID, VOCAB), the [SEP] id, then zero padding, with a mask of
ones over the real tokens and zeros over the padding. Deterministic for a seed.
"""
import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# BERT's WordPiece vocabulary: [PAD] 0, [CLS] 101, [SEP] 102, words from 1000 on.
PAD_ID, CLS_ID, SEP_ID, FIRST_WORD_ID = 0, 101, 102, 1000
# Spread of the real lengths (sigma of their logarithm).
LENGTH_SIGMA = 0.6
# The shortest row: [CLS] and [SEP].
MIN_LENGTH = 2


def token_lists(values):
    """A List<int64> column from an [n, seq] array (one copy, offsets computed)."""
    n, seq = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * seq, seq, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def rows(rng, n, a):
    """input_ids and attention_mask of n rows, as [n, seq] int64 arrays."""
    lengths = rng.lognormal(np.log(a.median_length), LENGTH_SIGMA, n).astype(np.int64)
    lengths = np.clip(lengths, MIN_LENGTH, a.seq)
    mask = (np.arange(a.seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(FIRST_WORD_ID, a.vocab, (n, a.seq), dtype=np.int64)
    ids[:, 0] = CLS_ID
    ids[np.arange(n), lengths - 1] = SEP_ID
    ids[mask == 0] = PAD_ID
    return ids, mask


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="directory")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="tokens per row, padding included")
    p.add_argument("--vocab", type=int, default=30_522, help="vocabulary size of the model")
    p.add_argument("--median-length", type=float, default=48, help="median real tokens per row")
    p.add_argument("--row-group-rows", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=13)
    a = p.parse_args()
    if a.vocab <= FIRST_WORD_ID:
        p.error(f"--vocab must be above {FIRST_WORD_ID} (ids below it are special tokens)")
    if a.seq < MIN_LENGTH or a.files < 1:
        p.error(f"--seq must be at least {MIN_LENGTH} and --files at least 1")
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    per_file = -(-a.rows // a.files)
    first = 0
    for f in range(a.files):
        n = max(0, min(per_file, a.rows - first))
        ids, mask = rows(rng, n, a)
        table = pa.table(
            {
                "id": pa.array(np.arange(first, first + n, dtype=np.int64)),
                "input_ids": token_lists(ids),
                "attention_mask": token_lists(mask),
            }
        )
        path = os.path.join(a.out, f"part-{f:03d}.parquet")
        pq.write_table(table, path, row_group_size=a.row_group_rows, compression="snappy")
        first += n


if __name__ == "__main__":
    main()
