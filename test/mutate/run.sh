#!/usr/bin/env bash
# Mutation check of the randomized safety test: applies each deliberate
# bug of mutations.txt to a copy of the tree and runs the safety test on
# fixed seeds; a mutation is caught when the test fails. Prints, per
# mutation, caught or missed and the time, and ends "N caught, M missed".
# A mutation whose patch does not apply, or whose tree does not build, is
# reported n/a, neither caught nor missed.
#
#   MUTATE_SEEDS   seeds to run (default "1 2 3"); one failing is enough
#   MUTATE_STEPS   steps per seed (default 40)
#   MUTATE_TIMEOUT per mutation, in seconds (default 300)
#   MUTATE_ONLY    run only the mutations whose names match this regexp
#   GO             the go command (default: go)
#
# The third column of mutations.txt names fault kinds to run besides the
# default ones (WGMESH_SAFETY_STRICT); "-" runs the default ones only.
# Each set of fault kinds is also run once without any mutation
# (the baseline): a mutation "caught" where its baseline fails says only
# that the code has the bug already (the hole is not fixed yet).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
seeds=${MUTATE_SEEDS:-1 2 3}
steps=${MUTATE_STEPS:-40}
limit=${MUTATE_TIMEOUT:-300}
only=${MUTATE_ONLY:-.}
go=${GO:-go}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# copy makes a fresh copy of the tree as it is in the working directory
# (tracked files, with their uncommitted changes) in $1.
copy() {
	mkdir -p "$1"
	(cd "$root" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$1"
}

# run runs the safety test in tree $1 with strict kinds $2; prints the
# first failure line, returns 0 when every seed passed, 1 when one
# failed, 2 when it did not build, 3 on timeout.
run() {
	local dir=$1 strict=$2 deadline=$((SECONDS + limit)) seed out rc
	[ "$strict" = "-" ] && strict=""
	(cd "$dir" && $go vet ./mesh/ ./mesh/consensus/ ./mesh/catalog/ >"$work/vet.log" 2>&1) || { echo "does not build: $(head -3 "$work/vet.log" | tr '\n' ' ')"; return 2; }
	for seed in $seeds; do
		local left=$((deadline - SECONDS))
		[ $left -le 0 ] && { echo "timed out"; return 3; }
		out=$(cd "$dir" && WGMESH_SAFETY_STRICT=$strict WGMESH_SOAK_SEED=$seed WGMESH_SOAK_STEPS=$steps \
			timeout --kill-after=10 "$left" $go test -count=1 -run '^TestSafetyRandomized$' ./mesh/ 2>&1)
		rc=$?
		[ $rc -eq 124 ] || [ $rc -eq 137 ] && { echo "timed out at seed $seed"; return 3; }
		if [ $rc -ne 0 ]; then
			echo "seed $seed: $(grep -E 'safety_test.go:[0-9]+: |panic:|build failed' <<<"$out" | grep -vE ': (step|seed) [0-9]+|to run it again' | head -1 | sed 's/^ *//' | cut -c1-220)"
			return 1
		fi
	done
	echo "seeds $seeds passed"
	return 0
}

declare -A baseline
caught=0 missed=0 na=0
printf '%-26s %-23s %6s  %s\n' mutation result time detail
while IFS='|' read -r name patch strict what; do
	name=$(xargs <<<"$name"); patch=$(xargs <<<"$patch"); strict=$(xargs <<<"$strict")
	what=$(sed 's/^ *//; s/ *$//' <<<"$what") # not xargs: it takes quotes apart
	[[ -z "$name" || "$name" == \#* ]] && continue
	[[ "$name" =~ $only ]] || continue
	if [ -z "${baseline[$strict]+x}" ]; then
		dir="$work/baseline"; rm -rf "$dir"; copy "$dir"
		start=$SECONDS
		detail=$(run "$dir" "$strict"); rc=$?
		if [ $rc -eq 0 ]; then baseline[$strict]=pass; else baseline[$strict]=FAILS; fi
		printf '%-26s %-23s %5ss  %s\n' "(baseline, kinds ${strict})" "${baseline[$strict]}" $((SECONDS - start)) "$detail"
	fi
	dir="$work/$name"; rm -rf "$dir"; copy "$dir"
	if [ "$patch" != "-" ] && ! ([ -f "$here/$patch" ] && cd "$dir" && patch -p1 -s --dry-run <"$here/$patch" >/dev/null 2>&1 && patch -p1 -s <"$here/$patch" >/dev/null); then
		printf '%-26s %-23s %6s  %s\n' "$name" "n/a (does not apply)" - "$what"
		na=$((na + 1)); rm -rf "$dir"; continue
	fi
	start=$SECONDS
	detail=$(run "$dir" "$strict"); rc=$?
	took=$((SECONDS - start))
	case $rc in
	1) result=caught; caught=$((caught + 1)) ;;
	2) result="n/a (does not build)"; na=$((na + 1)) ;;
	*) result=MISSED; missed=$((missed + 1)) ;;
	esac
	[ "$result" = caught ] && [ "${baseline[$strict]}" = FAILS ] && result="caught (baseline fails)"
	printf '%-26s %-23s %5ss  %s\n' "$name" "$result" "$took" "$what; $detail"
	rm -rf "$dir"
done <"$here/mutations.txt"
summary="$caught caught, $missed missed"
[ $na -gt 0 ] && summary+=", $na n/a"
echo "$summary"
[ $missed -eq 0 ]
