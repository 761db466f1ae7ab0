#!/usr/bin/env bash
# test_tls: amqps:// to a private broker with a TLS listener: the right CA connects; a wrong CA
# or a wrong host name is refused; turning verification off is possible (and documented).
set -uo pipefail
probe=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d /tmp/bw-tls.XXXXXX)
broker=$tmp/broker
cleanup() {
	"$root/scripts/broker" stop "$broker" >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT
pass=0 fail=0
check() {
	local name=$1
	shift
	if "$@"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $name"; fi
}

# A CA, a server certificate for "localhost" only, and an unrelated CA.
mkdir -p "$broker/tls" "$tmp/other"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bw-test-ca \
	-keyout "$tmp/ca.key" -out "$broker/tls/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
	-keyout "$broker/tls/server.key" -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >"$tmp/san.ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$broker/tls/ca.pem" -CAkey "$tmp/ca.key" \
	-CAcreateserial -days 2 -extfile "$tmp/san.ext" -out "$broker/tls/server.pem" 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other-ca \
	-keyout "$tmp/other/ca.key" -out "$tmp/other/ca.pem" 2>/dev/null
chmod 644 "$broker/tls/"*

port=
for _ in $(seq 20); do
	p=$((11000 + RANDOM % 700))
	ss -Hltn "sport = :$p" | grep -q . || ss -Hltn "sport = :$((p + 19000))" | grep -q . || { port=$p; break; }
done
"$root/scripts/broker" start "$broker" "$port" >/dev/null || exit 1
. "$broker/ports"
check "broker has a TLS port" [ -n "${TLS_PORT:-}" ]

out=$("$probe" "amqps://guest:guest@localhost:$TLS_PORT" "$broker/tls/ca.pem")
check "right CA connects ($out)" [ "$out" = connected ]
out=$("$probe" "amqps://guest:guest@localhost:$TLS_PORT" "$tmp/other/ca.pem")
check "wrong CA refused ($out)" bash -c 'grep -q "^refused (BW_ECONFIG)" <<<"$1"' _ "$out"
out=$("$probe" "amqps://guest:guest@127.0.0.1:$TLS_PORT" "$broker/tls/ca.pem")
check "wrong host name refused ($out)" bash -c 'grep -q "^refused (BW_ECONFIG)" <<<"$1"' _ "$out"
out=$("$probe" "amqps://guest:guest@127.0.0.1:$TLS_PORT" "$tmp/other/ca.pem" no-verify)
check "verification off connects ($out)" [ "$out" = connected ]
out=$("$probe" "amqp://guest:guest@localhost:$TLS_PORT" "$broker/tls/ca.pem")
check "plain AMQP to the TLS port refused ($out)" bash -c 'grep -q "^refused" <<<"$1"' _ "$out"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
