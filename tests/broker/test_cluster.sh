#!/usr/bin/env bash
# tests/broker/test_cluster.sh [REPO_ROOT]
#
# "scripts/broker cluster": starts a private 3-node RabbitMQ cluster on free
# loopback ports, and checks that
#   - it is one cluster (cluster_status: 3 running nodes), one private epmd
#     holding the three node names, DIR/cluster lists N, PORTS, URLS;
#   - a quorum queue declared on node 1 has a member on every node
#     (rabbitmq-queues quorum_status);
#   - every message confirmed by node 1 survives a SIGKILL of node 1 (the
#     queue's leader): all are consumed from node 2, under a new leader;
#   - the killed node restarts ("cluster node start") and rejoins;
#   - a frozen node (SIGSTOP) stops answering, its peers drop it, and it is
#     back in the cluster once thawed; a cleanly stopped node comes back;
#   - the whole cluster stops and starts again with its messages;
#   - nothing is left behind (process, listener, epmd on 4369).
# Prints timings as "# ..." lines and "N passed, M failed"; exits non-zero on
# any failure.  KEEP_TMP=1 keeps the temp dir.
set -euo pipefail

ROOT=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
BROKER=$ROOT/scripts/broker
AMQP="/usr/bin/python3 $ROOT/tests/broker/cluster_amqp.py"
[ -x "$BROKER" ] || { echo "test_cluster: $BROKER not found/executable" >&2; exit 2; }
for tool in ss pgrep epmd; do
    command -v "$tool" >/dev/null || { echo "test_cluster: missing tool $tool" >&2; exit 2; }
done
/usr/bin/python3 -c 'import pika' 2>/dev/null ||
    { echo "test_cluster: /usr/bin/python3 has no pika (apt install python3-pika)" >&2; exit 2; }

N=3
QUEUE=bw_cluster_probe
COUNT=500

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $*"; }
check() {
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}
# bail: a failure the rest of the test cannot go on from.
bail() {
    fail "$*"
    echo "$PASSED passed, $FAILED failed"
    exit 1
}

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

proc_alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs_since() { local d=$(($(now_ms) - $1)); printf '%d.%01d' $((d / 1000)) $((d % 1000 / 100)); }

# pick_base: P in 12000..12599 with every port of a 3-node cluster free:
# P..P+2 (AMQP), +20000 (distribution), +21000 (epmd; P+1, P+2 too, to stay
# clear of a single-node broker on those).  Away from with-broker's
# 11000-11699, below the ephemeral range.
pick_base() {
    local p i ok
    for _ in $(seq 1 200); do
        p=$((12000 + RANDOM % 600))
        ok=1
        for ((i = 0; i < N; i++)); do
            if listening $((p + i)) || listening $((p + i + 20000)) || listening $((p + i + 21000)); then
                ok=
                break
            fi
        done
        [ -z "$ok" ] || { echo "$p"; return 0; }
    done
    echo "test_cluster: no free ports found" >&2
    return 1
}

TMPROOT=$(mktemp -d "${TMPDIR:-/tmp}/bw-cluster-test.XXXXXX")
DIR=$TMPROOT/c
BASE=$(pick_base)
EPMD_PORT=$((BASE + 21000))
PORT=() NAME=() URL=()
for ((i = 1; i <= N; i++)); do
    PORT[i]=$((BASE + i - 1))
    NAME[i]=bw-${PORT[i]}@localhost
    URL[i]=amqp://guest:guest@127.0.0.1:${PORT[i]}
done
ALL_PIDS=()
START_PID=

EPMD4369_BEFORE=$(ss -Hltnp 'sport = :4369' 2>/dev/null | sort || true)
EPMD_DAEMONS_BEFORE=$(pgrep -f 'epmd.*-daemon' | sort || true)

# remember_pids: add every PID the cluster has recorded now (nodes restart
# with new PIDs) to ALL_PIDS, for the final checks and the last-resort cleanup.
remember_pids() {
    local f pid _
    for f in "$DIR"/run/epmd.pid "$DIR"/node*/run/server.pid "$DIR"/node*/run/beam.pid; do
        [ -s "$f" ] || continue
        read -r pid _ <"$f" || continue
        [[ " ${ALL_PIDS[*]} " == *" $pid "* ]] || ALL_PIDS+=("$pid")
    done
}

