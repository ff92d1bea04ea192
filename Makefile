# wgmesh. Two commands do everything on a fresh Debian machine, as root:
#   make demo   three simulated hosts, a wgmesh network, cross-host pings
#   make test   every test: unit, fuzz, namespaces, end-to-end with dockerd,
#               kernel WireGuard in a VM, and a smoke run of the benchmark
# Both install what is missing (Debian packages, a Go toolchain).
# make bench runs the benchmarks and writes bench/results.

SHELL := bash
.SHELLFLAGS := -o pipefail -euc
.DEFAULT_GOAL := build
MAKEFLAGS += --no-print-directory

GO := $(shell .ci/go.sh)
export GOTOOLCHAIN := local
export PATH := $(dir $(GO)):$(PATH)

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
# A count, not a duration: a -fuzztime duration races the Go 1.26 fuzz
# coordinator at its deadline and fails with "context deadline exceeded"
# and no crasher (go.dev/issue/75804, fixed in Go 1.27).
FUZZTIME ?= 30000x
FUZZ_PKGS := ./crypto ./mesh/records ./mesh/catalog ./driver ./driver/dns

# Docker engines make e2e runs the suite against: Debian's docker.io, and
# Docker Engine 29 built by .ci/engine29.sh (cached after the first time).
E2E_ENGINES ?= 20.10 29

PLUGIN ?= wgmesh:latest
DOCKER ?= docker

.PHONY: build bench-agent lab vm deps demo test test-prereqs e2e-engines check staticcheck unit unit-run fuzz e2e vmtest vmtest-run bench bench-smoke bench-smoke-run baseline prev soak mutate docs lint tidy-check plugin clean

# Where the suites leave their JSON test events, for make test's list of
# the slowest tests.
TEST_LOGS ?= bin/testlogs
export TEST_LOGS
GOTESTSUM := test/tools/gotestsum

build: ## static agent binary in bin/wgmesh
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/wgmesh ./cmd/wgmesh

# The bench's agent keeps its symbol table (no -s), so that perf names the
# agent's functions in the report's profiles; -w still drops DWARF.
bench-agent: ## the agent as bin/wgmesh-bench, with symbols for perf
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-w -X main.version=$(VERSION)" -o bin/wgmesh-bench ./cmd/wgmesh

lab: ## the lab driver used by demo and bench
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/wgmesh-lab ./test/cmd/wgmesh-lab

vm: ## the VM runner used by vmtest and bench (static: it is also the guest's /init)
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/wgmesh-vm ./test/cmd/wgmesh-vm

deps: ## install missing Debian packages
	.ci/deps.sh

demo: deps build lab ## three hosts with dockerd + wgmesh, cross-host ping, wgmesh status
	bin/wgmesh-lab demo -binary bin/wgmesh

# The suites run side by side (test/run-suites.sh says why), so every
# binary they use is built before any starts.
test: deps check test-prereqs ## every test
	test/run-suites.sh
	@echo "make test: all passed"

test-prereqs: build lab vm bench-agent prev baseline bin/wireguard-go

# Docker 29 and Compose for the e2e suites, built from source once (minutes
# of both cores on a new machine, a quick check after that).
e2e-engines:
	.ci/compose.sh >/dev/null
	if [[ " $(E2E_ENGINES) " == *" 29 "* ]]; then .ci/engine29.sh >/dev/null; fi

check: tidy-check lint staticcheck

# staticcheck, built once from its module at a version that supports this
# Go, and kept out of the repository in the user's cache.
STATICCHECK_VERSION ?= v0.8.2
STATICCHECK := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/wgmesh/bin/staticcheck-$(STATICCHECK_VERSION)

staticcheck: $(STATICCHECK) ## staticcheck's default checks
	$(STATICCHECK) ./...
	$(STATICCHECK) -tags e2e ./test/e2e/

$(STATICCHECK):
	mkdir -p $(dir $@)
	tmp=$$(mktemp -d) && GOBIN=$$tmp $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) && \
		mv $$tmp/staticcheck $@ && rmdir $$tmp

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e/

docs: ## docs/flags.md from the agent's own flags (TestFlagsDoc fails when it is out of date)
	$(GO) test ./cmd/wgmesh -count=1 -run '^TestFlagsDoc$$' -update-docs

tidy-check: ## go.mod and go.sum are tidy, the repository's and test/tools'
	$(GO) mod tidy -diff
	cd test/tools && $(GO) mod tidy -diff

unit: prev unit-run ## unit tests with the race detector; as root also the namespace tests

unit-run:
	mkdir -p $(TEST_LOGS)
	$(PREV_ENV) $(GOTESTSUM) --format pkgname-and-test-fails --jsonfile $(TEST_LOGS)/unit.json -- -race -count=1 ./...

