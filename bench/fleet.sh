#!/usr/bin/env bash
# The fleet's figures (issue 12), with a release rotd and real processes only:
#
#  (a) from the succeeded commit to the last of 3 acknowledgements, 3 `rotd agent`
#      loops polling every 1 s, N rotations of a `files` secret (no Prometheus);
#      times read from rotd's logs (scripts/fleet-ack-times.py says which lines);
#  (b) an idle agent pass (`rotd agent --once`, nothing changed): its wall time, and
#      whether it is a no-op — objects and packs in the clone before/after, the
#      remote's ack ref before/after, the decryptions it makes (calls of rotd's
#      `Keys::decrypt`, counted with gdb breakpoints), and its connections to a
#      git:// remote;
#  (c) the rotator's retire step with 1, 10 and 100 consumers: `rotd retire NAME`
#      after every consumer acknowledged (it retires) and with one still missing (it
#      reads and waits), RUNS times each, and the connections it opens to a git://
#      remote (git daemon --verbose logs each one). The secret is a
#      prometheus-remote-write one against a real receiver (bcrypt cost 4): the
#      `files` target has no old credential to retire. The acks are signed commits
#      written with git (commit-tree -S, gpg.format=ssh), as src/agent/ack.rs makes them.
#
# usage: bench/fleet.sh          (builds `cargo build --release --locked` first)
# env:   N=20        rotations for (a)
#        IDLE=30     idle passes for (b)
#        RUNS=5      retirements per consumer count for (c)
#        SIZES="1 10 100"  consumer counts for (c)
#        ROTD=PATH   use this rotd binary instead of building
#        KEEP=1      keep the work directory (its path is printed at the end)
# Needs age-keygen, ssh-keygen, git (with git-daemon), python3, prometheus, htpasswd
# (apache2-utils), curl; gdb for the decryption count and strace for the fsync counts
# (each skipped without it).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
N=${N:-20}
IDLE=${IDLE:-30}
RUNS=${RUNS:-5}
SIZES=${SIZES:-1 10 100}

for c in age-keygen ssh-keygen git python3 prometheus htpasswd curl; do
  command -v "$c" >/dev/null || { echo "bench: needs $c" >&2; exit 1; }
done
if [ -z "${ROTD:-}" ]; then
  (cd "$REPO" && cargo build --release --locked --quiet)
  ROTD=${CARGO_TARGET_DIR:-$REPO/target}/release/rotd
fi
ROTD=$(readlink -f "$ROTD")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rotd-fleet-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then echo "bench: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
export GIT_CONFIG_NOSYSTEM=1 HOME="$WORK/home"
mkdir -p "$HOME"
git config --global user.name bench
git config --global user.email bench@localhost
git config --global init.defaultBranch main
export ROTD_LOG=warn

