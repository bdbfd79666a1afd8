#!/usr/bin/env python3
"""Runs one query against PostgreSQL with psql and prints the rows as a JSON list (for tests)."""
import json
import subprocess
import sys

url, sql = sys.argv[1], sys.argv[2]
out = subprocess.run(
    ["psql", url, "-X", "-q", "-t", "-A", "-c", f"SELECT COALESCE(json_agg(row_to_json(t)), '[]') FROM ({sql}) t"],
    check=True,
    capture_output=True,
    text=True,
).stdout
rows = json.loads(out.strip() or "[]")
print(json.dumps([list(r.values()) for r in rows]))
