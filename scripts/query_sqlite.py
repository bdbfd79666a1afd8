#!/usr/bin/env python3
"""Runs one read-only query on a SQLite file and prints the rows as a JSON list (for tests)."""
import json
import sqlite3
import sys

con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
print(json.dumps([list(r) for r in con.execute(sys.argv[2]).fetchall()]))