log() { printf '== %s\n' "$*" >&2; }
stats() { python3 "$HERE/stats.py" "$@"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for WHAT CMD...: polls CMD every 0.05 s, at most 60 s.
wait_for() {
  local what=$1 i
  shift
  for ((i = 0; i < 1200; i++)); do
    "$@" && return 0
    sleep 0.05
  done
  echo "bench: timed out waiting for $what" >&2
  exit 1
}

# fleet_env DIR HOST...: a signing rotator (bare remote DIR/remote.git) whose secret
# `s` (files target, no deliver, grace 0s) lists HOST... as consumers; per host an
# age identity and an SSH signing key in DIR/hosts/HOST/keys.
fleet_env() {
  local d=$1 h recipient consumers=""
  shift
  mkdir -p "$d/keys" "$d/schedules"
  git init -q --bare "$d/remote.git"
  ssh-keygen -q -t ed25519 -N '' -C rotd@localhost -f "$d/keys/signing"
  echo "rotd@localhost $(cat "$d/keys/signing.pub")" >"$d/keys/allowed_signers"
  cat >"$d/rotd.toml" <<TOML
[store]
path = "store"
remote = "$d/remote.git"
identity = "keys/rotd.agekey"
signing_key = "keys/signing"
allowed_signers = "keys/allowed_signers"

[daemon]
schedules = "schedules"
socket = "rotd.sock"
TOML
  for h in "$@"; do
    mkdir -p "$d/hosts/$h/keys"
    recipient=$(age-keygen -o "$d/hosts/$h/keys/agekey" 2>&1 | sed -n 's/^Public key: //p')
    ssh-keygen -q -t ed25519 -N '' -C "rotd-agent@$h" -f "$d/hosts/$h/keys/sign"
    printf '\n[hosts.%s]\nrecipient = "%s"\nsigner = "%s"\n' \
      "$h" "$recipient" "$(cat "$d/hosts/$h/keys/sign.pub")" >>"$d/rotd.toml"
    consumers+="${consumers:+, }\"$h\""
  done
  cat >"$d/schedules/s.toml" <<TOML
name = "s"
schedule = "0 0 3 1 1 *"
grace = "0s"
consumers = [$consumers]
ack_timeout = "1h"
TOML
  "$ROTD" --config "$d/rotd.toml" init >/dev/null
}

# start_receiver DIR: a Prometheus remote-write receiver on $recv_port with basic
# auth (DIR/web.yml: prom-reader and writer-a), and both credentials imported into
# DIR's store (`s` as writer-a), for a schedule of the prometheus-remote-write target.
start_receiver() {
  local d=$1 reader writer
  reader=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  writer=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  recv_port=$(port)
  mkdir -p "$d/receiver"
  printf 'basic_auth_users:\n  prom-reader: %s\n  writer-a: %s\n' \
    "$(htpasswd -nbBC 4 x "$reader" | cut -d: -f2-)" "$(htpasswd -nbBC 4 x "$writer" | cut -d: -f2-)" >"$d/web.yml"
  printf 'global:\n  scrape_interval: 1m\n' >"$d/receiver/prometheus.yml"
  prometheus --config.file="$d/receiver/prometheus.yml" --storage.tsdb.path="$d/receiver/data" \
    --web.listen-address=127.0.0.1:$recv_port --web.config.file="$d/web.yml" \
    --web.enable-remote-write-receiver >"$d/receiver/log" 2>&1 &
  recv_pid=$!
  pids+=($!)
  wait_for "the receiver" curl -sf -u "prom-reader:$reader" "http://127.0.0.1:$recv_port/-/ready" -o /dev/null
  printf '%s\n' "$reader" | "$ROTD" --config "$d/rotd.toml" import prom-reader --username prom-reader >/dev/null
  printf '%s\n' "$writer" | "$ROTD" --config "$d/rotd.toml" import s --username writer-a >/dev/null
}

# agent_config DIR HOST: the host's agent.toml (poll 1 s), delivering `s` to a file.
agent_config() {
  local d=$1 h=$2
  cat >"$d/hosts/$h/agent.toml" <<TOML
host = "$h"
[store]
remote = "$d/remote.git"
path = "store"
identity = "keys/agekey"
signing_key = "keys/sign"
allowed_signers = "$d/keys/allowed_signers"
poll = "1s"

[[secret]]
name = "s"
[[secret.deliver]]
path = "$d/hosts/$h/s.secret"
content = "{{secret}}"
mode = "0600"
TOML
}

# last_rotation DIR: the rotation id of the remote's newest commit.
last_rotation() {
  git -C "$1/remote.git" log -1 --format='%(trailers:key=Rotd-Rotation,valueonly)' main | head -1
}

# retired_count DIR: how many `retired` commits the remote holds.
retired_count() {
  git -C "$1/remote.git" log --format='%(trailers:key=Rotd-Step,valueonly)' main | grep -c '^retired$' || true
}

# git_daemon DIR: serves DIR (fetch and push) on git://127.0.0.1:$daemon_port,
# logging every connection to DIR/daemon.log.
git_daemon() {
  daemon_port=$(port)
  git daemon --verbose --log-destination=stderr --export-all --enable=receive-pack \
    --reuseaddr --listen=127.0.0.1 --port="$daemon_port" --base-path="$1" \
    2>"$1/daemon.log" &
  daemon_pid=$!
  pids+=($!)
  wait_for "git daemon" bash -c "echo >/dev/tcp/127.0.0.1/$daemon_port" 2>/dev/null
}

# connections LOG FROM_LINE: the connections logged after line FROM_LINE, as
# "N (upload-pack ×U, receive-pack ×R)".
connections() {
  tail -n +"$(($2 + 1))" "$1" | awk '
    /Connection from/ {c++} /Request upload-pack/ {u++} /Request receive-pack/ {r++}
    END {printf "%d (upload-pack ×%d, receive-pack ×%d)", c, u, r}'
}

# ---- (a) succeeded → last of 3 acks --------------------------------------------
A=$WORK/a
hosts=(h1 h2 h3)
log "(a) 3 agents polling every 1 s, $N rotations"
fleet_env "$A" "${hosts[@]}"
printf '[target]\nkind = "files"\n' >>"$A/schedules/s.toml"
"$ROTD" --config "$A/rotd.toml" check >/dev/null
declare -A apid
for h in "${hosts[@]}"; do
  agent_config "$A" "$h"
  ROTD_LOG=info "$ROTD" agent --config "$A/hosts/$h/agent.toml" 2>"$A/hosts/$h/agent.log" &
  apid[$h]=$!
  pids+=($!)
done
acked() { grep -q "acknowledged.*$2" "$A/hosts/$1/agent.log"; }
for ((i = 0; i < N; i++)); do
  # A random 0–1 s pause: a rotation falls anywhere in the agents' poll cycles.
  sleep "$(python3 -c 'import random; print(round(random.random(), 3))')"
  ROTD_LOG=info,rotd::store=debug "$ROTD" --config "$A/rotd.toml" rotate s >/dev/null 2>>"$A/rotator.log"
  rot=$(last_rotation "$A")
  for h in "${hosts[@]}"; do wait_for "$h's ack of $rot" acked "$h" "$rot"; done
  "$ROTD" --config "$A/rotd.toml" retire s >/dev/null
done
for h in "${hosts[@]}"; do
  kill -TERM "${apid[$h]}"
  wait "${apid[$h]}" 2>/dev/null || true
done
args=()
for h in "${hosts[@]}"; do args+=("$h=$A/hosts/$h/agent.log"); done
python3 "$REPO/scripts/fleet-ack-times.py" --tsv "$A/rotator.log" "${args[@]}" >"$A/acks.tsv"
if grep -q $'\t-$' "$A/acks.tsv"; then
  echo "bench: a rotation without every ack in the logs:" >&2
  cat "$A/acks.tsv" >&2
  exit 1
fi
# The first rotation has no previous credential: its acks count as the others'.
awk -F'\t' '{ if ($3 > m[$1]) m[$1] = $3 } END { for (r in m) print m[r] }' "$A/acks.tsv" >"$A/last.txt"
cut -f3 "$A/acks.tsv" >"$A/each.txt"
read -r a_med a_p90 a_max a_n < <(stats "$A/last.txt" median p90 max)
read -r e_med e_p90 e_max e_n < <(stats "$A/each.txt" median p90 max)
start_basis=$(python3 "$REPO/scripts/fleet-ack-times.py" --last "$A/rotator.log" "${args[@]}" | sed -n 's/.*(from the \(.*\))$/\1/p')

# ---- (b) an idle pass ----------------------------------------------------------
log "(b) $IDLE idle passes of h1 (nothing changed since its last ack)"
cfg=$A/hosts/h1/agent.toml
clone=$A/hosts/h1/store
"$ROTD" agent --config "$cfg" --once 2>/dev/null # settle: the same state as the loop left
objects() { find "$clone/.git/objects" -type f | wc -l; }
packs() { find "$clone/.git/objects/pack" -name '*.pack' | wc -l; }
ackref() { git -C "$A/remote.git" rev-parse refs/rotd/acks/h1; }
ackcount() { git -C "$A/remote.git" rev-list --count refs/rotd/acks/h1; }
o0=$(objects); p0=$(packs); r0=$(ackref); c0=$(ackcount); f0=$(stat -c %y "$A/hosts/h1/s.secret")
python3 "$HERE/timeit.py" "$IDLE" "$A/idle.txt" -- "$ROTD" agent --config "$cfg" --once
o1=$(objects); p1=$(packs); r1=$(ackref); c1=$(ackcount); f1=$(stat -c %y "$A/hosts/h1/s.secret")
read -r i_med i_p90 i_max i_n < <(stats "$A/idle.txt" median p90 max)
ROTD_LOG=debug "$ROTD" agent --config "$cfg" --once 2>"$A/idle-debug.log"
idle_lines=$(sed -E 's/^[^ ]+ +//' "$A/idle-debug.log" | grep -E 'DEBUG rotd|INFO rotd' | sed -E 's/(commit|path)=[^ ]+ ?//g' | sort | uniq -c | sort -rn)
# gdb takes the function by its mangled name (it does not look Rust paths up here).
sym=$(nm "$ROTD" 2>/dev/null | awk '$3 ~ /^_ZN4rotd.*4Keys7decrypt17h[0-9a-f]+E$/ {print $3; exit}' || true)
if ! command -v gdb >/dev/null; then
  decrypts="not counted (no gdb)"
elif [ -z "$sym" ]; then
  decrypts="not counted (no symbol of rotd's Keys::decrypt in $ROTD: stripped, or renamed)"
else
  cat >"$A/count.gdb" <<GDB
set pagination off
break $sym
commands
silent
continue
end
run
info breakpoints
GDB
  gdb -q -batch -x "$A/count.gdb" --args "$ROTD" agent --config "$cfg" --once >"$A/gdb.out" 2>&1 || true
  hits=$(sed -n 's/.*breakpoint already hit \([0-9]*\) time.*/\1/p' "$A/gdb.out" | head -1)
  if grep -q 'Breakpoint 1 at' "$A/gdb.out" && grep -q 'exited normally' "$A/gdb.out"; then
    decrypts="${hits:-0}"
  else
    decrypts="not counted (gdb could not run the pass: $A/gdb.out)"
  fi
fi
# The same pass against a git:// remote: the connections it opens.
git_daemon "$A"
sed -i "s|^remote = .*|remote = \"git://127.0.0.1:$daemon_port/remote.git\"|" "$cfg"
"$ROTD" agent --config "$cfg" --once 2>/dev/null # the clone's origin moves to git://
from=$(wc -l <"$A/daemon.log")
"$ROTD" agent --config "$cfg" --once 2>/dev/null
idle_conns=$(connections "$A/daemon.log" "$from")
o2=$(objects); r2=$(ackref)
# What one pass writes to disk (strace, when installed): its fsync calls, and the
# files it renames or links into place.
idle_fsync="not counted (no strace)"
idle_writes="-"
if command -v strace >/dev/null; then
  strace -f -qq -e trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat -o "$A/idle.strace" \
    "$ROTD" agent --config "$cfg" --once 2>/dev/null
  idle_fsync=$(grep -cE '(fsync|fdatasync)\(' "$A/idle.strace" || true)
  idle_writes=$(sed -nE 's/.*(rename|link)[a-z0-9]*\(.*"([^"]+)"\) += 0$/\2/p' "$A/idle.strace" |
    sed "s|^$clone/||" | sort | uniq -c | awk '{printf "%s%s ×%d", (NR > 1 ? ", " : ""), $2, $1}')
fi

# ---- (c) the retire step with C consumers --------------------------------------
C_ROWS=()
# ack DIR HOST ROTATION: HOST's signed acknowledgement of ROTATION of `s`, on top of
# its previous one, written into the remote as `rotd agent` pushes it (an empty tree,
# author HOST <rotd-agent@HOST>, the message "ack HOST" + one Rotd-Ack trailer,
# SSH-signed by the host's key: git commit-tree -S with gpg.format=ssh).
ack() {
  local d=$1 h=$2 rot=$3 parent sha
  parent=$(git -C "$d/remote.git" rev-parse -q --verify "refs/rotd/acks/$h" || true)
  sha=$(GIT_AUTHOR_NAME=$h GIT_AUTHOR_EMAIL=rotd-agent@$h GIT_COMMITTER_NAME=$h GIT_COMMITTER_EMAIL=rotd-agent@$h \
    git -C "$d/remote.git" -c gpg.format=ssh -c user.signingkey="$d/hosts/$h/keys/sign" \
    commit-tree -S "$empty_tree" ${parent:+-p "$parent"} -m "ack $h" -m "Rotd-Ack: s $rot")
  git -C "$d/remote.git" update-ref "refs/rotd/acks/$h" "$sha"
}
for c in $SIZES; do
  C=$WORK/c$c
  log "(c) $c consumers, $RUNS retirements"
  chosts=()
  for ((k = 1; k <= c; k++)); do chosts+=("$(printf 'h%03d' "$k")"); done
  fleet_env "$C" "${chosts[@]}"
  start_receiver "$C"
  cat >>"$C/schedules/s.toml" <<TOML
[target]
kind = "prometheus-remote-write"
url = "http://127.0.0.1:$recv_port"
web_config = "$C/web.yml"
usernames = ["writer-a", "writer-b"]
query_credential = "prom-reader"
bcrypt_cost = 4
TOML
  "$ROTD" --config "$C/rotd.toml" check >/dev/null
  empty_tree=$(git -C "$C/remote.git" hash-object -t tree -w --stdin </dev/null)
  git_daemon "$C"
  sed "s|^remote = .*|remote = \"git://127.0.0.1:$daemon_port/remote.git\"|" "$C/rotd.toml" >"$C/rotd-git.toml"
  : >"$C/retire.txt"
  : >"$C/wait.txt"
  # RUNS runs of each kind, then one of each through git daemon (connections counted):
  # "retire": every consumer's ack is new since the last fetch, `retire` retires;
  # "wait":   every ack but one is new, `retire` reads them all and waits (the last
  #           ack is written after it, and a second, untimed `retire` retires).
  for kind in $(printf 'retire %.0s' $(seq "$RUNS")) $(printf 'wait %.0s' $(seq "$RUNS")) git-retire git-wait $(command -v strace >/dev/null && echo strace-retire); do
    conf=$C/rotd.toml
    case $kind in
      git-retire)
        conf=$C/rotd-git.toml
        "$ROTD" --config "$conf" init >/dev/null # the store's origin moves to git://
        ;;
      git-wait) conf=$C/rotd-git.toml ;;
      strace-retire) "$ROTD" --config "$conf" init >/dev/null ;; # back to the path
    esac
    "$ROTD" --config "$conf" rotate s >/dev/null 2>&1
    rot=$(last_rotation "$C")
    for h in "${chosts[@]:1}"; do ack "$C" "$h" "$rot"; done
    before=$(retired_count "$C")
    case $kind in *retire) ack "$C" "${chosts[0]}" "$rot" ;; esac
    from=$(wc -l <"$C/daemon.log")
    if [ "$kind" = strace-retire ]; then
      strace -f -qq -c -o "$C/retire.strace" "$ROTD" --config "$conf" retire s >/dev/null
      : >"$C/one.txt"
    else
      python3 "$HERE/timeit.py" 1 "$C/one.txt" -- "$ROTD" --config "$conf" retire s
    fi
    conns=$(connections "$C/daemon.log" "$from")
    case $kind in
      *retire) want=$((before + 1)) ;;
      *wait) want=$before ;;
    esac
    [ "$(retired_count "$C")" = "$want" ] || { echo "bench: $kind run with $c consumers: retired commits $(retired_count "$C"), expected $want" >&2; exit 1; }
    case $kind in
      retire) cat "$C/one.txt" >>"$C/retire.txt" ;;
      wait) cat "$C/one.txt" >>"$C/wait.txt" ;;
      git-retire) retire_conns=$conns git_ms=$(awk '{printf "%.1f", $1 * 1000}' "$C/one.txt") ;;
      git-wait) wait_conns=$conns ;;
      strace-retire) fsyncs=$(awk '$NF == "fsync" {print $4}' "$C/retire.strace") ;;
    esac
    case $kind in
      *wait)
        ack "$C" "${chosts[0]}" "$rot"
        "$ROTD" --config "$conf" retire s >/dev/null
        ;;
    esac
  done
  read -r w_med w_max _ < <(stats "$C/wait.txt" median max)
  read -r r_med r_max _ < <(stats "$C/retire.txt" median max)
  C_ROWS+=("| $c | $r_med | $r_max | $w_med | $w_max | $git_ms | $retire_conns | $wait_conns | ${fsyncs:--} |")
  kill "$recv_pid" "$daemon_pid"
  wait "$recv_pid" "$daemon_pid" 2>/dev/null || true
