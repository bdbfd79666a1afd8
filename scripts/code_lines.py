#!/usr/bin/env python3
"""Counts lines of Rust code outside tests: every line of the .rs files under the paths given
but blank lines, comment lines (`//`, `///`, `//!`, `/* ... */`) and items under
`#[cfg(test)]`. Prints a count per file and the total.

    python3 scripts/code_lines.py metastore/src
"""

import sys
from pathlib import Path


def skip_item(lines, i):
    """The index past the item that starts after line `i` (its braces balanced)."""
    depth, opened = 0, False
    j = i + 1
    while j < len(lines):
        depth += lines[j].count("{") - lines[j].count("}")
        opened = opened or "{" in lines[j]
        if opened and depth <= 0:
            return j + 1
        j += 1
    return j


def count(path):
    lines = path.read_text().split("\n")
    n, i, in_block = 0, 0, False
    while i < len(lines):
        s = lines[i].strip()
        if in_block:
            in_block = "*/" not in s
        elif s.startswith("#[cfg(test)]"):
            i = skip_item(lines, i)
            continue
        elif s.startswith("/*"):
            in_block = "*/" not in s
        elif s and not s.startswith("//"):
            n += 1
        i += 1
    return n


def main(args):
    files = sorted(f for a in args for f in ([Path(a)] if a.endswith(".rs") else Path(a).rglob("*.rs")))
    total = 0
    for f in files:
        c = count(f)
        total += c
        print(f"{c:6} {f}")
    print(f"{total:6} total")


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
