#!/usr/bin/env python3
"""Overwrites the first page header of one column chunk of a Parquet file with garbage, leaving
the footer intact: the file plans fine and fails only when that page is read (for tests)."""
import sys

import pyarrow.parquet as pq

path, column, row_group = sys.argv[1], sys.argv[2], int(sys.argv[3])
meta = pq.ParquetFile(path).metadata
rg = meta.row_group(row_group)
chunk = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.split(".")[0] == column)
offset = chunk.dictionary_page_offset or chunk.data_page_offset
with open(path, "r+b") as f:
    f.seek(offset)
    f.write(b"\xff\xfe\xfd\xfc" * 16)
print(offset)
