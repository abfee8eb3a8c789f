#!/usr/bin/env bash
# The main job, for real, on one machine: a Prometheus remote-write receiver with
# basic auth, an agent-mode Prometheus remote-writing to it with a password_file, and
# rotd rotating the agent's write credential twice while it sends. Everything runs on
# loopback in a temp directory and is stopped at the end.
#
# `scripts/demo.sh --fleet` is the same job across a fleet (DESIGN §7): one receiver,
# three sender "hosts" (directories), each an agent-mode Prometheus fed by its own
# `rotd agent` (own agent.toml, age identity, SSH signing key and clone of the store,
# polling every second), and the rotator, whose schedule lists the three hosts as
# consumers. It rotates a few times and prints when each host acknowledged; stops one
# host's agent, rotates, and shows the secret waiting for that host; restarts it, and
# shows it catching up and the old credential retired. It fails if a sender had a
# single sample refused.
set -euo pipefail

mode=single
case "${1:-}" in
  "") ;;
  --fleet) mode=fleet ;;
  *)
    echo "usage: $0 [--fleet]" >&2
    exit 64
    ;;
esac

need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v age >/dev/null || need+=(age)
command -v git >/dev/null || need+=(git)
command -v curl >/dev/null || need+=(curl)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
if [ "$mode" = fleet ]; then
  command -v ssh-keygen >/dev/null || need+=(openssh-client)
  command -v python3 >/dev/null || need+=(python3)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from the distribution's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --manifest-path "$here/Cargo.toml" -q
rotd="${CARGO_TARGET_DIR:-$here/target}/release/rotd"

work=$(mktemp -d)
pids=()
# Every process this script started (receiver, senders, agents) is stopped on exit,
# whatever the exit, before the temp directory goes.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hash() { htpasswd -nbBC 10 x "$1" | cut -d: -f2-; }
cd "$work"

# start_receiver: web.yml with the reader and the first writer (writer-a), and the
# remote-write receiver on $recv_port with basic auth.
start_receiver() {
  mkdir -p receiver
  cat > web.yml <<YML
basic_auth_users:
  prom-reader: $(hash "$reader_pw")
  writer-a: $(hash "$writer_pw")
YML
  printf 'global:\n  scrape_interval: 1m\n' > receiver/prometheus.yml
  prometheus --config.file=receiver/prometheus.yml --storage.tsdb.path=receiver/data \
    --web.listen-address=127.0.0.1:$recv_port --web.config.file=web.yml \
    --web.enable-remote-write-receiver >receiver/log 2>&1 &
  pids+=($!)
}

# sender_template JOB PORT DIR: a sender's Prometheus config, with rotd's
# {{username}} placeholders: it scrapes itself and remote-writes as {{username}}
# with the password in DIR/{{username}}.password.
sender_template() {
  cat <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: $1
    static_configs:
      - targets: ['127.0.0.1:$2']
remote_write:
  - url: http://127.0.0.1:$recv_port/api/v1/write
    basic_auth:
      username: {{username}}
      password_file: $3/{{username}}.password
    queue_config:
      batch_send_deadline: 1s
YML
}

# start_sender CONFIG_DIR DATA_DIR PORT: an agent-mode Prometheus reading
# CONFIG_DIR/prometheus.yml, with /-/reload.
start_sender() {
  prometheus --enable-feature=agent --config.file="$1/prometheus.yml" --storage.agent.path="$2" \
    --web.listen-address=127.0.0.1:$3 --web.enable-lifecycle >"$2/log" 2>&1 &
  pids+=($!)
}

# sender_metric PORT METRIC: a sender's own counter, summed over its queues.
sender_metric() {
  curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '{ n = $1; sub(/\{.*/, "", n) } n == m { s += $2 } END { print s + 0 }'
}

reader_pw=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
writer_pw=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')

