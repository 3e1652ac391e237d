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

.PHONY: test
test: test-unit ## Run every test tier that exists (unit)

.PHONY: test-unit
test-unit: ## Unit tests: pure logic, API schema and CEL rules, no root, no cluster
	$(CARGO) test --workspace --all-features

.PHONY: demo
demo: ## The main job: build kprof and show what it does today (see README)
	@echo "==> Building kprof"
	$(CARGO) build --workspace
	@echo
	@echo "==> Validating the example ProfilingTargets (crds/examples) against the generated CRD schema"
	$(CRDGEN) check crds/examples/*.yaml
	@echo
	@echo "==> Bad ProfilingTargets are refused, with a message naming the field (crds/tests/invalid)"
	@if $(CRDGEN) check crds/tests/invalid/*.yaml; then echo "error: a bad target was accepted"; exit 1; fi
	@echo
	@echo "Done. Next: 'make test' runs every test tier."
