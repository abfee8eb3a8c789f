#!/usr/bin/env python3
"""Statistics of a file of seconds, one a line, in milliseconds.

usage: stats.py FILE            -> prints "median_ms p99_ms n"
       stats.py FILE STAT...    -> prints each STAT in ms, in the order given, then n;
                                   STAT: median, min, max, mean, or pNN (nearest rank)
"""
import math
import statistics
import sys


def nearest_rank(xs, q):
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


xs = sorted(float(l) for l in open(sys.argv[1]) if l.strip())
stats = sys.argv[2:] or ["median", "p99"]
out = []
for s in stats:
    if s == "median":
        v = statistics.median(xs)
    elif s == "min":
        v = xs[0]
    elif s == "max":
        v = xs[-1]
    elif s == "mean":
        v = statistics.mean(xs)
    elif s.startswith("p") and s[1:].isdigit():
        v = nearest_rank(xs, int(s[1:]))
    else:
        sys.exit(f"stats.py: unknown statistic {s}")
    out.append(f"{v * 1000:.2f}")
print(" ".join(out + [str(len(xs))]))
