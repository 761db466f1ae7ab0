#!/usr/bin/env bash
# test_ctl_ledger: bw-ctl jobs|ports|workers|show read a real ledger, as tables and as JSON.
set -uo pipefail
ctl=$1
fixture=$2
tmp=$(mktemp -d)
fifo=$tmp/hold
pid=
trap stop_pid_remove_tmp EXIT
. "$(dirname "$0")/../../scripts/lib.sh"
py() { /usr/bin/python3 -c "$@"; }

# No worker has run here: the state directory does not even exist. The lists are empty
# (exit 0), show finds nothing (exit 1), and neither the ledger nor its directory appears.
printf '[worker]\nstate_dir = %s/state\n' "$tmp" >"$tmp/none.conf"
for cmd in jobs ports workers; do
	out=$("$ctl" --config "$tmp/none.conf" $cmd 2>"$tmp/err")
	check "no ledger: $cmd exit 0" [ $? -eq 0 ]
	check "no ledger: $cmd says no worker has run here" grep -q "no worker has run on this host" <<<"$out"
	out=$("$ctl" --config "$tmp/none.conf" $cmd --json 2>"$tmp/err")
	check "no ledger: $cmd --json exit 0" [ $? -eq 0 ]
	check "no ledger: $cmd --json is []" [ "$out" = "[]" ]
done
"$ctl" --config "$tmp/none.conf" show bk-1 >/dev/null 2>"$tmp/err"
check "no ledger: show exit 1" [ $? -eq 1 ]
check "no ledger: show says not found" grep -q 'no job "bk-1"' "$tmp/err"
for cmd in "verify bk-1" "retry bk-1" reap; do
	"$ctl" --config "$tmp/none.conf" $cmd >/dev/null 2>&1
	check "no ledger: $cmd exit 1" [ $? -eq 1 ]
done
check "no ledger: neither the ledger nor its directory created" [ ! -e "$tmp/state" ]

printf '[worker]\nstate_dir = %s\n' "$tmp" >"$tmp/bw.conf"

mkfifo "$fifo"
"$fixture" "$tmp/ledger.db" "$tmp" <"$fifo" >"$tmp/fixture.out" &
pid=$!
exec 3>"$fifo"
for _ in $(seq 100); do grep -q ready "$tmp/fixture.out" 2>/dev/null && break; sleep 0.05; done
check "fixture ready" grep -q "ready 10100 10101" "$tmp/fixture.out"

out=$("$ctl" --config "$tmp/bw.conf" ports --json)
check "ports --json: the contract's shape" py '
import json, sys
p = json.loads(sys.argv[1])
assert p == [
  {"port": 10100, "state": "reserved", "job_id": "bk-1", "disk_key": 2000, "owner": "fixture-w1", "until": None},
  {"port": 10101, "state": "reserved", "job_id": "bk-1", "disk_key": 16000, "owner": "fixture-w1", "until": None}], p
' "$out"
out=$("$ctl" --config "$tmp/bw.conf" ports)
check "ports table" bash -c 'grep -q "^PORT " <<<"$1" && grep -Eq "^10101 +reserved +bk-1 +16000 +fixture-w1 +-$" <<<"$1"' _ "$out"
out=$("$ctl" --config "$tmp/bw.conf" workers --json)
check "workers: alive while the lock is held" py '
import json, sys
w = json.loads(sys.argv[1])
assert len(w) == 1 and w[0]["worker_id"] == "fixture-w1" and w[0]["alive"] is True, w
' "$out"
out=$("$ctl" --config "$tmp/bw.conf" jobs --json)
check "jobs --json" py '
import json, sys
j = json.loads(sys.argv[1])
assert [(x["job_id"], x["state"], x["disk_count"]) for x in j] == [("bk-1", "reserved", 2)], j
' "$out"
out=$("$ctl" --config "$tmp/bw.conf" show bk-1)
check "show: each state with its time" bash -c 'grep -Eq "^20[0-9-]+T[0-9:.]+Z +claimed +fixture-w1 +1$" <<<"$1" && grep -Eq "reserved +fixture-w1 +1$" <<<"$1"' _ "$out"
check "show: disks with ports" bash -c 'grep -Eq "^16000 +pending +10101 " <<<"$1"' _ "$out"
check "show: events" bash -c 'grep -Eq "^1 +backup.accepted " <<<"$1"' _ "$out"
"$ctl" --config "$tmp/bw.conf" show nope >/dev/null 2>&1
check "show unknown job: exit 1" [ $? -eq 1 ]
"$ctl" --config "$tmp/bw.conf" show >/dev/null 2>&1
check "show without JOB: exit 2" [ $? -eq 2 ]

exec 3>&-
wait "$pid"
pid=
out=$("$ctl" --config "$tmp/bw.conf" workers --json)
check "workers: dead once the process is gone" py '
import json, sys
w = json.loads(sys.argv[1])
assert len(w) == 1 and w[0]["alive"] is False, w
' "$out"

check_summary
