#!/usr/bin/env bash
# test_check_config: bw-worker --check-config accepts the sample and names FILE:LINE: key for a broken file.
set -uo pipefail
worker=$1
root=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
. "$root/scripts/lib.sh"

# ok NAME FILE [ARGS...]: accepted without a word; refused NAME EXPECTED FILE [ARGS...]: exit
# non-zero with exactly EXPECTED; warned NAME EXPECTED FILE [ARGS...]: "configuration OK" on
# stdout, exit 0, exactly EXPECTED on stderr.
ok() {
	local name=$1 file=$2
	shift 2
	local out rc
	out=$("$worker" --check-config --config "$file" "$@" 2>&1)
	rc=$?
	check "$name: accepted (exit $rc)" [ $rc -eq 0 ]
	check "$name: nothing but OK" [ "$out" = "configuration OK" ]
	[ "$out" = "configuration OK" ] || printf 'got:\n%s\n' "$out"
}
refused() {
	local name=$1 want=$2 file=$3
	shift 3
	local out rc
	out=$("$worker" --check-config --config "$file" "$@" 2>&1)
	rc=$?
	check "$name: refused (exit $rc)" [ $rc -ne 0 ]
	check "$name: names FILE:LINE: key: reason" [ "$out" = "$want" ]
	[ "$out" = "$want" ] || printf 'got:\n%s\nwant:\n%s\n' "$out" "$want"
}
warned() {
	local name=$1 want=$2 file=$3
	shift 3
	local out err rc
	out=$("$worker" --check-config --config "$file" "$@" 2>"$tmp/stderr")
	rc=$?
	err=$(cat "$tmp/stderr")
	check "$name: accepted (exit $rc)" [ $rc -eq 0 ]
	check "$name: OK on stdout" [ "$out" = "configuration OK" ]
	check "$name: the warning on stderr" [ "$err" = "$want" ]
	[ "$err" = "$want" ] || printf 'got:\n%s\nwant:\n%s\n' "$err" "$want"
}
conf() { # NAME: the file $tmp/NAME.conf from stdin
	cat >"$tmp/$1.conf"
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

# Every password of an amqp.url list, a URL password in sna.url and the token, all masked;
# typos in --set and in the file never echo a value. The secret appears 0 times anywhere.
secret=Xy7-bw-cli-secret
no_secret() { ! grep -q "$secret" <<<"$1"; }
out=$("$worker" --print-config --config "$root/deploy/bw-worker.conf" \
	--set "amqp.url=amqps://bw:${secret}1@mq1.example:5671,amqps://bw:${secret}2@mq2.example:5671" \
	--set "sna.url=https://api:${secret}3@sna.example:8443" --set "sna.token=${secret}4" 2>&1)
check "print-config: no secret" no_secret "$out"
check "print-config: every node masked" grep -qx "amqp.url = amqps://bw:\*\*\*@mq1.example:5671,amqps://bw:\*\*\*@mq2.example:5671" <<<"$out"
check "print-config: the SNA URL's password masked" grep -qx "sna.url = https://api:\*\*\*@sna.example:8443" <<<"$out"
out=$("$worker" --check-config --config "$root/deploy/bw-worker.conf" \
	--set "sna.token $secret" --set "sna_token=$secret" --set "sna.tokn=$secret" \
	--set "sna.token=a $secret" --set "amqp.url=amqq://bw:$secret@mq" \
	--set "sna.url=http://api:$secret@sna.example" \
	--set "amqp.url=amqp://bw:$secret@mq.example" 2>&1)
check "typos and refusals: no secret" no_secret "$out"
check "typos and refusals: each named" [ "$(wc -l <<<"$out")" -eq 7 ]
check "a --set without '=' names its first word" grep -qx -- "--set: sna.token: expected section.key=value (the value is not shown)" <<<"$out"
printf '[sna]\ntoken %s\n' "$secret" >"$tmp/typo.conf"
out=$("$worker" --check-config --config "$tmp/typo.conf" 2>&1)
check "a file line without '=' is not echoed" [ "$out" = "$tmp/typo.conf:2: token: expected \"key = value\" (the rest of the line is not shown)" ]
out=$("$worker" --check-config --config "$root/deploy/bw-worker.conf" \
	--set "amqp.url=amqp://bw:$secret@mq.example" 2>&1)
check "a warning about a plain broker: no secret" no_secret "$out"

# Secrets from files: 0600/0400, ours, not a symlink; they win over the inline value.
printf '%s-tok\n' "$secret" >"$tmp/token" && chmod 0600 "$tmp/token"
printf '%s-pw\n' "$secret" >"$tmp/amqp.pw" && chmod 0400 "$tmp/amqp.pw"
ln -s "$tmp/token" "$tmp/token-link"
printf 'x\n' >"$tmp/token-group" && chmod 0640 "$tmp/token-group"
cat >"$tmp/files.conf" <<CONF
[amqp]
url = amqp://bw:inline@127.0.0.1:5672
password_file = $tmp/amqp.pw
[sna]
token_file = $tmp/token
CONF
ok "secret files" "$tmp/files.conf"
out=$("$worker" --print-config --config "$tmp/files.conf" 2>&1)
check "secret files: content never printed" no_secret "$out"
check "secret files: the file's password replaces the inline one" \
	grep -qx "amqp.url = amqp://bw:\*\*\*@127.0.0.1:5672" <<<"$out"
check "secret files: the token is set" grep -qx "sna.token = \*\*\*" <<<"$out"
refused "a secret file that is a symlink (--set)" \
	"--set: sna.token_file: $tmp/token-link: is a symbolic link (refused)" \
	"$tmp/files.conf" --set "sna.token_file=$tmp/token-link"
sed -i "s|^token_file = .*|token_file = $tmp/token-link|" "$tmp/files.conf"
refused "a secret file that is a symlink" \
	"$tmp/files.conf:5: sna.token_file: $tmp/token-link: is a symbolic link (refused)" \
	"$tmp/files.conf"
sed -i "s|^token_file = .*|token_file = $tmp/token-group|" "$tmp/files.conf"
refused "a group-readable secret file" \
	"$tmp/files.conf:5: sna.token_file: $tmp/token-group refused: mode 0640 owner $(id -u) (must be 0600 or 0400, owned by uid $(id -u))" \
	"$tmp/files.conf"
sed -i "s|^token_file = .*|token_file = $tmp/no-such-token|" "$tmp/files.conf"
refused "a missing secret file" \
	"$tmp/files.conf:5: sna.token_file: $tmp/no-such-token: No such file or directory" \
	"$tmp/files.conf"


# ---- what would expose a backup or a password is refused; unwise broker links are warned about.
nbd_why="serves every backup as plain NBD that anyone who reaches the port can read and overwrite; use auto or psk, or set nbd.allow_plaintext = true if you mean it"
conf nbd-plain <<'CONF'
[nbd]
bind_address = 10.1.2.3
tls = off
CONF
refused "nbd.tls off on a real network" \
	"$tmp/nbd-plain.conf:3: nbd.tls: off with the non-loopback nbd.bind_address 10.1.2.3 ($tmp/nbd-plain.conf:2) $nbd_why" \
	"$tmp/nbd-plain.conf"
refused "nbd.tls off on every address" \
	"$tmp/nbd-plain.conf:3: nbd.tls: off with the non-loopback nbd.bind_address 0.0.0.0 (--set) $nbd_why" \
	"$tmp/nbd-plain.conf" --set nbd.bind_address=0.0.0.0
out=$(BW_NBD_BIND_ADDRESS=:: "$worker" --check-config --config "$tmp/nbd-plain.conf" 2>&1)
check "nbd.tls off on every IPv6 address, bind from the environment: named" \
	[ "$out" = "$tmp/nbd-plain.conf:3: nbd.tls: off with the non-loopback nbd.bind_address :: (BW_NBD_BIND_ADDRESS) $nbd_why" ]
out=$(BW_NBD_TLS=off "$worker" --check-config --config "$root/deploy/bw-worker.conf" \
	--set nbd.bind_address=192.0.2.1 2>&1)
check "nbd.tls off from the environment: named by its variable" \
	[ "$out" = "BW_NBD_TLS: nbd.tls: off with the non-loopback nbd.bind_address 192.0.2.1 (--set) $nbd_why" ]
ok "nbd.tls off on a real network, meant" "$tmp/nbd-plain.conf" --set nbd.allow_plaintext=true
ok "nbd.tls auto on a real network (psk)" "$tmp/nbd-plain.conf" --set nbd.tls=auto
ok "nbd.tls psk on a real network" "$tmp/nbd-plain.conf" --set nbd.tls=psk
for bind in 127.0.0.1 127.0.0.53 ::1 ::ffff:127.0.0.1; do
	ok "nbd.tls off on loopback $bind" "$tmp/nbd-plain.conf" --set "nbd.bind_address=$bind"
done

sna_why="sends the vCenter password and the NBD key in clear text; use https://, or set sna.allow_plaintext = true if you mean it"
conf sna-plain <<'CONF'
[sna]
token = t
url = http://sna.example:8081
CONF
refused "http:// to a remote SNA" \
	"$tmp/sna-plain.conf:3: sna.url: http:// to the non-loopback host sna.example $sna_why" \
	"$tmp/sna-plain.conf"
refused "http:// to a remote SNA by address" \
	"--set: sna.url: http:// to the non-loopback host 10.0.0.9 $sna_why" \
	"$tmp/sna-plain.conf" --set sna.url=http://10.0.0.9:8081/api
refused "http:// to a remote IPv6 SNA" \
	"--set: sna.url: http:// to the non-loopback host [2001:db8::1] $sna_why" \
	"$tmp/sna-plain.conf" --set "sna.url=http://[2001:db8::1]:8081"
refused "http:// with a user part names the host only" \
	"--set: sna.url: http:// to the non-loopback host 127.0.0.1.example $sna_why" \
	"$tmp/sna-plain.conf" --set sna.url=http://127.0.0.1:x@127.0.0.1.example
ok "http:// to a remote SNA, meant" "$tmp/sna-plain.conf" --set sna.allow_plaintext=true
refused "http:// to a remote SNA, meant, but the NBD key would travel in it" \
	"$tmp/sna-plain.conf:3: sna.url: http:// to the non-loopback host sna.example cannot carry the NBD key of nbd.tls (--set): sna.allow_plaintext covers the password, never the key; use https://, or nbd.tls = off with nbd.allow_plaintext" \
	"$tmp/sna-plain.conf" --set sna.allow_plaintext=true --set nbd.tls=psk
for url in https://sna.example:8443 https://10.0.0.9 http://127.0.0.1:8081 "http://[::1]:8081" \
	http://localhost:8081 http://LOCALHOST/api http://127.0.0.2; do
	ok "sna.url $url" "$tmp/sna-plain.conf" --set "sna.url=$url"
done

conf sna-cert <<'CONF'
[sna]
url = https://sna.example
tls_cert_file = /etc/bw-worker/client.pem
CONF
refused "sna.tls_cert_file without its key" \
	"$tmp/sna-cert.conf:3: sna.tls_cert_file: needs sna.tls_key_file (a client certificate and its key go together)" \
	"$tmp/sna-cert.conf"
refused "sna.tls_key_file without its certificate" \
	"--set: sna.tls_key_file: needs sna.tls_cert_file (a client certificate and its key go together)" \
	"$tmp/sna-cert.conf" --set sna.tls_cert_file= --set sna.tls_key_file=/etc/bw-worker/client.key
ok "sna client certificate with its key" "$tmp/sna-cert.conf" --set sna.tls_key_file=/etc/bw-worker/client.key

conf amqps-noverify <<'CONF'
[amqp]
url = amqps://bw:pw@mq.example:5671
tls_verify_peer = false
tls_verify_hostname = true
CONF
warned "amqps without verifying the peer" \
	"$tmp/amqps-noverify.conf:3: amqp.tls_verify_peer: warning: false: the broker's certificate is not verified, so anyone on the path can pose as the broker and read the password and every message" \
	"$tmp/amqps-noverify.conf"
warned "amqps without verifying the host name" \
	"--set: amqp.tls_verify_hostname: warning: false: any certificate the CA signed, for any host, is taken for the broker's" \
	"$tmp/amqps-noverify.conf" --set amqp.tls_verify_peer=true --set amqp.tls_verify_hostname=false
ok "amqps verified" "$tmp/amqps-noverify.conf" --set amqp.tls_verify_peer=yes
ok "amqp:// on loopback: verification is moot" "$tmp/amqps-noverify.conf" \
	--set amqp.url=amqp://bw:pw@localhost:5672
amqp_why="sends the broker password and every message in clear text; use amqps://"
warned "amqp:// to a remote broker" \
	"--set: amqp.url: warning: amqp:// to the non-loopback broker mq.example $amqp_why" \
	"$tmp/amqps-noverify.conf" --set amqp.url=amqp://bw:pw@mq.example:5672 --set amqp.tls_verify_peer=1
warned "every node of a list is checked" \
	"--set: amqp.url: warning: node 3: amqp:// to the non-loopback broker 10.0.0.3 $amqp_why" \
	"$tmp/amqps-noverify.conf" --set amqp.tls_verify_peer=1 \
	--set "amqp.url=amqps://bw:pw@mq1.example:5671,amqp://bw:pw@127.0.0.1:5672,amqp://bw:pw@10.0.0.3:5672"
refused "a broken node of a list is an error" \
	"--set: amqp.url: must start with amqp:// or amqps://" \
	"$tmp/amqps-noverify.conf" --set amqp.tls_verify_peer=1 \
	--set "amqp.url=amqps://bw:pw@mq1.example:5671,http://mq2.example"
# Errors and warnings together when the file is broken.
refused "warnings come after the errors" \
	"--set: nbd.port_max: must not be below nbd.port_min (10100)
$tmp/amqps-noverify.conf:3: amqp.tls_verify_peer: warning: false: the broker's certificate is not verified, so anyone on the path can pose as the broker and read the password and every message" \
	"$tmp/amqps-noverify.conf" --set nbd.port_max=100

check_summary
