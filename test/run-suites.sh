#!/usr/bin/env bash
# make test's suites, after its checks and with every binary they use
# already built (make test-prereqs): nothing here may rebuild a binary that
# another suite is running.
#
# Most suites spend their time waiting (for dockerd, for memberlist to
# notice a dead member), not computing: a full run one after another kept
# this machine's two cores about a quarter busy. So suites run side by
# side, each in namespaces, directories and dockerd of its own, in two
# rounds:
#
#   1. what computes: the unit tests (race-detector builds, namespace
#      tests), the benchmark smoke run (whose figures nothing checks) and
#      then the fuzzers, and on a new machine the build of Docker 29 and
#      Compose for the e2e suites, niced so that the tests come first.
#   2. what waits and must not be starved: the VM's kernel-WireGuard tests
#      beside the e2e suite on each engine. QEMU emulates the guest's CPUs:
#      beside the unit tests' builds its tests ran three times slower and
#      timed out; the e2e suites mostly wait on dockerd.
#
# Every suite writes its whole output to $TEST_LOGS/<suite>.log; the
# console gets the same lines, each labelled with its suite. At the end:
# each suite's time, CPU time and result, and the ten slowest tests.
set -uo pipefail
cd "$(dirname "$0")/.."

logs=${TEST_LOGS:-bin/testlogs}
make=${MAKE:-make}
rm -rf "$logs"
mkdir -p "$logs"

# suite NAME CMD...: runs CMD into $logs/NAME.log, labelled on stdout, and
# leaves its exit status in NAME.rc, its seconds in NAME.secs and the CPU
# seconds of everything it ran in NAME.cpu.
suite() {
	local name=$1 start=$SECONDS rc
	shift
	{
		"$@" </dev/null 2>&1
		echo $? >"$logs/$name.rc"
		# The second line of times: user and system time of the
		# children, as 1m2.345s 0m6.789s. (Into a file: in a pipe,
		# times would run in a subshell that has no children.)
		times >"$logs/$name.times"
		sed -n 2p "$logs/$name.times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d\n", u[1]*60 + u[2] + s[1]*60 + s[2] }' >"$logs/$name.cpu"
	} |
		tee "$logs/$name.log" |
		grep --line-buffered -v -E '^(=== (RUN|PAUSE|CONT))' |
		sed -u "s/^/$name | /"
	rc=$(cat "$logs/$name.rc" 2>/dev/null || echo 1)
	echo $((SECONDS - start)) >"$logs/$name.secs"
	echo "$name | ended: exit $rc after $((SECONDS - start))s"
}

engines=${E2E_ENGINES:-20.10 29}
suites=(unit bench-smoke engines)
suite unit "$make" unit-run &
suite bench-smoke "$make" bench-smoke-run fuzz &
suite engines nice -n 10 "$make" e2e-engines E2E_ENGINES="$engines" &
wait

suites+=(vmtest)
suite vmtest "$make" vmtest-run &
for e in $engines; do
	suites+=("e2e-$e")
	suite "e2e-$e" "$make" e2e E2E_ENGINES="$e" &
done
wait

echo
echo "make test: suites"
failed=
for s in "${suites[@]}"; do
	rc=$(cat "$logs/$s.rc" 2>/dev/null || echo 1)
	secs=$(cat "$logs/$s.secs" 2>/dev/null || echo 0)
	cpu=$(cat "$logs/$s.cpu" 2>/dev/null || echo 0)
	result=passed
	if [ "$rc" != 0 ]; then
		result="FAILED (exit $rc; whole output: $logs/$s.log)"
		failed="$failed $s"
	fi
	printf '  %-12s %3dm%02ds, CPU %3dm%02ds  %s\n' "$s" $((secs / 60)) $((secs % 60)) $((cpu / 60)) $((cpu % 60)) "$result"
done

# The ten slowest tests, from the JSON events of the unit and e2e suites
# and from the VM's console, whose result lines become the same events
# (test2json leaves their times out of plain text).
if [ -f "$logs/vmtest.out" ]; then
	sed -n -E 's/^ *--- (PASS|FAIL): ([^ ]+) \(([0-9.]+)s\).*/\1 \2 \3/p' "$logs/vmtest.out" |
		awk '{ printf "{\"Action\":\"%s\",\"Package\":\"vmtest (kernel WireGuard)\",\"Test\":\"%s\",\"Elapsed\":%s}\n", tolower($1), $2, $3 }' >"$logs/vmtest.json"
fi
# Both engines' suites are one package: name the engine in each.
for f in "$logs"/e2e-*.json; do
	[ -f "$f" ] || continue
	e=${f##*/e2e-}
	sed -i "s#\"Package\":\"github.com/wgmesh/wgmesh/test/e2e\"#\"Package\":\"test/e2e (Docker ${e%.json})\"#" "$f"
done
echo
echo "make test: the ten slowest tests"
cat "$logs"/*.json >"$logs/events" 2>/dev/null
test/tools/gotestsum tool slowest --jsonfile "$logs/events" --threshold 1s | sed -n '1,10s/^/  /p'

if [ -n "$failed" ]; then
	echo
	echo "make test: FAILED:$failed"
	exit 1
fi
