#!/usr/bin/env bash
# test_tls: amqps:// to a private broker with a TLS listener: the right CA connects; a wrong CA
# or a wrong host name is refused; turning verification off is possible (and documented).
# Without amqp.tls_ca_file the broker is verified against OpenSSL's default trust store, which
# SSL_CERT_FILE / SSL_CERT_DIR redirect (the documented way to trust a private CA without
# touching the machine's store): the test CA is trusted only through them.
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
. "$root/scripts/lib.sh"

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
# No tls_ca_file: the system's CAs. The machine's own store never holds this run's CA, so the
# default store alone refuses; SSL_CERT_FILE or SSL_CERT_DIR naming the CA is trusted.
mkdir -p "$tmp/empty" "$tmp/hashed"
cp "$broker/tls/ca.pem" "$tmp/hashed/bw-test-ca.pem"
openssl rehash "$tmp/hashed" 2>/dev/null
check "hashed CA directory made" bash -c 'ls "$1"/*.0 >/dev/null 2>&1' _ "$tmp/hashed"
sys() { env -u SSL_CERT_FILE -u SSL_CERT_DIR "$@"; }
url="amqps://guest:guest@localhost:$TLS_PORT"
out=$(sys "$probe" "$url" "")
check "no CA file, the machine's store refuses the test CA ($out)" \
	bash -c 'grep -q "^refused (BW_ECONFIG).*verified against the system.s CAs" <<<"$1"' _ "$out"
out=$(sys SSL_CERT_FILE="$broker/tls/ca.pem" SSL_CERT_DIR="$tmp/empty" "$probe" "$url" "")
check "no CA file, SSL_CERT_FILE = the CA connects ($out)" [ "$out" = connected ]
out=$(sys SSL_CERT_FILE="$tmp/other/ca.pem" SSL_CERT_DIR="$tmp/empty" "$probe" "$url" "")
check "no CA file, SSL_CERT_FILE = an unrelated CA refused ($out)" \
	bash -c 'grep -q "^refused (BW_ECONFIG).*SSL_CERT_FILE=$2" <<<"$1"' _ "$out" "$tmp/other/ca.pem"
out=$(sys SSL_CERT_FILE="$tmp/other/ca.pem" SSL_CERT_DIR="$tmp/hashed" "$probe" "$url" "")
check "no CA file, SSL_CERT_DIR holding the CA connects ($out)" [ "$out" = connected ]
out=$(sys SSL_CERT_FILE="$broker/tls/ca.pem" SSL_CERT_DIR="$tmp/empty" \
	"$probe" "amqps://guest:guest@127.0.0.1:$TLS_PORT" "")
check "no CA file, wrong host name refused ($out)" \
	bash -c 'grep -q "^refused (BW_ECONFIG)" <<<"$1"' _ "$out"
out=$(sys "$probe" "amqps://guest:guest@127.0.0.1:$TLS_PORT" "" no-verify)
check "no CA file, verification off connects ($out)" [ "$out" = connected ]

out=$("$probe" "amqp://guest:guest@localhost:$TLS_PORT" "$broker/tls/ca.pem")
check "plain AMQP to the TLS port refused ($out)" bash -c 'grep -q "^refused" <<<"$1"' _ "$out"

check_summary
