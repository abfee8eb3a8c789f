#!/usr/bin/env bash
# The main job, for real, on one machine: a Prometheus remote-write receiver with
# basic auth, an agent-mode Prometheus remote-writing to it with a password_file, and
# rotd rotating the agent's write credential twice while it sends. Everything runs on
# loopback in a temp directory and is stopped at the end.
set -euo pipefail

need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v age >/dev/null || need+=(age)
command -v git >/dev/null || need+=(git)
command -v curl >/dev/null || need+=(curl)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from the distribution's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --manifest-path "$here/Cargo.toml" -q
rotd="${CARGO_TARGET_DIR:-$here/target}/release/rotd"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
recv_port=$(port); agent_port=$(port)
cd "$work"
mkdir -p keys schedules agent receiver agent-data
reader_pw=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
writer_pw=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
hash() { htpasswd -nbBC 10 x "$1" | cut -d: -f2-; }
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

cat > agent.yml.tmpl <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: agent
    static_configs:
      - targets: ['127.0.0.1:$agent_port']
remote_write:
  - url: http://127.0.0.1:$recv_port/api/v1/write
    basic_auth:
      username: {{username}}
      password_file: $work/agent/{{username}}.password
    queue_config:
      batch_send_deadline: 1s
YML
sed 's/{{username}}/writer-a/g' agent.yml.tmpl > agent/prometheus.yml
printf '%s' "$writer_pw" > agent/writer-a.password
prometheus --enable-feature=agent --config.file=agent/prometheus.yml --storage.agent.path=agent-data \
  --web.listen-address=127.0.0.1:$agent_port --web.enable-lifecycle >agent-data/log 2>&1 &
pids+=($!)
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
failed=$(curl -s "http://127.0.0.1:$agent_port/metrics" | awk '/^prometheus_remote_storage_samples_failed_total/ {s+=$2} END {print s+0}')
sent=$(curl -s "http://127.0.0.1:$agent_port/metrics" | awk '/^prometheus_remote_storage_samples_total/ {s+=$2} END {print s+0}')
echo
echo "agent: $sent samples sent, $failed refused during $rotations rotations"
[ "$failed" = "0" ]
