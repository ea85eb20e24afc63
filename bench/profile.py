"""Sums a py-spy collapsed-stack profile (``--profile FILE.txt``) by function: the share of
samples in which each function is on the stack (inclusive) and on top (self).

    python -m bench.profile FILE.txt [--top N] [--match TEXT]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy's raw frames read "function (file.py:line)"; the line is dropped to sum by function.
_LINE = re.compile(r":\d+\)$")


def load(path: Path) -> tuple[Counter[str], Counter[str], int]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    return inclusive, own, total


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only functions whose frame contains TEXT")
    args = parser.parse_args()
    inclusive, own, total = load(args.path)
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}:")
        rows = [(f, n) for f, n in counter.most_common() if args.match in f][: args.top]
        for frame, n in rows:
            print(f"{100 * n / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main()
