#!/usr/bin/env python3
"""Turns the series bench/run.sh measured into a table: printed, and written into the
section between the bench markers of $OUT (created if missing; OUT=- prints only)."""
import math
import os
import platform
import statistics
import subprocess
import time

env = os.environ
work = env["WORK"]
N, HISTORY, BATCH = int(env["N"]), int(env["HISTORY"]), int(env["BATCH"])
BEGIN, END = "<!-- bench:begin (written by bench/run.sh) -->", "<!-- bench:end -->"


def series(label):
    xs = sorted(float(l) for l in open(f"{work}/{label}.times") if l.strip())
    return statistics.median(xs) * 1000, xs[max(0, math.ceil(0.99 * len(xs)) - 1)] * 1000


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


start = series("start")
rp, pp = series("rotd_proc"), series("pipe")
rh, ph = series("rotd_proc_hist"), series("pipe_hist")
all_n_s, all_b_s = float(env["ALL_N_S"]), float(env["ALL_B_S"])
inproc = all_n_s * 1000 / N
inproc_b = all_b_s * 1000 / BATCH

rows = [
    ("process start only: `rotd --version`", f"{start[0]:.1f}", f"{start[1]:.1f}", ""),
    ("rotd, one process per rotation (`rotd rotate NAME`)", f"{rp[0]:.1f}", f"{rp[1]:.1f}",
     f"pipeline/rotd = {pp[0] / rp[0]:.2f}×"),
    ("hand-written pipeline (openssl \\| age, git add/commit/push)", f"{pp[0]:.1f}", f"{pp[1]:.1f}", ""),
    (f"rotd in-process: `rotd rotate --all` over {N} secrets ÷ {N}", f"{inproc:.1f} (mean)", "—",
     f"pipeline/rotd = {pp[0] / inproc:.2f}×"),
    (f"rotd per process, after {HISTORY} rotations ({env['COMMITS_R']} commits)", f"{rh[0]:.1f}",
     f"{rh[1]:.1f}", f"{rh[0] / rp[0]:.2f}× the first (target ≤ 1.2×)"),
    (f"pipeline, after {HISTORY} rotations ({env['COMMITS_P']} commits)", f"{ph[0]:.1f}",
     f"{ph[1]:.1f}", f"{ph[0] / pp[0]:.2f}× the first"),
    (f"one batch: `rotd rotate --all` over {BATCH} secrets", f"total {all_b_s:.2f} s",
     "—", f"{inproc_b:.1f} ms/secret; peak RSS {int(env['ALL_B_RSS']) / 1024:.1f} MiB"),
]
table = ["| measurement | median ms | p99 ms | notes |", "|---|---:|---:|---|"]
table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
met = pp[0] / rp[0] >= 10
met_in = pp[0] / inproc >= 10
cpu = sh("sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1") or platform.machine()
machine = (
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs "
    f"({cpu}); "
    f"load average at the end {os.getloadavg()[0]:.2f}; {sh('git --version')}; "
    f"age {sh('age --version')}; {sh('openssl version')}; rotd at commit "
    f"{sh('git -C ' + os.path.dirname(os.path.abspath(__file__)) + ' rev-parse --short HEAD')}"
)
section = "\n".join([
    BEGIN,
    f"Measured {machine}. N = {N} per series; peak RSS of the {N}-secret batch "
    f"{int(env['ALL_N_RSS']) / 1024:.1f} MiB.",
    "",
    *table,
    "",
    f"* 10× target, one process per rotation: **{'met' if met else 'not met'}** "
    f"(pipeline/rotd = {pp[0] / rp[0]:.2f}×).",
    f"* 10× target, in-process cost per rotation: **{'met' if met_in else 'not met'}** "
    f"(pipeline/rotd = {pp[0] / inproc:.2f}×).",
    f"* History: {rh[0] / rp[0]:.2f}× the first series after {HISTORY} rotations "
    f"(target ≤ 1.2×: **{'met' if rh[0] / rp[0] <= 1.2 else 'not met'}**).",
    END,
])
print("\n".join(table))
out = env.get("OUT", "-")
if out != "-":
    text = open(out).read() if os.path.exists(out) else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    open(out, "w").write(text)
    print(f"\nwritten into {out}")
