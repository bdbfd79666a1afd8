#!/usr/bin/env python3
"""Writes the text input table: `id` (int64, 0..N-1 in order across files), `body` (string).

Texts are text_corpus.py's pseudo-words, their lengths in words log-normal around a median
(sigma 0.8, at most 700 words). Deterministic for a seed, and a row's text does not depend on
--files or --row-group-rows. --specials puts awkward texts first (empty, one character, far
longer than 512 tokens, non-ASCII, whitespace only); --null-every K makes every K-th body null.
"""
import argparse
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.dont_write_bytecode = True  # no __pycache__ in scripts/ (it is not ignored)
import text_corpus  # noqa: E402

BLOCK = 65_536  # rows generated from one seed: texts do not depend on how files split them


def specials(seed: int) -> list:
    long = text_corpus.texts(np.random.default_rng([seed, 1 << 40]), 1, median=1500, sigma=0.0, max_words=1500)[0]
    return ["", "a", long, "Café naïve Straße", "привет мир", "日本語のテキスト", "emoji 🚀 text", "  \t\n  "]


def block(seed: int, b: int, median: float) -> list:
    return text_corpus.texts(np.random.default_rng([seed, b]), BLOCK, median=median)


def bodies(a, lo: int, hi: int, cache: dict) -> list:
    """The texts of rows lo..hi-1 (None for nulls)."""
    out = []
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1):
        if b not in cache:
            cache.clear()
            cache[b] = block(a.seed, b, a.median_words)
        s = max(lo, b * BLOCK)
        out += cache[b][s - b * BLOCK: min(hi, (b + 1) * BLOCK) - b * BLOCK]
    if a.specials:
        for i, t in enumerate(specials(a.seed)):
            if lo <= i < hi:
                out[i - lo] = t
    if a.null_every > 0:
        for i in range(lo + (a.null_every - 1 - lo) % a.null_every, hi, a.null_every):
            out[i - lo] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="directory")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--files", type=int, default=1)
    p.add_argument("--row-group-rows", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--median-words", type=float, default=22)
    p.add_argument("--null-every", type=int, default=0, help="K: rows with id % K == K-1 are null (0: none)")
    p.add_argument("--specials", action="store_true", help="awkward texts in the first rows")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    per_file = -(-a.rows // a.files)
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("body", pa.string())])
    cache = {}
    for f in range(a.files):
        lo, hi = min(a.rows, f * per_file), min(a.rows, (f + 1) * per_file)
        body = bodies(a, lo, hi, cache) if hi > lo else []
        table = pa.Table.from_arrays(
            [pa.array(np.arange(lo, hi, dtype=np.int64)), pa.array(body, type=pa.string())], schema=schema
        )
        pq.write_table(table, os.path.join(a.out, f"part-{f:05d}.parquet"), row_group_size=a.row_group_rows)


if __name__ == "__main__":
    main()