single() {
  recv_port=$(port); agent_port=$(port)
  mkdir -p keys schedules agent agent-data
  start_receiver

  sender_template agent "$agent_port" "$work/agent" > agent.yml.tmpl
  sed 's/{{username}}/writer-a/g' agent.yml.tmpl > agent/prometheus.yml
  printf '%s' "$writer_pw" > agent/writer-a.password
  start_sender agent agent-data "$agent_port"
  for _ in $(seq 100); do
    curl -sf -u "prom-reader:$reader_pw" "http://127.0.0.1:$recv_port/-/ready" >/dev/null \
      && curl -sf "http://127.0.0.1:$agent_port/-/ready" >/dev/null && break
    sleep 0.2
  done

  git init -q --bare remote.git
  cat > rotd.toml <<TOML
[store]
path = "store"
remote = "$work/remote.git"
identity = "keys/rotd.agekey"
[daemon]
schedules = "schedules"
TOML
  cat > schedules/prom-remote-write.toml <<TOML
name = "prom-remote-write"
schedule = "0 0 3 * * Sun"
grace = "0s"
[target]
kind = "prometheus-remote-write"
url = "http://127.0.0.1:$recv_port"
web_config = "$work/web.yml"
usernames = ["writer-a", "writer-b"]
query_credential = "prom-reader"
[[deliver]]
path = "$work/agent/{{username}}.password"
content = "{{secret}}"
mode = "0640"
[[deliver]]
template = "$work/agent.yml.tmpl"
path = "$work/agent/prometheus.yml"
mode = "0640"
reload = { http_post = "http://127.0.0.1:$agent_port/-/reload" }
TOML
  export ROTD_CONFIG="$work/rotd.toml"
  "$rotd" init
  printf '%s\n' "$reader_pw" | "$rotd" import prom-reader --username prom-reader
  printf '%s\n' "$writer_pw" | "$rotd" import prom-remote-write --username writer-a
  "$rotd" check
  # ROTATIONS, PAUSE (seconds between them) and STEP_LOG (a file that gets rotd's log
  # lines, for bench/e2e-prometheus.sh) let the benchmark reuse this setup.
  rotations="${ROTATIONS:-2}"
  pause="${PAUSE:-3}"
  steplog="${STEP_LOG:-/dev/null}"
  sleep "$pause"
  for _ in $(seq "$rotations"); do
    "$rotd" rotate prom-remote-write 2> >(tee -a "$steplog" >&2)
    sleep "$pause"
  done
  "$rotd" status
  echo
  "$rotd" history prom-remote-write
  failed=$(sender_metric "$agent_port" prometheus_remote_storage_samples_failed_total)
  sent=$(sender_metric "$agent_port" prometheus_remote_storage_samples_total)
  echo
  echo "agent: $sent samples sent, $failed refused during $rotations rotations"
  [ "$failed" = "0" ]
}

# ---- the fleet ------------------------------------------------------------------

hosts=(h1 h2 h3)
declare -A sender_port agent_pid

say() { printf '\n== %s\n' "$*"; }

# wait_for WHAT CMD...: polls CMD every 0.2 s, at most 60 s.
wait_for() {
  local what=$1
  shift
  for _ in $(seq 300); do
    "$@" && return 0
    sleep 0.2
  done
  echo "timed out waiting for $what" >&2
  return 1
}

ready() { curl -sf ${2:+-u "$2"} "http://127.0.0.1:$1/-/ready" >/dev/null; }

# start_agent HOST: `rotd agent` in its loop mode, its log (INFO: the lines this script
# reads) in HOST/agent.log.
start_agent() {
  ROTD_LOG=info "$rotd" agent --config "$work/$1/agent.toml" 2>>"$work/$1/agent.log" &
  agent_pid[$1]=$!
  pids+=($!)
}

# stop_agent HOST: SIGTERM, which ends the loop between two passes.
stop_agent() {
  kill -TERM "${agent_pid[$1]}"
  wait "${agent_pid[$1]}" 2>/dev/null || true
}

# lagging: the hosts that have not acknowledged the current rotation (one a line).
lagging() {
  "$rotd" status --json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["secrets"]:
    if s["name"] == "prom-remote-write":
        print("\n".join(s.get("lagging") or []))'
}
all_acked() { [ -z "$(lagging)" ]; }
only_lagging() { [ "$(lagging)" = "$1" ]; }

