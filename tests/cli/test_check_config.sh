#!/usr/bin/env bash
# test_check_config: bw-worker --check-config accepts the sample and names FILE:LINE: key for a broken file.
set -uo pipefail
worker=$1
root=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
check() { # name, condition...
	local name=$1
	shift
	if "$@"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $name"; fi
}

out=$("$worker" --check-config --config "$root/deploy/bw-worker.conf" 2>&1)
rc=$?
check "sample accepted (exit $rc)" [ $rc -eq 0 ]
check "sample prints configuration OK" [ "$out" = "configuration OK" ]

cat >"$tmp/broken.conf" <<'CONF'
[amqp]
url = amqp://guest:guest@127.0.0.1:5672

[nbd]
port_min = 10100
port_max = 99999
bind_address = 0.0.0.0.0

[sna]
timeout_s = soon
CONF
out=$("$worker" --check-config --config "$tmp/broken.conf" 2>&1)
rc=$?
check "broken rejected (exit $rc)" [ $rc -ne 0 ]
expected="$tmp/broken.conf:6: nbd.port_max: out of range (allowed 1-65535)
$tmp/broken.conf:7: nbd.bind_address: must be a numeric IPv4 or IPv6 address
$tmp/broken.conf:10: sna.timeout_s: not an integer: \"soon\""
check "broken lists each problem with its line" [ "$out" = "$expected" ]
[ "$out" = "$expected" ] || printf 'got:\n%s\nwant:\n%s\n' "$out" "$expected"
case "$out" in *"configuration OK"*) check "no OK on failure" false ;; esac

# Environment, then --set, override the file; a broken value stays broken even when overridden.
out=$(BW_NBD_PORT_MAX=10200 "$worker" --check-config --config "$tmp/broken.conf" \
	--set nbd.bind_address=127.0.0.1 --set sna.timeout_s=30 2>&1)
check "overriding does not hide a broken file" [ "$out" = "$expected" ]
out=$(BW_NBD_SHARED=3 BW_SNA_TIMEOUT_S=40 "$worker" --print-config \
	--config "$root/deploy/bw-worker.conf" --set sna.timeout_s=50 2>&1)
check "env over file" grep -qx "nbd.shared = 3" <<<"$out"
check "--set over env" grep -qx "sna.timeout_s = 50" <<<"$out"
out=$(BW_SNA_LOST_AFTER=0 "$worker" --check-config --config "$root/deploy/bw-worker.conf" 2>&1)
check "env errors name the variable" [ "$out" = "BW_SNA_LOST_AFTER: sna.lost_after: out of range (allowed 1-1000)" ]

out=$("$worker" --check-config --config "$tmp/missing.conf" 2>&1)
rc=$?
check "missing file rejected" [ $rc -ne 0 ]
check "missing file named" [ "$out" = "$tmp/missing.conf: cannot open: No such file or directory" ]

# The effective config masks secrets.
out=$("$worker" --print-config --config "$root/deploy/bw-worker.conf" --set sna.token=t0ps3cret 2>&1)
check "print-config masks the token" bash -c "! grep -q t0ps3cret <<<\"\$1\" && grep -q 'sna.token = \*\*\*' <<<\"\$1\"" _ "$out"
check "print-config masks the AMQP password" bash -c "grep -q 'amqp.url = amqp://guest:\*\*\*@127.0.0.1:5672' <<<\"\$1\"" _ "$out"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
