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
