#!/usr/bin/env bash
# test_systemd_units.sh BW_WORKER SOURCE_DIR: the units of deploy/ pass systemd-analyze verify
# without a word (any warning fails: an unknown key is only a warning there), with ExecStart
# pointed at the built binary; sysusers.d and tmpfiles.d applied to a scratch root create
# the user and the directories with the owners and modes they name. Exit 77 (skipped) without
# systemd-analyze.
set -uo pipefail
worker=$(realpath "$1")
src=$(realpath "$2")
command -v systemd-analyze >/dev/null || { echo "skipped: no systemd-analyze"; exit 77; }
tmp=$(mktemp -d /tmp/bw-units.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail=0

cp "$src"/deploy/*.service "$tmp"/
sed -i "s|/usr/local/bin/bw-worker|$worker|" "$tmp/bw-worker@.service"
grep -q "ExecStart=$worker " "$tmp/bw-worker@.service" || { echo "FAIL: ExecStart not substituted"; exit 1; }
ln -s bw-worker@.service "$tmp/bw-worker@1.service"
out=$(cd "$tmp" && systemd-analyze verify --man=no ./bw-worker@1.service ./bw-nbd.service 2>&1)
rc=$?
if [ $rc -ne 0 ] || [ -n "$out" ]; then
	echo "FAIL: systemd-analyze verify (rc $rc):"
	echo "$out"
	fail=1
else
	echo "ok   systemd-analyze verify bw-worker@1.service bw-nbd.service: clean"
fi

# what the template promises, read back from the unit systemd parsed
want_keys="Type=notify NotifyAccess=main WatchdogSec=60 TimeoutStopSec=90 User=bw-worker
	NoNewPrivileges=yes ProtectSystem=strict PrivateTmp=yes LimitCORE=0 MemoryDenyWriteExecute=yes
	CapabilityBoundingSet= SystemCallFilter=@system-service UMask=0077 LockPersonality=yes"
for kv in $want_keys; do
	grep -qx "$kv" "$src/deploy/bw-worker@.service" || { echo "FAIL: bw-worker@.service lacks $kv"; fail=1; }
done
grep -qx "Delegate=yes" "$src/deploy/bw-nbd.service" || { echo "FAIL: bw-nbd.service not delegated"; fail=1; }
# the worker's own stop bound must fit in systemd's
grace=$(sed -n 's/^shutdown_grace_s = //p' "$src/deploy/bw-worker.conf")
[ -n "$grace" ] && [ "$grace" -lt 90 ] || { echo "FAIL: TimeoutStopSec=90 not above worker.shutdown_grace_s ($grace)"; fail=1; }

if [ "$(id -u)" = 0 ] && command -v systemd-sysusers >/dev/null && command -v systemd-tmpfiles >/dev/null; then
	root="$tmp/root"
	mkdir -p "$root/etc"
	: >"$root/etc/passwd"; : >"$root/etc/group"
	if ! systemd-sysusers --root="$root" "$src/deploy/sysusers.d/bw-worker.conf" 2>&1 ||
		! grep -q '^bw-worker:' "$root/etc/passwd"; then
		echo "FAIL: sysusers.d/bw-worker.conf made no user"
		fail=1
	fi
	out=$(systemd-tmpfiles --root="$root" --create "$src/deploy/tmpfiles.d/bw-worker.conf" 2>&1)
	[ -z "$out" ] || { echo "FAIL: systemd-tmpfiles: $out"; fail=1; }
	uid=$(awk -F: '$1 == "bw-worker" {print $3}' "$root/etc/passwd")
	for want in "var/lib/bw-worker 750 $uid" "var/lib/bw-worker/logs 750 $uid" \
		"etc/bw-worker/credentials 700 $uid" "etc/bw-worker/secrets 700 0"; do
		set -- $want ""
		got=$(stat -c '%a %u' "$root/$1" 2>/dev/null)
		[ "$got" = "$2 $3" ] || { echo "FAIL: $1: '$got' (want '$2 $3')"; fail=1; }
	done
	[ $fail -ne 0 ] || echo "ok   sysusers.d and tmpfiles.d: user bw-worker ($uid), directories and modes"
else
	echo "note: sysusers/tmpfiles not applied (needs root and the tools)"
fi
exit $fail
