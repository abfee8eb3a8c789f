#!/usr/bin/env bash
# An end-to-end Prometheus rotation, broken down by step: the demo's setup (a real
# remote-write receiver with basic auth and an agent-mode sender, on loopback),
# ROTATIONS rotations while the agent sends, and the per-step times rotd logs with
# each "rotation succeeded" (lock, plan, pending, apply, deliver, probe, commit, push,
# retire). Prints the median and max of each step and of the whole rotation.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! ROTATIONS="${ROTATIONS:-20}" PAUSE="${PAUSE:-1}" STEP_LOG="$log" \
  bash "$here/scripts/demo.sh" > "$log.out" 2>&1; then
  cat "$log.out"
  exit 1
fi
rm -f "$log.out"
python3 - "$log" <<'PY'
import re, statistics, sys
rows = []
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    if "rotation succeeded" in line and "steps=" in line:
        steps = line.split("steps=", 1)[1]
        rows.append([(s, float(ms)) for s, ms in re.findall(r"(\w+) ([\d.]+) ms", steps)])
if not rows:
    sys.exit("no 'rotation succeeded' lines with steps in the log")
order = [s for s, _ in rows[0]]
print(f"{len(rows)} Prometheus rotations (real receiver + agent on loopback, bcrypt at the default cost)")
print()
print("| step | median ms | max ms |")
print("|---|---:|---:|")
for step in order:
    v = [dict(r).get(step, 0.0) for r in rows]
    print(f"| {step} | {statistics.median(v):.1f} | {max(v):.1f} |")
tot = [sum(ms for _, ms in r) for r in rows]
print(f"| **total** | **{statistics.median(tot):.1f}** | {max(tot):.1f} |")
PY
