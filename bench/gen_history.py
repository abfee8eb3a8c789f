#!/usr/bin/env python3
"""Writes a `git fast-import` stream of ROTATIONS past rotations of one secret onto
branch BRANCH, re-using blob BLOB (an existing age file) so that the final tree equals
the current one. STYLE `rotd`: two commits per rotation (pending, then succeeded) with
rotd's Rotd-* trailers; STYLE `pipeline`: one `git commit` per rotation.

usage: gen_history.py STYLE NAME BLOB ROTATIONS BRANCH | git fast-import --quiet
"""
import sys
import time

style, name, blob, rotations, branch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
out = sys.stdout.buffer
t = int(time.time()) - rotations * 60
first = True


def commit(msg, changes):
    global first, t
    t += 1
    data = msg.encode()
    out.write(f"commit refs/heads/{branch}\n".encode())
    out.write(f"author rotd <rotd@localhost> {t} +0000\n".encode())
    out.write(f"committer rotd <rotd@localhost> {t} +0000\n".encode())
    out.write(f"data {len(data)}\n".encode() + data + b"\n")
    if first:
        out.write(f"from refs/heads/{branch}^0\n".encode())
        first = False
    for c in changes:
        out.write(c.encode() + b"\n")
    out.write(b"\n")


for i in range(rotations):
    rot = f"01HISTORY{i:017d}"
    if style == "rotd":
        def msg(step):
            return (f"rotate {name}: {step}\n\nRotd-Secret: {name}\nRotd-Rotation: {rot}\n"
                    f"Rotd-Step: {step}\nRotd-Trigger: schedule\nRotd-Target: files\n"
                    f"Rotd-Fingerprint: sha256:{i:064x}\n")
        commit(msg("pending"), [f"M 100644 {blob} secrets/{name}.pending.age"])
        commit(msg("succeeded"), [f"M 100644 {blob} secrets/{name}.age",
                                   f"D secrets/{name}.pending.age"])
    else:
        commit(f"rotate {name}\n", [f"M 100644 {blob} secrets/{name}.age"])
out.flush()
