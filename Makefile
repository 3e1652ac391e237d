# kprof — every everyday command. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
CRD_DIRS := crds charts/kprof/crds
CRDGEN := $(CARGO) run --quiet -p kprof-crds --features validate --bin crdgen --

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build every crate (debug)
	$(CARGO) build --workspace

.PHONY: crds
crds: ## Regenerate the CRD YAML (crds/ and the chart) from the Rust API types
	$(CRDGEN) write $(CRD_DIRS)

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

.PHONY: deps
deps: ## Install what a fresh machine lacks: apt packages, the eBPF toolchain, Kubernetes binaries, MinIO, fake-gcs-server, Azurite, a collector, an image registry, CPython 3.14, NumPy for the tests' Pythons
	e2e/testbed/install-deps.sh
	agent/install-toolchain.sh
	e2e/testbed/build-binaries.sh
	e2e/testbed/build-s3.sh
	e2e/testbed/build-gcs.sh
	e2e/testbed/install-azurite.sh
	e2e/testbed/build-otelcol.sh
	e2e/testbed/build-registry.sh
	e2e/testbed/build-cpython.sh
	e2e/testbed/install-pylibs.sh

.PHONY: test
# `deps` built MinIO, fake-gcs-server, Azurite and the collector: their store tests must run,
# not skip (also when test-unit is reached through this target; `make test-unit` alone skips
# them loudly).
test: export KPROF_REQUIRE_S3 := 1
test: export KPROF_REQUIRE_GCS := 1
test: export KPROF_REQUIRE_AZURE := 1
test: export KPROF_REQUIRE_OTELCOL := 1
test: deps test-unit fuzz-ci test-kernel test-cluster ## Run every test tier (needs root for the kernel and cluster tiers)

.PHONY: test-unit
test-unit: ## Unit and in-process tests: pure logic, API schema and CEL, store, CLI errors; no root
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test -p kprof-crds --test '*'
	$(CARGO) test -p kprof-store --test '*'
	$(CARGO) test -p kprof-agent --test cli
	@# kubectl-kprof is a client: it must not link the store's server side.
	@if $(CARGO) tree -p kprof-plugin -e normal --prefix none | grep -E '^(axum|object_store|opentelemetry-proto|reqwest|kprof-store) '; then \
		echo "kprof-plugin links the store's server side (above)"; exit 1; fi

.PHONY: fuzz fuzz-ci
FUZZ_SECONDS ?= 300
fuzz: ## Fuzz every parser of untrusted input for FUZZ_SECONDS each (default 300; nightly, cargo-fuzz)
	fuzz/run.sh $(FUZZ_SECONDS)

fuzz-ci: ## The short fuzzing run of make test: every target, 20 s each, on its committed seeds
	fuzz/run.sh 20

.PHONY: test-kernel
test-kernel: ## The real eBPF sampler on this kernel (root): C, Rust and CPython 3.8-3.14 workloads, code without frame pointers, memory
	KPROF_REQUIRE_KERNEL=1 KPROF_REQUIRE_PYTHON_MINORS=8,9,10,11,12,13,14 $(CARGO) test -p kprof-agent --test kernel --test python_walker --test python_threads --test python_kernel --test native_unwind --test python_memory --test python_alloc_probes -- --test-threads=1

.PHONY: test-cluster
test-cluster: ## Operator, agent and store against the real test bed (started and stopped if not running)
	e2e/cluster-tests.sh

.PHONY: cluster-up
cluster-up: ## Start the single-node test cluster (builds the Kubernetes binaries on first use)
	e2e/testbed/install-deps.sh
	e2e/testbed/build-binaries.sh
	e2e/testbed/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the test cluster and everything it started
	e2e/testbed/down.sh

.PHONY: images images-debug chart
images: ## Release images of the operator (with the store) and the agent, tagged with the version, in target/images (imported into the test bed when it runs)
	e2e/testbed/build-images.sh

images-debug: ## The same images from debug builds, tagged VERSION-debug (install with --set operator.image.tag=...,agent.image.tag=...)
	e2e/testbed/build-images.sh --debug

chart: ## Package the Helm chart: target/chart/kprof-VERSION.tgz
	e2e/testbed/package-chart.sh

.PHONY: bench
bench: ## Benchmarks, side by side with perf and py-spy (root; prints figures, asserts nothing): CPU sampling, start-up, off-CPU, threads, memory (against tracemalloc and memray), native unwinding, Python, the agent daemon on the test bed, store
	agent/bench/overhead.sh
	agent/bench/startup.sh
	agent/bench/offcpu.sh
	agent/bench/threads.sh
	agent/bench/memory.sh
	agent/bench/unwind.sh
	agent/bench/shop.sh
	agent/bench/daemon.sh
	command -v py-spy >/dev/null || python3 -m pip install --quiet py-spy
	agent/bench/python-vs-pyspy.sh
	$(CARGO) run --release -p kprof-store --bin kprof-store-bench -- --uploaders 100 --profiles 3000
	. e2e/testbed/env.sh && e2e/testbed/up.sh && $(CARGO) run --release -p kprof-e2e --bin kprof-operator-bench

.PHONY: demo
demo: ## The main job: the user journey on a local cluster (see README)
	e2e/demo/demo.sh

.PHONY: validate-examples
validate-examples: ## Validate crds/examples against the generated schema; show bad targets refused
	$(CRDGEN) check crds/examples/*.yaml
	@if $(CRDGEN) check crds/tests/invalid/*.yaml; then echo "error: a bad target was accepted"; exit 1; fi