# rotate: one rotation; rotd's log lines are kept in rotator.log (with the DEBUG line
# of each commit, which dates the succeeded commit) and shown without the DEBUG ones.
rotate() {
  ROTD_LOG=info,rotd::store=debug "$rotd" rotate prom-remote-write \
    2> >(tee -a "$work/rotator.log" | grep --line-buffered -v ' DEBUG ' >&2)
}

# on_receiver QUERY: the value of an instant query on the receiver (0 when empty).
on_receiver() {
  curl -sfG -u "prom-reader:$reader_pw" "http://127.0.0.1:$recv_port/api/v1/query" \
    --data-urlencode "query=$1" |
    python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)'
}

# sending HOST: whether the receiver has samples of HOST's sender.
sending() { [ "$(on_receiver "count(up{job=\"$1\"})")" != 0 ]; }

# received HOST: what the receiver stored of HOST's sender, which scrapes itself every
# second and writes each scrape's samples (`up` among them): the scrapes stored, the
# seconds from the first to the last, the longest gap between two, and the samples.
received() {
  local samples
  samples=$(on_receiver "sum_over_time(scrape_samples_scraped{job=\"$1\"}[1h])")
  curl -sfG -u "prom-reader:$reader_pw" "http://127.0.0.1:$recv_port/api/v1/query" \
    --data-urlencode "query=up{job=\"$1\"}[1h]" | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
ts = sorted(float(t) for s in r for t, _ in s["values"])
gap = max((b - a for a, b in zip(ts, ts[1:])), default=0)
span = ts[-1] - ts[0] if ts else 0
print(f"{len(ts)} scrapes over {span:.0f} s (longest gap {gap:.0f} s, {sys.argv[1]} samples)")' "$samples"
}

# refused HOST: the writes HOST's sender had refused. Its own failure counter starts
# again at each reload (a new queue per remote_write config), so its log is read too.
refused() {
  local logged counted
  logged=$(grep -c -e 'non-recoverable error' -e '401 Unauthorized' "$work/$1/prom-data/log" || true)
  counted=$(sender_metric "${sender_port[$1]}" prometheus_remote_storage_samples_failed_total)
  echo $((logged + counted))
}

# ack_times: per rotation, when each host acknowledged it (from the logs).
ack_times() {
  local args=()
  for h in "${hosts[@]}"; do args+=("$h=$work/$h/agent.log"); done
  python3 "$here/scripts/fleet-ack-times.py" --last "$work/rotator.log" "${args[@]}"
}

fleet() {
  recv_port=$(port)
  mkdir -p keys schedules
  start_receiver
  ssh-keygen -q -t ed25519 -N '' -C rotd@localhost -f keys/signing
  echo "rotd@localhost $(cat keys/signing.pub)" > keys/allowed_signers
  git init -q --bare remote.git
  cat > rotd.toml <<TOML
[store]
path = "store"
remote = "$work/remote.git"
identity = "keys/rotd.agekey"
signing_key = "keys/signing"
allowed_signers = "keys/allowed_signers"
[daemon]
schedules = "schedules"
socket = "$work/rotd.sock"
TOML

  for h in "${hosts[@]}"; do
    mkdir -p "$h/keys" "$h/prom" "$h/prom-data"
    recipient=$(age-keygen -o "$h/keys/$h.agekey" 2>&1 | sed -n 's/^Public key: //p')
    ssh-keygen -q -t ed25519 -N '' -C "rotd-agent@$h" -f "$h/keys/$h.sign"
    printf '\n[hosts.%s]\nrecipient = "%s"\nsigner = "%s"\n' \
      "$h" "$recipient" "$(cat "$h/keys/$h.sign.pub")" >> rotd.toml
    sender_port[$h]=$(port)
    sender_template "$h" "${sender_port[$h]}" "$work/$h/prom" > "$h/sender.yml.tmpl"
    sed 's/{{username}}/writer-a/g' "$h/sender.yml.tmpl" > "$h/prom/prometheus.yml"
    printf '%s' "$writer_pw" > "$h/prom/writer-a.password"
    start_sender "$h/prom" "$h/prom-data" "${sender_port[$h]}"
    cat > "$h/agent.toml" <<TOML
host = "$h"
[store]
remote = "$work/remote.git"
path = "store"
identity = "keys/$h.agekey"
signing_key = "keys/$h.sign"
allowed_signers = "$work/keys/allowed_signers"
poll = "1s"

[[secret]]
name = "prom-remote-write"
[[secret.deliver]]
path = "$work/$h/prom/{{username}}.password"
content = "{{secret}}"
mode = "0640"
[[secret.deliver]]
template = "$work/$h/sender.yml.tmpl"
path = "$work/$h/prom/prometheus.yml"
mode = "0640"
reload = { http_post = "http://127.0.0.1:${sender_port[$h]}/-/reload" }
TOML
  done
  # The rotator writes no file of the senders: their agents deliver.
  cat > schedules/prom-remote-write.toml <<TOML
name = "prom-remote-write"
schedule = "0 0 3 * * Sun"
grace = "0s"
consumers = ["h1", "h2", "h3"]
ack_timeout = "1h"
[target]
kind = "prometheus-remote-write"
url = "http://127.0.0.1:$recv_port"
web_config = "$work/web.yml"
usernames = ["writer-a", "writer-b"]
query_credential = "prom-reader"
TOML
  wait_for "the receiver" ready "$recv_port" "prom-reader:$reader_pw"
  for h in "${hosts[@]}"; do wait_for "$h's sender" ready "${sender_port[$h]}"; done

  export ROTD_CONFIG="$work/rotd.toml"
  "$rotd" init
  printf '%s\n' "$reader_pw" | "$rotd" import prom-reader --username prom-reader
  printf '%s\n' "$writer_pw" | "$rotd" import prom-remote-write --username writer-a
  "$rotd" check

  say "starting the agents of h1, h2, h3 (poll = 1s; logs in HOST/agent.log)"
  for h in "${hosts[@]}"; do start_agent "$h"; done
  for h in "${hosts[@]}"; do
    wait_for "$h's first delivery" grep -q "delivered prom-remote-write" "$h/agent.log"
  done
  echo "every host delivered the imported credential (an import has no rotation id: nothing to acknowledge yet)"
  for h in "${hosts[@]}"; do
    wait_for "$h's first samples on the receiver" sending "$h"
  done
  echo "every sender's samples reach the receiver"

  # ROTATIONS and PAUSE (seconds of sending between two rotations) as in the default mode.
  rotations="${ROTATIONS:-3}"
  pause="${PAUSE:-3}"
  for i in $(seq "$rotations"); do
    sleep "$pause"
    say "rotation $i of $rotations, the three agents running"
    rotate
    wait_for "every host's acknowledgement" all_acked
    ack_times
    "$rotd" retire prom-remote-write
  done
  sleep "$pause"

  say "h2's agent stopped; rotation $((rotations + 1))"
  stop_agent h2
  rotate
  wait_for "h1's and h3's acknowledgements" only_lagging h2
  "$rotd" status
  "$rotd" retire prom-remote-write

  say "h2's agent started again"
  local from out old_user
  from=$(wc -l < h2/agent.log)
  start_agent h2
  wait_for "h2 to catch up" all_acked
  echo "h2's agent log since its restart:"
  tail -n +"$((from + 1))" h2/agent.log | sed 's/^/  /'
  ack_times
  out=$("$rotd" retire prom-remote-write)
  echo "$out"
  old_user=$(sed -n 's/.*: retired user=\([^ ]*\).*/\1/p' <<<"$out")
  echo "the old credential ($old_user, as h2's password file still holds it) on the receiver now: HTTP $(curl -s -o /dev/null -w '%{http_code}' \
    -u "$old_user:$(cat "h2/prom/$old_user.password")" "http://127.0.0.1:$recv_port/api/v1/status/buildinfo")"
  "$rotd" status
  echo
  "$rotd" history prom-remote-write
  sleep "$pause"

  say "summary"
  local bad=0 got no
  for h in "${hosts[@]}"; do
    got=$(received "$h")
    no=$(refused "$h")
    echo "$h: $got stored by the receiver; $no writes refused; $((rotations + 1)) rotations"
    [ "$no" = "0" ] || bad=1
  done
  return "$bad"
}

"$mode"
