#!/usr/bin/env bash
# Benchmark of the store path: rotd vs the hand-written shell pipeline
#   openssl rand -base64 32 | age -a -R recipients > secrets/NAME.age \
#     && git add && git commit -q && git push -q
# on comparable stores (3 recipients: the daemon + 2 age-keygen people; a bare remote
# on local disk, pushed on every commit). The rotd secrets use the `files` target with
# no [[deliver]] blocks and no probe, so only config load, CSPRNG, age, git and push
# are measured.
#
# usage: bench/run.sh            (builds `cargo build --release --locked` first)
# env:   N=200        rotations per per-secret series
#        HISTORY=10000 rotations of history written before the second series
#        BATCH=1000   secrets in the one-batch `rotd rotate --all` run
#        ROTD=PATH    use this rotd binary instead of building
#        OUT=PATH     markdown file whose generated section is rewritten
#                     (default BENCHMARKS.md at the repository root; OUT=- prints only)
#        CARGO_BUILD_JOBS, CARGO_TARGET_DIR are honoured by the build.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
N=${N:-200}
HISTORY=${HISTORY:-10000}
BATCH=${BATCH:-1000}
OUT=${OUT:-$REPO/BENCHMARKS.md}

for c in age age-keygen openssl git python3; do
  command -v "$c" >/dev/null || { echo "bench: needs $c" >&2; exit 1; }
done
TIMEV=/usr/bin/time
[ -x "$TIMEV" ] || { echo "bench: needs GNU time at /usr/bin/time (apt-get install time)" >&2; exit 1; }

if [ -z "${ROTD:-}" ]; then
  (cd "$REPO" && cargo build --release --locked --quiet)
  ROTD=${CARGO_TARGET_DIR:-$REPO/target}/release/rotd
fi
ROTD=$(readlink -f "$ROTD")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rotd-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export GIT_CONFIG_NOSYSTEM=1 HOME="$WORK/home"
mkdir -p "$HOME"
git config --global user.name bench
git config --global user.email bench@localhost
git config --global init.defaultBranch main
export ROTD_LOG=warn

log() { printf '== %s\n' "$*" >&2; }

# people DIR: two age-keygen identities; their public keys in DIR/keys/recipients
people() {
  mkdir -p "$1/keys"
  : >"$1/keys/recipients"
  for p in alice bob; do
    age-keygen -o "$1/keys/$p.agekey" 2>&1 | sed -n 's/^Public key: //p' >>"$1/keys/recipients"
  done
}

# rotd_env DIR NSECRETS: a rotd config, store, bare remote, NSECRETS files-target schedules
rotd_env() {
  local d=$1 n=$2
  people "$d"
  git init -q --bare -b main "$d/remote.git"
  mkdir -p "$d/schedules"
  cat >"$d/rotd.toml" <<TOML
[store]
path = "store"
remote = "$d/remote.git"
identity = "keys/rotd.agekey"
recipients = "keys/recipients"

[daemon]
schedules = "schedules"
socket = "rotd.sock"
TOML
  local i
  for ((i = 0; i < n; i++)); do
    printf 'name = "s%05d"\n[target]\nkind = "files"\n' "$i" >"$d/schedules/s$(printf %05d "$i").toml"
  done
  "$ROTD" --config "$d/rotd.toml" init >/dev/null
}

# pipeline_env DIR: a git store with .age-recipients (daemon + 2 people), a bare remote
pipeline_env() {
  local d=$1
  people "$d"
  age-keygen -o "$d/keys/daemon.agekey" 2>&1 | sed -n 's/^Public key: //p' >>"$d/keys/recipients"
  git init -q --bare -b main "$d/remote.git"
  git init -q "$d/store"
  mkdir -p "$d/store/secrets"
  cp "$d/keys/recipients" "$d/store/.age-recipients"
  git -C "$d/store" add .age-recipients
  git -C "$d/store" commit -q -m "init"
  git -C "$d/store" remote add origin "$d/remote.git"
  git -C "$d/store" push -q -u origin main
  cat >"$d/rotate.sh" <<'SH'
#!/usr/bin/env bash
# the hand-written rotation of secret $1 in store $2
set -e -o pipefail
cd "$2"
openssl rand -base64 32 | age -a -R .age-recipients >"secrets/$1.age"
git add "secrets/$1.age"
git commit -q -m "rotate $1"
git push -q
SH
  chmod +x "$d/rotate.sh"
}