cleanup() {
    local rc=$? pid f
    trap - EXIT INT TERM HUP
    if [ -n "$START_PID" ]; then
        kill -TERM "$START_PID" 2>/dev/null || true
        wait "$START_PID" 2>/dev/null || true
    fi
    remember_pids
    [ ! -d "$DIR" ] || "$BROKER" cluster stop "$DIR" >/dev/null 2>&1 || echo "cleanup: cluster stop failed" >&2
    for pid in ${ALL_PIDS[@]+"${ALL_PIDS[@]}"}; do
        # Only if it still is one of ours (its command line or environment
        # names the temp dir or the epmd port): a PID may have been reused.
        if proc_alive "$pid" && cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null |
            tr '\0' '\n' | grep -qE "$TMPROOT|port[ _=]$EPMD_PORT|^$EPMD_PORT\$"; then
            echo "cleanup: killing leftover pid $pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [ "$FAILED" -gt 0 ] || [ "$rc" -ne 0 ]; then
        for f in "$DIR"/node*/log/*.log "$DIR"/log/*.out; do
            [ -s "$f" ] || continue
            echo "---- tail of $f ----" >&2
            tail -n 15 "$f" >&2
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
trap 'echo "test_cluster: interrupted" >&2; exit 130' INT TERM HUP

# queues CMD... : rabbitmq-queues against node 1..N, in that node's environment.
queues() {
    local i=$1
    shift
    (
        for v in $(compgen -e); do case "$v" in RABBITMQ_*|ERL_*) unset "$v" ;; esac; done
        # shellcheck disable=SC1090
        . "$DIR/node$i/env"
        timeout 60 /usr/lib/rabbitmq/bin/rabbitmq-queues "$@"
    )
}

# quorum_members I: "NODE STATE" lines of the queue's quorum_status, asked of node I.
quorum_members() {
    local json
    json=$(queues "$1" -q quorum_status "$QUEUE" --formatter json 2>&1) || { echo "$json" >&2; return 1; }
    /usr/bin/python3 -c '
import json, sys
for m in json.loads(sys.argv[1]):
    s = m["Raft State"]
    print(m["Node Name"], s if isinstance(s, str) else "/".join(map(str, s)))' "$json"
}

# running_in I: the running_nodes of node I's cluster_status, one a line.
running_in() {
    local json
    json=$("$BROKER" ctl "$DIR/node$1" -q cluster_status --formatter json 2>/dev/null) || return 1
    /usr/bin/python3 -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])["running_nodes"]))' "$json"
}

# wait_running I COUNT SECONDS: node I's cluster_status lists COUNT running nodes.
wait_running() {
    local deadline=$((SECONDS + $3)) got
    while :; do
        got=$(running_in "$1" | grep -c . || true)
        [ "$got" != "$2" ] || return 0
        [ "$SECONDS" -lt "$deadline" ] || { echo "  node $1 lists $got running nodes, not $2" >&2; return 1; }
        sleep 1
    done
}

# same_bodies FILE TAG COUNT: FILE holds exactly TAG-0 .. TAG-(COUNT-1), once each.
same_bodies() {
    diff <(sort "$1") <(for ((k = 0; k < $3; k++)); do echo "$2-$k"; done | sort) >/dev/null
}

echo "# cluster of $N nodes in $DIR: AMQP ports ${PORT[*]}, epmd $EPMD_PORT"

# ------------------------------------------------------------------ start --

t0=$(now_ms)
"$BROKER" cluster start "$DIR" "$N" "$BASE" >"$TMPROOT/start.out" 2>&1 &
START_PID=$!
rc=0; wait "$START_PID" || rc=$?
START_PID=
remember_pids
echo "# cluster start took $(secs_since "$t0")s (exit $rc):"
sed 's/^/#   /' "$TMPROOT/start.out"
[ "$rc" -eq 0 ] || bail "cluster start exits 0"
pass "cluster start exits 0"
for ((i = 1; i <= N; i++)); do
    check "start printed node $i with its URL" \
        grep -q "^broker: cluster node $i ${NAME[i]} ${URL[i]} pid=[0-9]* beam_pid=[0-9]* ($DIR/node$i)\$" "$TMPROOT/start.out"
done
check "start printed one summary line with its duration" \
    grep -q "^broker: cluster of $N nodes running, started in [0-9.]*s; epmd port $EPMD_PORT pid=[0-9]*;" "$TMPROOT/start.out"

cl_n='' cl_ports='' cl_urls=''
# shellcheck disable=SC1091
cl_n=$(. "$DIR/cluster" && echo "$N")
cl_ports=$(. "$DIR/cluster" && echo "$PORTS")
cl_urls=$(. "$DIR/cluster" && echo "$URLS")
echo "# $DIR/cluster: N=$cl_n PORTS=$cl_ports URLS=$cl_urls"
check "DIR/cluster: N=$N" [ "$cl_n" = "$N" ]
check "DIR/cluster: PORTS=${PORT[1]},${PORT[2]},${PORT[3]}" [ "$cl_ports" = "${PORT[1]},${PORT[2]},${PORT[3]}" ]
check "DIR/cluster: URLS is the comma-separated amqp.url list" [ "$cl_urls" = "${URL[1]},${URL[2]},${URL[3]}" ]

running=$(running_in 1 | sort | tr '\n' ' ')
echo "# running_nodes in node 1's cluster_status: $running"
check "cluster_status lists the $N nodes running" [ "$running" = "$(printf '%s\n' "${NAME[@]}" | sort | tr '\n' ' ')" ]
names=$(epmd -port "$EPMD_PORT" -names 2>&1 | sed -n 's/^name \([^ ]*\) at port.*/\1/p' | sort | tr '\n' ' ')
echo "# names in the cluster's epmd (port $EPMD_PORT): $names"
check "one epmd holds the $N node names" [ "$names" = "bw-${PORT[1]} bw-${PORT[2]} bw-${PORT[3]} " ]
for ((i = 2; i <= N; i++)); do
    check "node $i has no epmd of its own (nothing on $((PORT[i] + 21000)))" bash -c '! ss -Hltn "sport = :$1" | grep -q .' _ $((PORT[i] + 21000))
done
tick=$("$BROKER" ctl "$DIR/node1" -q eval 'net_kernel:get_net_ticktime().' 2>&1 || true)
check "cluster nodes run with net_ticktime 10 (got '$tick')" [ "$tick" = 10 ]
cookies=$(cat "$DIR"/node*/home/.erlang.cookie | sort -u | wc -l)
check "one cookie for every node" [ "$cookies" -eq 1 ]
status=$("$BROKER" cluster status "$DIR" 2>&1) && rc=0 || rc=$?
sed 's/^/#   /' <<<"$status"
check "cluster status: exit 0, $N nodes running, '$N of $N running'" \
    bash -c '[ "$1" -eq 0 ] && [ "$(grep -c "^node [0-9]: running node .* amqp-ok" <<<"$2")" -eq "$3" ] && grep -q "^cluster: $3 of $3 running" <<<"$2"' _ "$rc" "$status" "$N"
out=$("$BROKER" cluster start "$DIR" "$N" "$BASE" 2>&1) && rc=0 || rc=$?
check "cluster start again: exit 0, nothing restarted" \
    bash -c '[ "$1" -eq 0 ] && grep -q "^broker: cluster of 3 nodes running" <<<"$2"' _ "$rc" "$out"
out=$("$BROKER" cluster start "$TMPROOT/other" "$N" "$BASE" 2>&1) && rc=0 || rc=$?
check "a second cluster on the same ports is refused" \
    bash -c '[ "$1" -ne 0 ] && grep -q "already in use" <<<"$2"' _ "$rc" "$out"
rm -rf "$TMPROOT/other"

# ---------------------------------------------------------- quorum queue --

$AMQP declare "${URL[1]}" "$QUEUE" || bail "declare quorum queue $QUEUE on node 1"
members=$(quorum_members 1 || true)
echo "# quorum_status $QUEUE:"
sed 's/^/#   /' <<<"$members"
check "quorum queue has $N members, one on each node" \
    [ "$(awk '{print $1}' <<<"$members" | sort | tr '\n' ' ')" = "$(printf '%s\n' "${NAME[@]}" | sort | tr '\n' ' ')" ]
leader=$(awk '$2 == "leader" {print $1}' <<<"$members")
L=0
for ((i = 1; i <= N; i++)); do [ "${NAME[i]}" != "$leader" ] || L=$i; done
echo "# leader: $leader (node $L)"
check "the leader is node 1, where it was declared" [ "$L" = 1 ]
[ "$L" -ge 1 ] || bail "no leader in quorum_status"
C=$((L % N + 1))   # the node we consume from after the kill

t0=$(now_ms)
confirmed=$($AMQP publish "${URL[1]}" "$QUEUE" "$COUNT" m) || confirmed=0
echo "# $confirmed messages published to node 1 and confirmed in $(secs_since "$t0")s"
check "$COUNT messages confirmed by node 1" [ "$confirmed" = "$COUNT" ]

# ------------------------------------------------------- kill the leader --

out=$("$BROKER" cluster node kill "$DIR" "$L" 2>&1) && rc=0 || rc=$?
echo "# $out"
check "node kill $L: exit 0, one line" bash -c '[ "$1" -eq 0 ] && [ "$(wc -l <<<"$2")" -eq 1 ]' _ "$rc" "$out"
t0=$(now_ms)
$AMQP drain "${URL[C]}" "$QUEUE" 60 >"$TMPROOT/drained" && rc=0 || rc=$?
got=$(grep -c . "$TMPROOT/drained" || true)
echo "# node $L killed; $got messages consumed from node $C within $(secs_since "$t0")s of the kill"
check "every confirmed message ($COUNT) is consumed from node $C after the leader died" \
    bash -c '[ "$1" -eq 0 ] && [ "$2" -eq "$3" ]' _ "$rc" "$got" "$COUNT"
check "each exactly once, bodies intact" same_bodies "$TMPROOT/drained" m "$COUNT"
members=$(quorum_members "$C" || true)
sed 's/^/#   after the kill: /' <<<"$members"
check "a new leader on another node; node $L is down" \
    bash -c 'l=$(awk "\$2 == \"leader\" {print \$1}" <<<"$1"); [ -n "$l" ] && [ "$l" != "$2" ] && grep -q "^$2 nodedown" <<<"$1"' _ "$members" "${NAME[L]}"
status=$("$BROKER" cluster status "$DIR" 2>&1) && rc=0 || rc=$?
check "cluster status after the kill: exit 1, node $L stopped" \
    bash -c '[ "$1" -eq 1 ] && grep -q "^node $2: stopped node" <<<"$3"' _ "$rc" "$L" "$status"

out=$("$BROKER" cluster node start "$DIR" "$L" 2>&1) && rc=0 || rc=$?
remember_pids
echo "# $out"
check "node start $L after the kill: exit 0, one line, running again" \
    bash -c '[ "$1" -eq 0 ] && [ "$(wc -l <<<"$2")" -eq 1 ] && grep -q "running in .*s, 3 of 3 running" <<<"$2"' _ "$rc" "$out"
check "node $L back in node $C's cluster_status" wait_running "$C" "$N" 30
members=$(quorum_members "$L" || true)
sed 's/^/#   after the restart: /' <<<"$members"
check "node $L is a quorum member again (follower or leader)" \
    bash -c 'grep -qE "^$2 (follower|leader)$" <<<"$1"' _ "$members" "${NAME[L]}"

# ------------------------------------------------------ freeze and thaw --

F=$N   # freeze the last node
out=$("$BROKER" cluster node freeze "$DIR" "$F" 2>&1) && rc=0 || rc=$?
echo "# $out at $(date -u +%T.%N | cut -c1-12)"
t0=$(now_ms)
check "node freeze $F: exit 0" [ "$rc" -eq 0 ]
check "status says node $F is frozen" bash -c '"$1" cluster status "$2" | grep -q "^node $3: running .* frozen"' _ "$BROKER" "$DIR" "$F"
check "a frozen node opens no AMQP connection (3 s)" $AMQP unreachable "${URL[F]}" 3
check "its peers drop it from cluster_status (net_ticktime)" wait_running 1 $((N - 1)) 60
echo "# node 1's cluster_status dropped the frozen node $(secs_since "$t0")s after SIGSTOP; node 1's log:"
grep -h "${NAME[F]}.*\(down\|net_tick\)" "$DIR/node1/log/${NAME[1]}.log" | head -n 2 | cut -c1-160 | sed 's/^/#   /' || true
check "the cluster keeps working without it (publish to node 1, get from node 2)" \
    bash -c 'c=$($1 publish "$2" "$4" 10 f) && [ "$c" = 10 ] && $1 drain "$3" "$4" 10 >"$5" && [ "$(grep -c . "$5")" = 10 ]' \
    _ "$AMQP" "${URL[1]}" "${URL[2]}" "$QUEUE" "$TMPROOT/frozen"
t0=$(now_ms)
out=$("$BROKER" cluster node thaw "$DIR" "$F" 2>&1) && rc=0 || rc=$?
echo "# $out"
echo "# thaw returned in $(secs_since "$t0")s"
check "node thaw $F: exit 0, one line, back running" \
    bash -c '[ "$1" -eq 0 ] && [ "$(wc -l <<<"$2")" -eq 1 ] && grep -q "3 of 3 running" <<<"$2"' _ "$rc" "$out"
check "node 1 lists $N running nodes again" wait_running 1 "$N" 30
check "the thawed node serves AMQP (publish to node $F, get from node 1)" \
    bash -c 'c=$($1 publish "$2" "$4" 10 t) && [ "$c" = 10 ] && $1 drain "$3" "$4" 10 >"$5" && [ "$(grep -c . "$5")" = 10 ]' \
    _ "$AMQP" "${URL[F]}" "${URL[1]}" "$QUEUE" "$TMPROOT/thawed"

# --------------------------------------------------- clean stop and start --

out=$("$BROKER" cluster node stop "$DIR" 2 2>&1) && rc=0 || rc=$?
echo "# $out"
check "node stop 2: exit 0" [ "$rc" -eq 0 ]
check "node 1 lists $((N - 1)) running nodes" wait_running 1 $((N - 1)) 30
out=$("$BROKER" cluster node start "$DIR" 2 2>&1) && rc=0 || rc=$?
remember_pids
echo "# $out"
check "node start 2: exit 0, back running" bash -c '[ "$1" -eq 0 ] && grep -q "3 of 3 running" <<<"$2"' _ "$rc" "$out"

# ------------------------------------------- whole cluster stop and start --

confirmed=$($AMQP publish "${URL[2]}" "$QUEUE" 50 r) || confirmed=0
check "50 messages confirmed by node 2 before the cluster restart" [ "$confirmed" = 50 ]
t0=$(now_ms)
out=$("$BROKER" cluster stop "$DIR" 2>&1) && rc=0 || rc=$?
echo "# $out"
check "cluster stop: exit 0" [ "$rc" -eq 0 ]
t0=$(now_ms)
"$BROKER" cluster start "$DIR" "$N" >"$TMPROOT/restart.out" 2>&1 && rc=0 || rc=$?
remember_pids
echo "# cluster restart (no PORT: the recorded one) took $(secs_since "$t0")s (exit $rc)"
sed -n 's/^/#   /; $p' "$TMPROOT/restart.out"
check "cluster start of the stopped cluster: exit 0, $N running" \
    bash -c '[ "$1" -eq 0 ] && grep -q "^broker: cluster of $2 nodes running" "$3"' _ "$rc" "$N" "$TMPROOT/restart.out"
$AMQP drain "${URL[3]}" "$QUEUE" 60 >"$TMPROOT/restarted" || true
check "the 50 messages survived the cluster restart" same_bodies "$TMPROOT/restarted" r 50

# ------------------------------------------------------------------- stop --

remember_pids
t0=$(now_ms)
out=$("$BROKER" cluster stop "$DIR" 2>&1) && rc=0 || rc=$?
echo "# $out"
check "cluster stop: exit 0" [ "$rc" -eq 0 ]
check "cluster stop again is idempotent" "$BROKER" cluster stop "$DIR"
rc=0; "$BROKER" cluster status "$DIR" >/dev/null || rc=$?
check "cluster status after stop: exit 1" [ "$rc" -eq 1 ]

left=()
for pid in "${ALL_PIDS[@]}"; do proc_alive "$pid" && left+=("$pid"); done
check "no recorded pid alive (${#ALL_PIDS[@]} recorded: ${ALL_PIDS[*]})" [ "${#left[@]}" -eq 0 ]
stray=$(pgrep -af -- "$TMPROOT|bw-${PORT[1]}@|bw-${PORT[2]}@|bw-${PORT[3]}@|port[ _]$EPMD_PORT" | grep -v "^$$ " || true)
[ -z "$stray" ] || echo "$stray" | sed 's/^/#   stray: /'
check "no process mentions the cluster's dir, names or epmd port" [ -z "$stray" ]
busy=()
for ((i = 1; i <= N; i++)); do
    for p in "${PORT[i]}" $((PORT[i] + 20000)); do listening "$p" && busy+=("$p"); done
done
listening "$EPMD_PORT" && busy+=("$EPMD_PORT")
check "no listener left on the cluster's ports" [ "${#busy[@]}" -eq 0 ]
check "no new epmd listening on 4369" \
    [ "$(ss -Hltnp 'sport = :4369' 2>/dev/null | sort || true)" = "$EPMD4369_BEFORE" ]
check "no new 'epmd -daemon' process" \
    [ "$(pgrep -f 'epmd.*-daemon' | sort || true)" = "$EPMD_DAEMONS_BEFORE" ]

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
