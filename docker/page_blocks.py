#!/usr/bin/env python3
"""The command blocks of docs/deployment.md, as `make compose-e2e` (docker/e2e.sh) runs them.

On the page, each ```bash block follows a marker line:

    <!-- e2e: NAME -->          the e2e runs this block, as written, under NAME
    <!-- e2e: skip, WHY -->     the e2e does not run it (installing Docker, hours of training)

Usage:
    python3 docker/page_blocks.py PAGE          # the names of the blocks to run, in page order
    python3 docker/page_blocks.py PAGE NAME     # the commands of block NAME

tests/test_deploy.py checks that every bash block of the page is marked and that docker/e2e.sh
runs exactly the marked blocks, in the page's order.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

MARK = re.compile(r"^<!-- e2e: (?:(skip), (.+?)|([a-z0-9][a-z0-9-]*)) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    name: str | None   # None: not marked
    skip: str | None   # why the e2e does not run it
    lang: str
    text: str
    line: int          # 1-based line of the opening fence


def blocks(page: str) -> list[Block]:
    """Every fenced block of the page, with the marker of the line before it (blank lines between
    are allowed)."""
    lines, out, mark, i = page.splitlines(), [], None, 0
    while i < len(lines):
        line = lines[i]
        m, fence = MARK.match(line.strip()), FENCE.match(line)
        if m:
            mark = m
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"line {i + 1}: a code block is not closed")
            name = skip = None
            if mark is not None:
                name, skip = (None, mark.group(2)) if mark.group(1) else (mark.group(3), None)
            out.append(Block(name, skip, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1))
            mark, i = None, end
        elif line.strip():
            mark = None
        i += 1
    return out


def steps(page: str) -> list[Block]:
    """The blocks the e2e runs, in page order; names must be unique."""
    run = [b for b in blocks(page) if b.name]
    names = [b.name for b in run]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"block names used twice: {duplicates}")
    return run


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    run = steps(Path(argv[1]).read_text())
    if len(argv) == 2:
        print("\n".join(b.name for b in run))
        return 0
    for b in run:
        if b.name == argv[2]:
            sys.stdout.write(b.text)
            return 0
    print(f"page_blocks.py: no block {argv[2]!r} in {argv[1]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
