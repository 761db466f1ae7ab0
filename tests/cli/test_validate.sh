#!/usr/bin/env bash
# test_validate: bw-ctl validate's output format, exit codes (0/1/2, 2 wins) and host rules.
set -uo pipefail
ctl=$1
root=$2
data=$root/tests/data/messages
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
. "$root/scripts/lib.sh"

valid=$(ls "$data"/valid-*.json | head -1)
invalid=$(ls "$data"/invalid-*.json | head -1)

out=$("$ctl" validate "$valid")
check "valid: exit 0" [ $? -eq 0 ]
check "valid: silent" [ -z "$out" ]
out=$("$ctl" validate -v "$valid")
check "valid -v says ok" [ "$out" = "$valid: ok" ]

cat >"$tmp/two-rules.json" <<'JSON'
{"schema_version":1,"job_id":"bk:1","vm":{"name":"n","path":"/p"},"backup_type":"full",
 "repository_id":"repo-001","credential_id":"vc",
 "disks":[{"key":2000,"size_bytes":1000}]}
JSON
out=$("$ctl" validate "$tmp/two-rules.json")
check "invalid: exit 1" [ $? -eq 1 ]
check "invalid: one line per rule" [ "$out" = "$tmp/two-rules.json: job_id: charset
$tmp/two-rules.json: disks[0].size_bytes: multiple_of" ]
out=$("$ctl" validate -v "$tmp/two-rules.json")
check "invalid -v explains" grep -q "disks\[0\].size_bytes: multiple_of: must be a multiple of 512" <<<"$out"

"$ctl" validate "$valid" "$invalid" >/dev/null
check "valid+invalid: exit 1" [ $? -eq 1 ]
"$ctl" validate "$valid" "$invalid" "$tmp/nope.json" >/dev/null 2>&1
check "I/O error wins: exit 2" [ $? -eq 2 ]
"$ctl" validate >/dev/null 2>&1
check "no file: exit 2" [ $? -eq 2 ]
"$ctl" frobnicate >/dev/null 2>&1
check "unknown command: exit 2" [ $? -eq 2 ]
"$ctl" validate - <"$valid"
check "stdin" [ $? -eq 0 ]

# Host rules only with --config.
mkdir -p "$tmp/repo/vm" "$tmp/creds"
echo '{}' >"$tmp/creds/vc.json"
chmod 600 "$tmp/creds/vc.json"
cat >"$tmp/bw.conf" <<CONF
[credentials]
dir = $tmp/creds
[repositories]
repo-001 = $tmp/repo
CONF
cat >"$tmp/host.json" <<'JSON'
{"schema_version":1,"job_id":"bk-1","vm":{"name":"n","path":"/p"},"backup_type":"incremental",
 "repository_id":"repo-001","credential_id":"vc",
 "disks":[{"key":2000,"size_bytes":1048576,"parent_path":"vm/base.qcow2","previous_change_id":"c1"}]}
JSON
"$ctl" validate "$tmp/host.json"
check "message rules only without --config" [ $? -eq 0 ]
out=$("$ctl" --config "$tmp/bw.conf" validate "$tmp/host.json")
check "parent missing with --config: exit 1" [ $? -eq 1 ]
check "parent missing named" [ "$out" = "$tmp/host.json: disks[0].parent_path: not_found" ]
qemu-img create -q -f qcow2 "$tmp/repo/vm/base.qcow2" 1M
"$ctl" --config "$tmp/bw.conf" validate "$tmp/host.json"
check "real qcow2 parent accepted" [ $? -eq 0 ]
# the whole backing chain: a backing file outside, a raw one, one without a format
qemu-img create -q -f qcow2 "$tmp/outside.qcow2" 1M
mv "$tmp/repo/vm/base.qcow2" "$tmp/repo/vm/real.qcow2"
qemu-img create -q -f qcow2 -u -b ../../outside.qcow2 -F qcow2 "$tmp/repo/vm/base.qcow2" 1M
out=$("$ctl" --config "$tmp/bw.conf" validate -v "$tmp/host.json")
check "backing file outside: exit 1" [ $? -eq 1 ]
check "backing file outside named" grep -q "^$tmp/host.json: disks\[0\].parent_path: outside_repository: .*outside.qcow2.*leads out" <<<"$out"
qemu-img create -q -f raw "$tmp/repo/vm/raw.img" 1M
qemu-img create -q -f qcow2 -u -b raw.img -F raw "$tmp/repo/vm/base.qcow2" 1M
out=$("$ctl" --config "$tmp/bw.conf" validate "$tmp/host.json")
check "raw backing file named" [ "$out" = "$tmp/host.json: disks[0].parent_path: backing_format_not_qcow2" ]
qemu-img create -q -f qcow2 -b real.qcow2 -F qcow2 "$tmp/repo/vm/base.qcow2" 1M
"$ctl" --config "$tmp/bw.conf" validate "$tmp/host.json"
check "qcow2 chain accepted" [ $? -eq 0 ]
out=$("$ctl" --config "$tmp/bw.conf" --set repositories.repo-001=/nonexistent validate "$tmp/host.json")
check "repository path gone: parent not found" [ "$out" = "$tmp/host.json: disks[0].parent_path: not_found" ]
sed 's/"vc"/"other"/; s/"repo-001"/"repo-009"/' "$tmp/host.json" >"$tmp/host2.json"
out=$("$ctl" --config "$tmp/bw.conf" validate "$tmp/host2.json")
check "unknown repository and credential" [ "$out" = "$tmp/host2.json: repository_id: unknown_repository
$tmp/host2.json: credential_id: unknown_credential" ]
"$ctl" --config "$tmp/missing.conf" validate "$valid" >/dev/null 2>&1
check "unreadable config: exit 2" [ $? -eq 2 ]

check_summary