fuzz: ## every fuzzer for FUZZTIME
	for pkg in $(FUZZ_PKGS); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "fuzz $$pkg $$f"; \
			$(GO) test $$pkg -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME); \
		done; \
	done

e2e: ## end-to-end suite against three real dockerd (root), once per engine in E2E_ENGINES
	compose=$$(.ci/compose.sh); \
	failed=; \
	for engine in $(E2E_ENGINES); do \
		dir=; \
		if [ "$$engine" = 29 ]; then dir=$$(.ci/engine29.sh); fi; \
		echo "e2e: engine $$engine"; \
		mkdir -p $(TEST_LOGS); \
		WGMESH_E2E_ENGINE=$$engine WGMESH_E2E_ENGINE_DIR=$$dir WGMESH_E2E_COMPOSE=$$compose \
			$(GOTESTSUM) --format standard-verbose --jsonfile $(TEST_LOGS)/e2e-$$engine.json -- \
			-tags e2e -count=1 -timeout 30m ./test/e2e/ 2>&1 | grep -v -E '^(=== (RUN|PAUSE|CONT))' || \
			failed="$$failed $$engine"; \
	done; \
	if [ -n "$$failed" ]; then echo "e2e: failed on engine(s)$$failed"; exit 1; fi

# The machine's kernel has no WireGuard module and loads none, so the
# kernel-WireGuard tests run in a VM: Debian's linux-image-amd64 under
# QEMU (emulated, no KVM), the host's root shared read-only over 9p. The
# test binaries are built here; nothing compiles inside. A skipped
# kernel test fails there (WGMESH_REQUIRE_KERNEL_WG), and the agents of
# the integration tests run kernel WireGuard (WGMESH_WG_MODE).
VMTEST_TIMEOUT ?= 30m
vmtest: deps build vm prev vmtest-run ## data-plane and integration tests with kernel WireGuard, in a VM

# The VM's console, whole, goes to $(TEST_LOGS)/vmtest.out for
# test/run-suites.sh to read the tests' times from.
vmtest-run:
	mkdir -p bin/vmtest $(TEST_LOGS)
	$(GO) test -c -o bin/vmtest/linux.test ./driver/dataplane/linux
	$(GO) test -c -o bin/vmtest/integration.test ./test/integration
	bin/wgmesh-vm -timeout $(VMTEST_TIMEOUT) -log bin/vmtest/console.log \
		-env WGMESH_REQUIRE_KERNEL_WG=1 -env WGMESH_WG_MODE=kernel -env WGMESH_BINARY=$(CURDIR)/bin/wgmesh -env $(PREV_ENV) \
		-- -C driver/dataplane/linux bin/vmtest/linux.test -test.v -test.count=1 -test.timeout 10m \
		--- -C test/integration bin/vmtest/integration.test -test.v -test.count=1 -test.timeout 20m \
		| tee $(TEST_LOGS)/vmtest.out | grep --line-buffered -v -E '^(=== (RUN|PAUSE|CONT))'

plugin: build ## the managed Docker plugin PLUGIN, created in the engine at DOCKER_HOST
	rm -rf bin/plugin && mkdir -p bin/plugin/rootfs
	DOCKER_BUILDKIT=0 $(DOCKER) build -q -t wgmesh-plugin-rootfs:$(VERSION) . >/dev/null
	id=$$($(DOCKER) create wgmesh-plugin-rootfs:$(VERSION)) && \
		$(DOCKER) export $$id | tar -x -C bin/plugin/rootfs && $(DOCKER) rm $$id >/dev/null
	$(DOCKER) rmi wgmesh-plugin-rootfs:$(VERSION) >/dev/null
	cp cmd/wgmesh/plugin.json bin/plugin/config.json
	$(DOCKER) plugin rm -f $(PLUGIN) >/dev/null 2>&1 || true
	$(DOCKER) plugin create $(PLUGIN) bin/plugin

bin/wireguard-go: go.mod ## standalone wireguard-go, built from the module wgmesh uses, for the benchmark
	CGO_ENABLED=0 $(GO) build -trimpath -o $@ golang.zx2c4.com/wireguard

# The bench times network creation and the first containers of this build
# and of BASELINE, the last commit before block ownership went through
# Raft, built from git history. A clone without that commit (a shallow
# one) has no baseline: the bench says so in its report.
BASELINE ?= 781c3c1
BENCH_BASELINE := -baseline bin/wgmesh-baseline -baseline-rev $(BASELINE)

