# lib.sh: the shell helpers the scripts and shell tests share; source it, never run it.
#   . "$root/scripts/lib.sh"

# check NAME CONDITION...: runs CONDITION and counts it in $pass or $fail; a failure is named
# ("FAIL: NAME"). The test ends with check_summary.
pass=0 fail=0
check() {
	local name=$1
	shift
	if "$@"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $name"; fi
}

# check_summary: prints "N passed, M failed"; returns non-zero when a check failed.
check_summary() {
	echo "$pass passed, $fail failed"
	[ "$fail" -eq 0 ]
}

# stop_pid_remove_tmp: an EXIT trap for a test with one child ($pid, maybe empty) and one
# scratch directory ($tmp): stops the child, waits for it, removes the directory.
stop_pid_remove_tmp() {
	[ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	rm -rf "$tmp"
}
