#!/usr/bin/env bash
# test_worker_secrets: a running bw-worker is not dumpable, has no core limit, and logs neither a password nor a token.
# Runs the worker as an unprivileged user (nobody): only then does /proc show that it is not
# dumpable (its /proc/PID files then belong to root). The broker is a closed loopback port:
# the worker starts, logs its configuration and keeps retrying, which is all this needs.
set -uo pipefail
worker=$1
secret=Qv4-worker-log-secret
uid=65534
tmp=$(mktemp -d)
pid=
trap stop_pid_remove_tmp EXIT
. "$(dirname "$0")/../../scripts/lib.sh"
if ! command -v setpriv >/dev/null || [ "$(id -u)" -ne 0 ]; then
	echo "needs root and setpriv (util-linux): skipped"
	exit 77
fi

chmod 0755 "$tmp"
mkdir "$tmp/state"
printf '%s-tok\n' "$secret" >"$tmp/token"
chmod 0600 "$tmp/token"
chown "$uid:$uid" "$tmp/state" "$tmp/token"
cat >"$tmp/bw.conf" <<CONF
[amqp]
url = amqps://bw:${secret}-pw@127.0.0.1:1
tls_verify_peer = false
[worker]
id = secrets-test
state_dir = $tmp/state
[sna]
url = https://api:${secret}-url@127.0.0.1:9
token_file = $tmp/token
CONF
chmod 0644 "$tmp/bw.conf"

BW_SNA_TOKEN=${secret}-env setpriv --reuid=$uid --regid=$uid --clear-groups \
	"$worker" --config "$tmp/bw.conf" 2>"$tmp/log" &
pid=$!
for _ in $(seq 100); do
	grep -q "worker secrets-test up" "$tmp/log" && break
	sleep 0.1
done
check "the worker started" grep -q "worker secrets-test up" "$tmp/log"
check "it runs as uid $uid" grep -Eq "^Uid:\s+$uid\s" "/proc/$pid/status"
check "not dumpable: its /proc files belong to root" [ "$(stat -c %u "/proc/$pid/status")" = 0 ]
check "core file size limit 0" grep -Eq "^Max core file size\s+0\s+0\s" "/proc/$pid/limits"
check "the start-up log shows the config" grep -q "config: sna.token = \*\*\*" "$tmp/log"
check "the start-up log masks the broker password" grep -q "config: amqp.url = amqps://bw:\*\*\*@127.0.0.1:1" "$tmp/log"
check "the start-up log masks the SNA URL password" grep -q "config: sna.url = https://api:\*\*\*@127.0.0.1:9" "$tmp/log"
check "the warning is logged at start" grep -q "config: $tmp/bw.conf:3: amqp.tls_verify_peer: warning: false" "$tmp/log"
check "no secret in the log" bash -c "! grep -q '$secret' '$tmp/log'"
kill "$pid"
wait "$pid"
pid=
check "no secret in the log after the stop" bash -c "! grep -q '$secret' '$tmp/log'"
[ $fail -eq 0 ] || cat "$tmp/log"
check_summary
