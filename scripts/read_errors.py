#!/usr/bin/env python3
"""Prints the error rows a committed output lists in its manifest, as a JSON list (for tests)."""
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq

out = sys.argv[1].rstrip("/")
manifest = json.load(open(f"{out}/_manifest.json"))
tables = [pq.read_table(f"{out}/{f['path']}") for f in manifest.get("error_files", [])]
rows = pa.concat_tables(tables).to_pylist() if tables else []
print(json.dumps(rows, default=str))
