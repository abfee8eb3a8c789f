#!/usr/bin/env bash
# CI's short fuzz run: every cargo-fuzz target in fuzz_targets/ (`cargo fuzz list`:
# schedule, web_config, record, es_response, prom_query, control, allowed_signers,
# recipients, trailers, web_config_rewrite, next_run), starting from a copy of the
# committed seed corpus.
#
# The run is REPRODUCIBLE: a fixed seed (FUZZ_SEED, default 1) and a fixed number of
# inputs per target (the table below: about 12 s of this 2-core machine each), so a
# commit that passes here passes in CI, and a failure replays. A time cap
# (FUZZ_MAX_SECONDS, default 60 s a target) bounds a slower machine. Exploration —
# new random seeds, minutes per target — is a separate, deliberate run:
# FUZZ_SECONDS=N makes this script fuzz each target for N seconds with a random seed
# instead (fuzz/README.md); whatever it finds is fixed and its input committed as a
# `seed-regress-*` file, which every later CI run replays.
#
# Exits non-zero when any target finds a crash (a panic, a broken property), an input
# slower than 5 s, more than 2 GiB of memory, or a leak; prints the input as base64
# and leaves it in fuzz/artifacts/TARGET/ for `cargo fuzz run TARGET FILE` to replay.
#
# cargo-fuzz needs unstable rustc flags (-Zsanitizer=address, sanitizer coverage). The
# machine has only the stable toolchain and no other can be fetched, so the build runs
# on stable with RUSTC_BOOTSTRAP=1. The build is cached in CARGO_TARGET_DIR (default
# /var/tmp/rotd-fuzz-target). On 2 cores: about 3 minutes with the build cached, 4
# when src/ changed, 20 cold (no cargo-fuzz, no cached build).
set -euo pipefail
cd "$(dirname "$0")"

explore="${FUZZ_SECONDS:-}"
seed="${FUZZ_SEED:-1}"
cap="${FUZZ_MAX_SECONDS:-60}"
# Inputs per target in the reproducible run (about 12 s each here; exec/s measured).
declare -A runs=(
  [allowed_signers]=250000 [control]=90000 [es_response]=36000 [next_run]=100000
  [prom_query]=150000 [recipients]=8000 [record]=400000 [schedule]=64000
  [trailers]=140000 [web_config]=110000 [web_config_rewrite]=27000
)
cargo_fuzz_version=0.13.2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/rotd-fuzz-target}"
export CARGO_TERM_COLOR=never
export RUSTC_BOOTSTRAP=1
started=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
  cargo install --locked --quiet cargo-fuzz --version "$cargo_fuzz_version"
fi

# The committed fuzz/Cargo.lock must be complete: cargo fuzz has no --locked of its own.
cargo metadata --locked --format-version 1 >/dev/null

t0=$SECONDS
cargo fuzz build
echo "fuzz: targets built in $((SECONDS - t0)) s"

work=$(mktemp -d "${TMPDIR:-/tmp}/rotd-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
stamp="$work/stamp"
touch "$stamp"

failed=()
mapfile -t targets < <(cargo fuzz list)
for t in "${targets[@]}"; do
  # libFuzzer adds what it finds to its corpus directory: give it a copy.
  mkdir -p "$work/corpus/$t"
  cp corpus/"$t"/seed-* "$work/corpus/$t/"
  log="$work/$t.log"
  # The recipients target writes its inputs to files under TMPDIR: keep them in $work.
  if [ -n "$explore" ]; then
    how=(-max_total_time="$explore")
  else
    how=(-seed="$seed" -runs="${runs[$t]:-50000}" -max_total_time="$cap")
  fi
  t0=$SECONDS
  if TMPDIR="$work" cargo fuzz run "$t" "$work/corpus/$t" -- \
    "${how[@]}" -timeout=5 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$log" 2>&1; then
    done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 | sed -E 's/^#[0-9]+[[:space:]]+DONE[[:space:]]+//')
    echo "fuzz: $t ok: $done_runs execs in $((SECONDS - t0)) s ($rate exec/s; ${how[*]}); $cov"
  else
    failed+=("$t")
    echo "fuzz: $t FAILED; its log, without the progress lines:"
    grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|RELOAD|pulse|INITED)|^[[:space:]]+NEW_FUNC|^INFO: ' "$log" | head -n 150
    find "artifacts/$t" -type f -newer "$stamp" 2>/dev/null | while read -r a; do
      echo "fuzz: $t input $a (base64; replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t $a):"
      base64 -w 76 "$a"
    done
  fi
done

echo "fuzz: ${#targets[@]} targets, $((SECONDS - started)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}"
  exit 1
fi
