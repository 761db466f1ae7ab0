#!/usr/bin/env bash
# tests/broker/test_two_brokers.sh [REPO_ROOT]
#
# Starts two private RabbitMQ brokers (scripts/broker) side by side in two
# temp dirs on two free ports, proves each answers AMQP and only sees its own
# queue, stops both and checks that nothing of either is left behind (no
# process, no listener, no stray epmd on 4369).
# Prints "N passed, M failed"; exits non-zero on any failure.
# KEEP_TMP=1 keeps the temp dirs (for debugging).
set -euo pipefail

ROOT=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
BROKER=$ROOT/scripts/broker
[ -x "$BROKER" ] || { echo "test_two_brokers: $BROKER not found/executable" >&2; exit 2; }
for tool in amqp-declare-queue amqp-publish amqp-get ss pgrep; do
    command -v "$tool" >/dev/null || { echo "test_two_brokers: missing tool $tool" >&2; exit 2; }
done

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $*"; }
# check DESCRIPTION CMD...: run CMD, count a pass if it succeeds.
check() {
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

# A process that is neither gone nor a zombie.
proc_alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

# pick_port [EXCLUDE]: a port P in 25672..26671 with P, P+20000 and P+21000
# (AMQP, distribution, epmd) free.  Two such ports never collide with each
# other's derived ports (they differ by less than 1000).
pick_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((11000 + RANDOM % 700))   # derived ports stay below the ephemeral range
        [ "$p" != "${1:-}" ] || continue
        listening "$p" || listening $((p + 20000)) || listening $((p + 21000)) || {
            echo "$p"
            return 0
        }
    done
    echo "test_two_brokers: no free port found" >&2
    return 1
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs_since() { local d=$(($(now_ms) - $1)); printf '%d.%01d' $((d / 1000)) $((d % 1000 / 100)); }

# recorded PIDs of a broker dir (server wrapper, beam, epmd)
recorded_pids() {
    local f pid _
    for f in server beam epmd; do
        [ -s "$1/run/$f.pid" ] || continue
        read -r pid _ <"$1/run/$f.pid" && echo "$pid"
    done
}

# Every live process whose command line or environment mentions PATTERN.
procs_mentioning() {
    local pattern=$1 d pid
    pgrep -af -- "$pattern" || true
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [ "$pid" != $$ ] && [ "$pid" != "$BASHPID" ] || continue
        if tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qE -- "$pattern"; then
            proc_alive "$pid" && echo "$pid (environ) $(tr '\0' ' ' 2>/dev/null <"$d/cmdline")"
        fi
    done
    return 0
}

# ----------------------------------------------------------------- set up --

TMPROOT=$(mktemp -d "${TMPDIR:-/tmp}/bw-broker-test.XXXXXX")
DIR_A=$TMPROOT/a
DIR_B=$TMPROOT/b
PORT_A=$(pick_port)
PORT_B=$(pick_port "$PORT_A")
ALL_PIDS=()
START_PIDS=()

EPMD4369_BEFORE=$(ss -Hltnp 'sport = :4369' 2>/dev/null | sort || true)
EPMD_DAEMONS_BEFORE=$(pgrep -f 'epmd.*-daemon' | sort || true)

cleanup() {
    local rc=$? d pid
    trap - EXIT INT TERM HUP
    # Interrupted while starting: a "broker start" that gets SIGTERM stops
    # what it has started itself.
    for pid in ${START_PIDS[@]+"${START_PIDS[@]}"}; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in ${START_PIDS[@]+"${START_PIDS[@]}"}; do
        wait "$pid" 2>/dev/null || true
    done
    for d in "$DIR_A" "$DIR_B"; do
        [ -d "$d" ] || continue
        "$BROKER" stop "$d" >/dev/null 2>&1 || echo "cleanup: broker stop $d failed" >&2
    done
    # Last resort, only for PIDs the brokers recorded.
    for pid in ${ALL_PIDS[@]+"${ALL_PIDS[@]}"}; do
        if proc_alive "$pid"; then
            echo "cleanup: killing leftover pid $pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [ "$FAILED" -gt 0 ] || [ "$rc" -ne 0 ]; then
        for d in "$DIR_A" "$DIR_B"; do
            for f in "$d"/log/*.log "$d"/log/server.out; do
                [ -s "$f" ] || continue
                echo "---- tail of $f ----" >&2
                tail -n 15 "$f" >&2
            done
        done
    fi
    if [ -n "${KEEP_TMP:-}" ]; then
        echo "kept $TMPROOT" >&2
    else
        rm -rf "$TMPROOT"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "test_two_brokers: interrupted" >&2; exit 130' INT TERM HUP

echo "# brokers: A port $PORT_A in $DIR_A, B port $PORT_B in $DIR_B"

# ------------------------------------------------------------------ start --

t0=$(now_ms)
"$BROKER" start "$DIR_A" "$PORT_A" >"$TMPROOT/start_a.out" 2>&1 &
pid_a=$!
"$BROKER" start "$DIR_B" "$PORT_B" >"$TMPROOT/start_b.out" 2>&1 &
pid_b=$!
START_PIDS=("$pid_a" "$pid_b")
rc_a=0; wait "$pid_a" || rc_a=$?
rc_b=0; wait "$pid_b" || rc_b=$?
START_PIDS=()
echo "# both started (in parallel) in $(secs_since "$t0")s"
sed 's/^/# /' "$TMPROOT/start_a.out" "$TMPROOT/start_b.out"
check "broker A started" [ "$rc_a" -eq 0 ]
check "broker B started" [ "$rc_b" -eq 0 ]
check "start printed one 'broker: started node' line for A" \
    grep -q "^broker: started node bw-$PORT_A@localhost amqp=127.0.0.1:$PORT_A pid=[0-9]* epmd_pid=[0-9]* ($DIR_A)\$" "$TMPROOT/start_a.out"
check "start printed one 'broker: started node' line for B" \
    grep -q "^broker: started node bw-$PORT_B@localhost amqp=127.0.0.1:$PORT_B pid=[0-9]* epmd_pid=[0-9]* ($DIR_B)\$" "$TMPROOT/start_b.out"
if [ "$rc_a" -ne 0 ] || [ "$rc_b" -ne 0 ]; then
    echo "$PASSED passed, $FAILED failed"
    exit 1
fi
mapfile -t pids_a < <(recorded_pids "$DIR_A")
mapfile -t pids_b < <(recorded_pids "$DIR_B")
ALL_PIDS=("${pids_a[@]}" "${pids_b[@]}")
echo "# recorded pids: A ${pids_a[*]}  B ${pids_b[*]}"
check "A recorded 3 pids (wrapper, beam, epmd)" [ "${#pids_a[@]}" -eq 3 ]
check "B recorded 3 pids (wrapper, beam, epmd)" [ "${#pids_b[@]}" -eq 3 ]

check "status A is running" bash -c '"$1" status "$2" >/dev/null' _ "$BROKER" "$DIR_A"
check "status B is running" bash -c '"$1" status "$2" >/dev/null' _ "$BROKER" "$DIR_B"
out=$("$BROKER" start "$DIR_A" "$PORT_A" 2>&1) && rc=0 || rc=$?
check "starting A again is idempotent (exit 0, 'already running')" \
    bash -c '[ "$1" -eq 0 ] && grep -q "already running" <<<"$2"' _ "$rc" "$out"
out=$("$BROKER" start "$TMPROOT/c" "$PORT_A" 2>&1) && rc=0 || rc=$?
check "starting another DIR on A's port fails clearly" \
    bash -c '[ "$1" -ne 0 ] && grep -q "already in use" <<<"$2"' _ "$rc" "$out"

# ------------------------------------------------------------------- AMQP --

amqp_roundtrip() { # PORT QUEUE BODY
    local url="amqp://guest:guest@127.0.0.1:$1" got
    amqp-declare-queue --url "$url" -q "$2" >/dev/null || return 1
    amqp-publish --url "$url" -r "$2" -b "$3" || return 1
    got=$(amqp-get --url "$url" -q "$2") || return 1
    [ "$got" = "$3" ] || { echo "  got '$got', want '$3'" >&2; return 1; }
}
check "A: declare/publish/get round trip" amqp_roundtrip "$PORT_A" probe_a "hello from A $$"
check "B: declare/publish/get round trip" amqp_roundtrip "$PORT_B" probe_b "hello from B $$"

queues_a=$("$BROKER" ctl "$DIR_A" -q list_queues --no-table-headers name 2>&1) || true
queues_b=$("$BROKER" ctl "$DIR_B" -q list_queues --no-table-headers name 2>&1) || true
echo "# queues on A: $(tr "\n" " " <<<"$queues_a")  queues on B: $(tr "\n" " " <<<"$queues_b")"
check "A (rabbitmqctl) sees probe_a only" \
    bash -c 'grep -qx probe_a <<<"$1" && ! grep -q probe_b <<<"$1"' _ "$queues_a"
check "B (rabbitmqctl) sees probe_b only" \
    bash -c 'grep -qx probe_b <<<"$1" && ! grep -q probe_a <<<"$1"' _ "$queues_b"
check "A listens on 127.0.0.1 only" \
    bash -c '[ "$(ss -Hltn "sport = :$1" | awk "{print \$4}")" = "127.0.0.1:$1" ]' _ "$PORT_A"
check "B listens on 127.0.0.1 only" \
    bash -c '[ "$(ss -Hltn "sport = :$1" | awk "{print \$4}")" = "127.0.0.1:$1" ]' _ "$PORT_B"

# ------------------------------------------------------------------- stop --

for x in A B; do
    d=DIR_$x
    t0=$(now_ms)
    rc=0; "$BROKER" stop "${!d}" || rc=$?
    echo "# broker $x stopped in $(secs_since "$t0")s"
    check "stop $x exits 0" [ "$rc" -eq 0 ]
done
check "stop A again is idempotent" "$BROKER" stop "$DIR_A"
rc=0; "$BROKER" status "$DIR_A" >/dev/null || rc=$?
check "status A after stop is 'stopped' (exit 1)" [ "$rc" -eq 1 ]

left=()
for pid in "${ALL_PIDS[@]}"; do proc_alive "$pid" && left+=("$pid"); done
check "no recorded pid alive (${ALL_PIDS[*]})" [ "${#left[@]}" -eq 0 ]

pattern="$TMPROOT|bw-$PORT_A@|bw-$PORT_B@|port[ _]$((PORT_A + 21000))|port[ _]$((PORT_B + 21000))"
stray=$(procs_mentioning "$pattern")
[ -z "$stray" ] || echo "$stray" | sed 's/^/#   stray: /'
check "no process mentions the test dirs/ports" [ -z "$stray" ]

busy=()
for p in "$PORT_A" $((PORT_A + 20000)) $((PORT_A + 21000)) "$PORT_B" $((PORT_B + 20000)) $((PORT_B + 21000)); do
    listening "$p" && busy+=("$p")
done
check "no listener left on the brokers' ports" [ "${#busy[@]}" -eq 0 ]

check "no new epmd listening on 4369" \
    [ "$(ss -Hltnp 'sport = :4369' 2>/dev/null | sort || true)" = "$EPMD4369_BEFORE" ]
check "no new 'epmd -daemon' process" \
    [ "$(pgrep -f 'epmd.*-daemon' | sort || true)" = "$EPMD_DAEMONS_BEFORE" ]

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
