#!/usr/bin/env bash
# test_ctl_commands: bw-ctl retry, verify and reap against a ledger made with the ledger API, and
# the answers every command gives before it needs a broker (usage, invalid input, no broker).
set -uo pipefail
ctl=$1
fixture=$2
root=$3
tmp=$(mktemp -d)
fifo=$tmp/hold
pid=
trap stop_pid_remove_tmp EXIT
. "$root/scripts/lib.sh"

mkdir -p "$tmp/repo" "$tmp/creds"
printf '{"vcenter_host":"v","username":"u","password":"p"}' >"$tmp/creds/c.json"
chmod 600 "$tmp/creds/c.json"
# a broker nobody listens on: whatever needs it must end 2, quickly
cat >"$tmp/bw.conf" <<CONF
[amqp]
url = amqp://guest:guest@127.0.0.1:1
[worker]
state_dir = $tmp
[credentials]
dir = $tmp/creds
[repositories]
repo-001 = $tmp/repo
CONF
run() { "$ctl" --config "$tmp/bw.conf" "$@"; }

out=$("$ctl" --help)
check "help: exit codes" grep -q "0 success; 1 a negative answer" <<<"$out"
for cmd in publish events cancel retry "dlq list" "dlq show" "dlq requeue" reap verify; do
	check "help: $cmd" grep -q "^  $cmd" <<<"$out"
done

# ---- before the broker ---------------------------------------------------------------------
cat >"$tmp/good.json" <<'JSON'
{"schema_version":1,"job_id":"bk-9","vm":{"name":"n","path":"/p"},"backup_type":"full",
 "repository_id":"repo-001","credential_id":"c","disks":[{"key":2000,"size_bytes":1048576}]}
JSON
sed 's/"full"/"weekly"/; s/"c"/"nobody"/' "$tmp/good.json" >"$tmp/bad.json"
out=$(run publish "$tmp/bad.json" 2>"$tmp/err")
check "publish invalid: exit 1 without a broker" [ $? -eq 1 ]
check "publish invalid: the violations, as validate prints them" [ "$out" = "$tmp/bad.json: backup_type: enum" ]
out=$(run publish --json "$tmp/bad.json" 2>"$tmp/err")
check "publish invalid --json" /usr/bin/python3 -c '
import json, sys
o = json.loads(sys.argv[1])
assert o["published"] is None and [v["rule"] for v in o["violations"]] == ["enum"], o
' "$out"
sed 's/"full"/"full"/; s/"c"/"nobody"/' "$tmp/good.json" >"$tmp/nocred.json"
out=$(run publish "$tmp/nocred.json" 2>/dev/null)
check "publish: host rules checked (credential)" [ "$out" = "$tmp/nocred.json: credential_id: unknown_credential" ]
run publish "$tmp/good.json" >/dev/null 2>"$tmp/err"
check "publish valid, no broker: exit 2" [ $? -eq 2 ]
check "publish valid, no broker: says why" grep -q "broker" "$tmp/err"
run publish "$tmp/missing.json" >/dev/null 2>&1
check "publish unreadable: exit 2" [ $? -eq 2 ]
run publish >/dev/null 2>&1
check "publish without FILE: exit 2" [ $? -eq 2 ]
run cancel "bad:id" >/dev/null 2>"$tmp/err"
check "cancel invalid job id: exit 2" [ $? -eq 2 ]
check "cancel invalid job id: says why" grep -q "job_id" "$tmp/err"
run cancel bk-1 --reason "$(printf 'a\tb')" >/dev/null 2>&1
check "cancel reason with a control character: exit 2" [ $? -eq 2 ]
run cancel bk-1 >/dev/null 2>&1
check "cancel, no broker: exit 2" [ $? -eq 2 ]
run events --count x >/dev/null 2>&1
check "events --count x: exit 2" [ $? -eq 2 ]
run events --timeout 1 >/dev/null 2>&1
check "events, no broker: exit 2" [ $? -eq 2 ]
run dlq >/dev/null 2>&1
check "dlq without a subcommand: exit 2" [ $? -eq 2 ]
run dlq show 0 >/dev/null 2>&1
check "dlq show 0: exit 2" [ $? -eq 2 ]
run dlq list >/dev/null 2>&1
check "dlq list, no broker: exit 2" [ $? -eq 2 ]
run reap --wait x >/dev/null 2>&1
check "reap --wait x: exit 2" [ $? -eq 2 ]

# ---- a ledger made by the ledger API -------------------------------------------------------
mkfifo "$fifo"
"$fixture" "$tmp/ledger.db" "$tmp" failed <"$fifo" >"$tmp/fixture.out" &
pid=$!
exec 3>"$fifo"
for _ in $(seq 100); do grep -q ready "$tmp/fixture.out" 2>/dev/null && break; sleep 0.05; done
check "fixture ready" grep -q "ready" "$tmp/fixture.out"

run retry nope >/dev/null 2>"$tmp/err"
check "retry unknown: exit 1" [ $? -eq 1 ]
run retry bk-1 >/dev/null 2>"$tmp/err"
check "retry of a running job: exit 1" [ $? -eq 1 ]
check "retry of a running job: not failed" grep -q "bk-1 is reserved, not failed" "$tmp/err"
run retry bk-2 >/dev/null 2>"$tmp/err"
check "retry of a cancelled job: exit 1" [ $? -eq 1 ]
check "retry of a cancelled job: a retry cannot help" grep -q "reason cancelled, which a retry cannot help" "$tmp/err"
run retry bk-3 >/dev/null 2>"$tmp/err"
check "retry with a newer attempt: exit 1" [ $? -eq 1 ]
check "retry with a newer attempt: names it" grep -q "bk-3.r1 (claimed) is a newer attempt of bk-3" "$tmp/err"
run verify bk-1 >/dev/null 2>"$tmp/err"
check "verify of a job not completed: exit 1" [ $? -eq 1 ]
check "verify of a job not completed: says so" grep -q "bk-1 is reserved, not completed" "$tmp/err"
run verify nope >/dev/null 2>&1
check "verify unknown: exit 1" [ $? -eq 1 ]
# the fixture holds its lock but is no bw-worker: reap signals only what the ledger records
# (pid and start time); it is alive, so it gets SIGUSR2 (the fixture ignores nothing: it
# would die) -- so reap is tested on a dead worker only, here, and on a live one in e2e_ctl
exec 3>&-
wait "$pid"
pid=
out=$(run reap --wait 0 2>"$tmp/err")
check "reap, no live worker: exit 1" [ $? -eq 1 ]
check "reap, no live worker: says so" grep -q "no live worker on this host" "$tmp/err"

check_summary
