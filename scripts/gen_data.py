#!/usr/bin/env python3
"""Writes the input table: `id` (int64), `features` (DIM float32 per row), `group` (string).

Deterministic for a seed. Options make the variants tests need: several files with different
codecs, small row groups, List instead of FixedSizeList, nullable columns, dictionary encoding,
and poison rows (nulls, wrong list lengths) at given ids.
"""
import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODECS = ["snappy", "zstd", "gzip", "lz4", "brotli", "none"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="directory")
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--row-group-rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--codecs", default="snappy", help="comma-separated, one per file in turn")
    p.add_argument("--list-type", choices=["fixed", "list", "large"], default="fixed")
    p.add_argument("--dtype", choices=["float16", "float32", "float64"], default="float32")
    p.add_argument("--nullable", action="store_true", help="declare columns nullable (no nulls)")
    p.add_argument("--null-ids", default="", help="ids whose features are null")
    p.add_argument("--short-ids", default="", help="ids whose feature list is one value short")
    p.add_argument("--big-ids", default="", help="ids whose first feature is 1000 (for --reject-above)")
    p.add_argument("--dictionary", action="store_true", help="dictionary-encode `group`")
    p.add_argument("--id-offset", type=int, default=0, help="first id")
    p.add_argument(
        "--writer",
        choices=["pyarrow", "duckdb", "spark"],
        default="pyarrow",
        help="duckdb: written by DuckDB's COPY; spark: pyarrow in Spark's flavour (v1 pages, INT96 timestamps)",
    )
    p.add_argument("--rows-per-file", default="", help="comma-separated row counts, overriding --rows/--files")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    np_t = {"float16": np.float16, "float32": np.float32, "float64": np.float64}[a.dtype]
    pa_t = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}[a.dtype]
    ids_of = lambda s: {int(x) for x in s.split(",") if x}
    nulls, shorts, bigs = ids_of(a.null_ids), ids_of(a.short_ids), ids_of(a.big_ids)
    codecs = a.codecs.split(",")
    if a.rows_per_file:
        sizes = [int(x) for x in a.rows_per_file.split(",")]
    else:
        per_file = -(-a.rows // a.files)
        sizes = [max(0, min(per_file, a.rows - f * per_file)) for f in range(a.files)]
    next_id = a.id_offset
    for f, n in enumerate(sizes):
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        feats = rng.standard_normal((n, a.dim)).astype(np_t)
        for i in bigs:
            if next_id <= i < next_id + n:
                feats[i - next_id, 0] = 1000
        rows = []
        irregular = a.list_type != "fixed" or nulls or shorts
        if irregular:
            for k, i in enumerate(ids):
                if int(i) in nulls:
                    rows.append(None)
                elif int(i) in shorts:
                    rows.append(feats[k, :-1].tolist())
                else:
                    rows.append(feats[k].tolist())
        if a.list_type == "fixed" and not shorts:
            if nulls:
                mask = np.array([int(i) in nulls for i in ids])
                flat = pa.array(feats.reshape(-1), type=pa_t)
                col = pa.FixedSizeListArray.from_arrays(flat, a.dim, mask=pa.array(mask))
            else:
                col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), type=pa_t), a.dim)
        elif a.list_type == "large":
            col = pa.array(rows, type=pa.large_list(pa_t))
        else:
            col = pa.array(rows, type=pa.list_(pa_t))
        groups = pa.array([f"g{int(i) % 7}" for i in ids], type=pa.string())
        if a.dictionary:
            groups = groups.dictionary_encode()
        nullable = a.nullable or bool(nulls)
        schema = pa.schema(
            [
                pa.field("id", pa.int64(), nullable=a.nullable),
                pa.field("features", col.type, nullable=nullable),
                pa.field("group", groups.type, nullable=a.nullable),
            ]
        )
        table = pa.Table.from_arrays([pa.array(ids), col, groups], schema=schema)
        codec = codecs[f % len(codecs)]
        path = os.path.join(a.out, f"part-{f:03d}.parquet")
        if a.writer == "duckdb":
            import duckdb

            con = duckdb.connect()
            con.register("t", table)
            con.execute(
                f"COPY (SELECT * FROM t) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE {a.row_group_rows}, "
                f"COMPRESSION '{codec if codec != 'none' else 'uncompressed'}')"
            )
        elif a.writer == "spark":
            table = table.append_column("ts", pa.array(np.full(n, 1_700_000_000_000_000, dtype="datetime64[us]")))
            pq.write_table(
                table,
                path,
                row_group_size=a.row_group_rows,
                compression=codec,
                flavor="spark",
                data_page_version="1.0",
                use_deprecated_int96_timestamps=True,
            )
        else:
            pq.write_table(table, path, row_group_size=a.row_group_rows, compression=codec, use_dictionary=True)
        next_id += n


if __name__ == "__main__":
    main()
