#!/usr/bin/env python3
"""Median and p99 (nearest rank) of a file of seconds, one a line, in milliseconds.

usage: stats.py FILE   -> prints "median_ms p99_ms n"
"""
import math
import statistics
import sys

xs = sorted(float(l) for l in open(sys.argv[1]) if l.strip())
p99 = xs[max(0, math.ceil(0.99 * len(xs)) - 1)]
print(f"{statistics.median(xs) * 1000:.2f} {p99 * 1000:.2f} {len(xs)}")
