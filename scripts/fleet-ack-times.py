#!/usr/bin/env python3
"""When each consumer host acknowledged each rotation, read from rotd's own logs.

usage: fleet-ack-times.py [--last | --tsv] ROTATOR_LOG HOST=AGENT_LOG...

ROTATOR_LOG holds the stderr of `rotd rotate` (one or more runs), each AGENT_LOG the
stderr of a `rotd agent`. Every log line starts with its UTC timestamp (microseconds).

A rotation starts at its succeeded commit: the rotator's DEBUG line "committed" of
the commit whose subject starts with "succeeded" when the log has it (ROTD_LOG=debug;
the push follows it), else its INFO line "rotation succeeded" (logged after the
push). A host acknowledged it at the first "acknowledged" line of its agent (logged
after the ack's push) whose acks name that rotation id.

--last  prints the last rotation in words (scripts/demo.sh --fleet)
--tsv   prints one line per rotation and host: ROTATION HOST SECONDS (- when the host
        never acknowledged it), for bench/fleet.sh
"""
import re
import sys
from datetime import datetime, timezone

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z")


def lines(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = ANSI.sub("", raw)
            m = STAMP.match(line)
            if not m:
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
            frac = (m.group(2) or "0")[:6].ljust(6, "0")
            yield t.timestamp() + int(frac) / 1e6, line


def rotations(path):
    """[(rotation id, start time, what the start is)] in the log's order."""
    out = []
    committed = None
    for t, line in lines(path):
        if " committed" in line and re.search(r"subject=.*: succeeded", line):
            committed = t
        elif "rotation succeeded" in line:
            m = re.search(r"rotation=(\S+)", line)
            if m:
                if committed is not None:
                    out.append((m.group(1), committed, "succeeded commit"))
                else:
                    out.append((m.group(1), t, "rotation succeeded log line"))
            committed = None
    return out


def acks(path):
    """[(time, text of the acks field)] of every acknowledgement in an agent log."""
    out = []
    for t, line in lines(path):
        if " acknowledged" in line and "acks=" in line:
            out.append((t, line.split("acks=", 1)[1]))
    return out


def main(argv):
    mode = "--last"
    if argv and argv[0] in ("--last", "--tsv"):
        mode = argv.pop(0)
    if len(argv) < 2:
        sys.exit(__doc__)
    rots = rotations(argv[0])
    hosts = [a.split("=", 1) for a in argv[1:]]
    host_acks = {h: acks(p) for h, p in hosts}
    if not rots:
        sys.exit(f"no succeeded rotation in {argv[0]}")
    if mode == "--last":
        rots = rots[-1:]
    for rot, start, basis in rots:
        when = {}
        for h, _ in hosts:
            for t, text in host_acks[h]:
                if rot in text:
                    when[h] = t - start
                    break
        if mode == "--tsv":
            for h, _ in hosts:
                print(f"{rot}\t{h}\t{when[h]:.6f}" if h in when else f"{rot}\t{h}\t-")
            continue
        order = sorted(when, key=when.get)
        said = ", ".join(f"{h} after {when[h]:.2f} s" for h in order)
        print(f"rotation {rot}: acknowledged by {said} (from the {basis})")
        missing = [h for h, _ in hosts if h not in when]
        if missing:
            print(f"  not acknowledged by {', '.join(missing)}")
        else:
            print(f"  the last acknowledgement came {when[order[-1]]:.2f} s after the succeeded commit")


if __name__ == "__main__":
    main(sys.argv[1:])
