# blobmgr: the two commands of the README are `make run` and `make test`.
CARGO ?= cargo

.PHONY: all build run test setup lint fmt bench soak clean

all: build

build:
	$(CARGO) build --release

# The daemon on its embedded default: backend directory ./blobs (created,
# with one sample blob), work dir ./.blobmgr/work, socket ./.blobmgr/blobmgr.sock.
run: build
	@mkdir -p blobs
	@[ -e blobs/hello ] || printf 'hello from blobmgr\n' > blobs/hello
	./target/release/blobmgr serve

setup:
	bash scripts/setup-test-deps.sh

# What CI runs (.ci/run): dependencies, lints, then the whole test suite.
test: setup lint
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

# Criterion, then the scenarios of docs/PERFORMANCE.md (installs the
# registry scenario's tools first when missing).
bench:
	bash scripts/setup-test-deps.sh bench
	$(CARGO) bench
	bash scripts/bench.sh

soak:
	$(CARGO) test --release --test soak -- --ignored --nocapture

clean:
	$(CARGO) clean
