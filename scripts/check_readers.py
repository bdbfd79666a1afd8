#!/usr/bin/env python3
"""Reads a committed local output with pyarrow, DuckDB and polars; prints the row count each
saw and the distinct ids DuckDB counted, as one JSON line."""
import json
import sys

import duckdb
import polars as pl
import pyarrow.parquet as pq

out = sys.argv[1].rstrip("/")
manifest = json.load(open(f"{out}/_manifest.json"))
files = [f"{out}/{f['path']}" for f in manifest["files"]]
arrow_rows = pq.read_table(out).num_rows
duck = duckdb.sql(f"SELECT count(*), count(DISTINCT id) FROM read_parquet({files!r})").fetchall()[0]
polars_rows = pl.read_parquet(files).height
print(json.dumps({"pyarrow": arrow_rows, "duckdb": duck[0], "duckdb_distinct_ids": duck[1], "polars": polars_rows}))
