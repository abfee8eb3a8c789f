#!/usr/bin/env bash
# Checks a built rotd .deb the way an operator meets it: contents and metadata,
# install on this machine (root), the binary and the shipped config, the systemd
# unit, and an upgrade over an installed version keeping the store and the config.
set -euo pipefail
deb=${1:?usage: check-deb.sh PATH.deb}
fail() { echo "check-deb: $*" >&2; exit 1; }

contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/rotd ./usr/lib/systemd/system/rotd.service ./etc/rotd/rotd.toml \
         ./usr/share/man/man1/rotd.1.gz ./usr/share/man/man5/rotd.toml.5.gz \
         ./usr/share/bash-completion/completions/rotd ./usr/share/zsh/vendor-completions/_rotd \
         ./usr/share/fish/vendor_completions.d/rotd.fish ./usr/lib/sysusers.d/rotd.conf \
         ./usr/lib/tmpfiles.d/rotd.conf ./etc/rotd/schedules/prom-remote-write.toml.example \
         ./usr/lib/systemd/system/rotd-agent.service ./etc/rotd/agent.toml.example; do
  grep -q " $f\$" <<<"$contents" || fail "$f missing from the package"
done
info=$(dpkg-deb -I "$deb")
grep -q "Package: rotd" <<<"$info" || fail "no Package field"
# Not `grep -q` on the pipe: it exits at the first match, tar then dies of SIGPIPE and
# pipefail turns a found conffile into a failure (seen in CI).
ctrl=$(dpkg-deb --ctrl-tarfile "$deb" | tar -t)
grep -q conffiles <<<"$ctrl" || fail "no conffiles"
dpkg-deb -e "$deb" /tmp/rotd-deb-control.$$ && grep -qx /etc/rotd/rotd.toml /tmp/rotd-deb-control.$$/conffiles || fail "rotd.toml is not a conffile"
rm -rf /tmp/rotd-deb-control.$$

DEBIAN_FRONTEND=noninteractive dpkg -i --force-confdef --force-confold "$deb" >/dev/null
rotd --version
getent passwd rotd >/dev/null || fail "no rotd user"
[ "$(stat -c %a /var/lib/rotd)" = 700 ] || fail "/var/lib/rotd is not 0700"
[ -d /var/lib/rotd/store/.git ] || fail "postinst did not create the store"
[ "$(stat -c '%a %U' /etc/rotd/keys/rotd.agekey)" = "600 rotd" ] || fail "identity not 0600 rotd"
runuser -u rotd -- rotd --config /etc/rotd/rotd.toml check
# The shipped agent example is a valid agent configuration (status reads it, fetches nothing).
rotd --config /etc/rotd/agent.toml.example agent status >/dev/null || fail "agent.toml.example is not a valid agent configuration"
if command -v systemd-analyze >/dev/null; then
  for unit in rotd rotd-agent; do
    systemd-analyze verify /usr/lib/systemd/system/$unit.service
    systemd-analyze security --offline=yes /usr/lib/systemd/system/$unit.service | tail -1
  done
fi

# Upgrade (reinstall over itself): store, identity and an edited config are kept.
head_before=$(runuser -u rotd -- git -C /var/lib/rotd/store rev-parse HEAD)
echo "# edited by the operator" >> /etc/rotd/rotd.toml
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$deb" >/dev/null
grep -q "edited by the operator" /etc/rotd/rotd.toml || fail "upgrade replaced the edited config"
[ "$(runuser -u rotd -- git -C /var/lib/rotd/store rev-parse HEAD)" = "$head_before" ] || fail "upgrade changed the store"
echo "check-deb: ok"
