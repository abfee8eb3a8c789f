#!/usr/bin/env python3
"""Runs a command N times and prints the wall time of each run (seconds, one a line).

usage: timeit.py N OUT_FILE -- CMD [ARGS...]
CMD may contain {i} (the run index, zero-padded to 5 digits). A failing run aborts.
"""
import subprocess
import sys
import time

n = int(sys.argv[1])
out = sys.argv[2]
assert sys.argv[3] == "--"
cmd = sys.argv[4:]
times = []
for i in range(n):
    argv = [a.replace("{i}", f"{i:05d}") for a in cmd]
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(f"run {i} of {argv} failed ({r.returncode}):\n{r.stderr.decode(errors='replace')}\n")
        sys.exit(1)
    times.append(dt)
with open(out, "w") as f:
    f.write("".join(f"{t:.6f}\n" for t in times))