baseline: ## bin/wgmesh-baseline: the agent of commit BASELINE, if git history has it
	@if ! rev=$$(git rev-parse -q --verify '$(BASELINE)^{commit}' 2>/dev/null); then \
		echo "baseline: commit $(BASELINE) is not in this clone's history (shallow?): the bench runs without a baseline"; \
		rm -f bin/wgmesh-baseline bin/wgmesh-baseline.rev; exit 0; \
	fi; \
	if [ -x bin/wgmesh-baseline ] && [ "$$(cat bin/wgmesh-baseline.rev 2>/dev/null)" = "$$rev" ]; then exit 0; fi; \
	mkdir -p bin; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "baseline: building the agent of $(BASELINE) into bin/wgmesh-baseline"; \
	git archive "$$rev" | tar -x -C "$$tmp"; \
	(cd "$$tmp" && CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(BASELINE)" -o $(CURDIR)/bin/wgmesh-baseline ./cmd/wgmesh); \
	echo "$$rev" > bin/wgmesh-baseline.rev

# Users upgrade a running cluster host by host, so the integration tests
# start a cluster on the agent of PREV_RELEASE, the last release, and
# upgrade it to this build (TestRollingUpgrade). Move PREV_RELEASE on at
# each release, with defaultPrevRelease in test/integration. A clone
# without that commit (a shallow one) has no previous agent: the test
# skips and says so, as does this target.
PREV_RELEASE ?= 559f90d
PREV_ENV := WGMESH_PREV_BINARY=$(CURDIR)/bin/wgmesh-prev

prev: ## bin/wgmesh-prev: the agent of commit PREV_RELEASE, if git history has it
	@if ! rev=$$(git rev-parse -q --verify '$(PREV_RELEASE)^{commit}' 2>/dev/null); then \
		echo "prev: commit $(PREV_RELEASE) is not in this clone's history (shallow?): TestRollingUpgrade SKIPS, rolling upgrades are NOT tested"; \
		rm -f bin/wgmesh-prev bin/wgmesh-prev.rev; exit 0; \
	fi; \
	if [ -x bin/wgmesh-prev ] && [ "$$(cat bin/wgmesh-prev.rev 2>/dev/null)" = "$$rev" ]; then exit 0; fi; \
	mkdir -p bin; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "prev: building the agent of $(PREV_RELEASE) into bin/wgmesh-prev"; \
	git archive "$$rev" | tar -x -C "$$tmp"; \
	(cd "$$tmp" && CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(PREV_RELEASE)" -o $(CURDIR)/bin/wgmesh-prev ./cmd/wgmesh); \
	echo "$$rev" > bin/wgmesh-prev.rev

# make soak runs mesh's randomized safety test (make test runs 3 seeds x
# 40 steps) for WGMESH_SOAK_STEPS steps from WGMESH_SOAK_SEED (default:
# from the clock, printed), bounded by SOAK_TIMEOUT, and writes
# bench/results/<time>-soak.md; the whole output goes to bin/soak.
# SOAK_FLAGS=-race adds the race detector.
WGMESH_SOAK_STEPS ?= 3000
WGMESH_SOAK_SEED ?=
SOAK_TIMEOUT ?= 60m
SOAK_FLAGS ?=
soak: lab ## the randomized safety test for thousands of steps; report in bench/results
	bin/wgmesh-lab soak -go $(GO) -steps $(WGMESH_SOAK_STEPS) -seed '$(WGMESH_SOAK_SEED)' -timeout $(SOAK_TIMEOUT) $(SOAK_FLAGS) -out bench/results

# make mutate checks the randomized safety test against deliberate bugs
# (test/mutate/mutations.txt): each is applied to a copy of the tree and
# must make the test fail on fixed seeds, with the default fault kinds or
# those its line names. Not part of make test.
MUTATE_SEEDS ?= 1 2 3
MUTATE_STEPS ?= 40
MUTATE_TIMEOUT ?= 300
mutate: ## the safety test must catch every deliberate bug of test/mutate
	GO=$(GO) MUTATE_SEEDS='$(MUTATE_SEEDS)' MUTATE_STEPS=$(MUTATE_STEPS) MUTATE_TIMEOUT=$(MUTATE_TIMEOUT) test/mutate/run.sh

bench: deps bench-agent lab bin/wireguard-go baseline ## benchmarks side by side; report in bench/results
	bin/wgmesh-lab bench -binary bin/wgmesh-bench -wireguard-go bin/wireguard-go $(BENCH_BASELINE) -out bench/results

bench-smoke: deps bench-agent lab bin/wireguard-go baseline bench-smoke-run ## one tiny case of every benchmark, so it cannot rot

bench-smoke-run:
	bin/wgmesh-lab bench -smoke -binary bin/wgmesh-bench -wireguard-go bin/wireguard-go $(BENCH_BASELINE) -out $$(mktemp -d)

clean:
	rm -rf bin