# history DIR STYLE NAME: HISTORY past rotations of NAME, pushed to the remote
history() {
  local store=$1/store blob
  blob=$(git -C "$store" rev-parse "HEAD:secrets/$3.age")
  python3 "$HERE/gen_history.py" "$2" "$3" "$blob" "$HISTORY" main | git -C "$store" fast-import --quiet
  git -C "$store" reset -q --hard main
  git -C "$store" push -q origin main
}

series() { # LABEL CMD... -> $WORK/LABEL.times
  local label=$1; shift
  python3 "$HERE/timeit.py" "$N" "$WORK/$label.times" -- "$@"
}

log "rotd $("$ROTD" --version 2>/dev/null || true) at $ROTD; N=$N HISTORY=$HISTORY BATCH=$BATCH"

log "process start: rotd --version x $N"
series start "$ROTD" --version

log "per secret, one process per rotation: rotd rotate s00000 x $N"
rotd_env "$WORK/r1" 1
"$ROTD" --config "$WORK/r1/rotd.toml" rotate s00000 >/dev/null   # first record
series rotd_proc "$ROTD" --config "$WORK/r1/rotd.toml" rotate s00000

log "per secret, hand-written pipeline x $N"
pipeline_env "$WORK/p1"
"$WORK/p1/rotate.sh" s00000 "$WORK/p1/store"
series pipe "$WORK/p1/rotate.sh" s00000 "$WORK/p1/store"

log "writing $HISTORY rotations of history (rotd: 2 commits each; pipeline: 1)"
history "$WORK/r1" rotd s00000
history "$WORK/p1" pipeline s00000
"$ROTD" --config "$WORK/r1/rotd.toml" rotate s00000 >/dev/null   # warm-up: fetch
"$WORK/p1/rotate.sh" s00000 "$WORK/p1/store"
COMMITS_R=$(git -C "$WORK/r1/store" rev-list --count HEAD)
COMMITS_P=$(git -C "$WORK/p1/store" rev-list --count HEAD)

log "after history: rotd rotate s00000 x $N"
series rotd_proc_hist "$ROTD" --config "$WORK/r1/rotd.toml" rotate s00000
log "after history: pipeline x $N"
series pipe_hist "$WORK/p1/rotate.sh" s00000 "$WORK/p1/store"

# in-process: rotd rotate --all over COUNT secrets, under /usr/bin/time -v
batch() { # DIR COUNT -> "wall_s maxrss_kb"
  rotd_env "$1" "$2"
  "$TIMEV" -v -o "$1/time.txt" "$ROTD" --config "$1/rotd.toml" rotate --all >/dev/null
  python3 - "$1/time.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
w = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
s = 0.0
for part in w.split(":"):
    s = s * 60 + float(part)
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)
print(f"{s:.3f} {rss}")
PY
}
log "in-process: rotd rotate --all over $N secrets"
read -r ALL_N_S ALL_N_RSS < <(batch "$WORK/b1" "$N")
log "one batch: rotd rotate --all over $BATCH secrets"
read -r ALL_B_S ALL_B_RSS < <(batch "$WORK/b2" "$BATCH")

export N HISTORY BATCH COMMITS_R COMMITS_P ALL_N_S ALL_N_RSS ALL_B_S ALL_B_RSS WORK OUT ROTD
python3 "$HERE/report.py"