done

# ---- report --------------------------------------------------------------------
cat <<EOF
Measured $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; load average at the end $(cut -d' ' -f1-3 /proc/loadavg); $(git --version); rotd at commit $(git -C "$REPO" rev-parse --short HEAD).

(a) succeeded commit → acknowledgements, 3 agents polling every 1 s, $a_n rotations (start: the $start_basis; end: each agent's "acknowledged" log line, after its push)

| | median ms | p90 ms | max ms | n |
|---|---:|---:|---:|---:|
| the last of the 3 acks | $a_med | $a_p90 | $a_max | $a_n |
| each ack | $e_med | $e_p90 | $e_max | $e_n |

(b) an idle pass, \`rotd agent --once\` with nothing changed ($i_n passes)

| | |
|---|---|
| wall time, median / p90 / max ms | $i_med / $i_p90 / $i_max |
| files in the clone's .git/objects before → after the $i_n passes | $o0 → $o1 (packs $p0 → $p1); after the git:// passes: $o2 |
| the remote's refs/rotd/acks/h1 before → after | ${r0:0:12} → ${r1:0:12} (${c0} → ${c1} commits); after the git:// passes: ${r2:0:12} |
| the delivered file (mtime) | $( [ "$f0" = "$f1" ] && echo unchanged || echo changed ) |
| decryptions in one pass (calls of Keys::decrypt, gdb) | $decrypts |
| connections of one pass to a git:// remote | $idle_conns |
| fsync calls of one pass (strace) | $idle_fsync |
| files one pass renames or links into place (strace) | ${idle_writes:-none} |

log lines of one idle pass at ROTD_LOG=debug (count, level, target, message):
\`\`\`
$idle_lines
\`\`\`

(c) \`rotd retire s\` with C consumers, wall time of the process (median and max of $RUNS runs each, local path remote; one more run of each over git://)

| consumers | every ack new, retires: median ms | max ms | one missing, waits: median ms | max ms | retires over git:// ms | its connections | connections while waiting | fsync calls of a retire, every ack new (strace) |
|---:|---:|---:|---:|---:|---:|---|---|---:|
$(printf '%s\n' "${C_ROWS[@]}")
EOF
