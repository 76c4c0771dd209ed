# The two commands a new user needs:
#   make run    build the plugins and the host, then run the shipped plugins.toml
#   make test   build everything and run every test
# Both install the wasm32-wasip2 Rust target first if it is missing.

PLUGINS := eddy-logger eddy-analytics eddy-alert eddy-fraud eddy-dashboard eddy-behaviour eddy-warehouse eddy-reducer eddy-fixture-misbehave eddy-fixture-wrong-world eddy-fixture-old-contract eddy-fixture-noop eddy-fixture-echo
CARGO ?= cargo

.PHONY: run test test-loaded tansu promtool browser postgres plugins target check lint bench-reload bench-state bench-throughput bench-dispatch bench-plugins bench-memory bench-peer bench-isolation bench-postgres bench-scale-out soak fuzz

run: plugins
	$(CARGO) run --release -p eddy -- run --config plugins.toml

test: target tansu promtool browser postgres
	EDDY_TANSU=$(TANSU) $(CARGO) test --workspace --no-fail-fast

# The test binaries whose verdicts wait on time (bursts, restarts, rebalances, retries), run
# again with one core kept busy by a loop: a verdict that leans on this machine's speed
# shows up here, not on a slower machine of a user's. CI runs it after `make test`.
LOADED_TESTS := live hardening hot_reload collector durable seed002 shared_fetch real_broker
test-loaded: target tansu promtool browser postgres
	@sh -c 'while :; do :; done' & busy=$$!; trap "kill $$busy" EXIT INT TERM HUP; \
	echo "one core kept busy (pid $$busy) while these run: $(LOADED_TESTS)"; \
	EDDY_TANSU=$(TANSU) $(CARGO) test -p eddy --no-fail-fast $(addprefix --test ,$(LOADED_TESTS))

# tansu, a Kafka-protocol broker that stores in SQLite, for the real-broker tests
# (host/tests/real_broker.rs). Built once (~25 min on 2 cores) into a directory outside the
# clone that later runs reuse; TANSU=/path/to/tansu uses another build.
TANSU_VERSION := 0.6.0
TANSU_ROOT ?= $(HOME)/.cache/eddy/tansu-$(TANSU_VERSION)
TANSU ?= $(TANSU_ROOT)/bin/tansu

tansu:
	@if [ -x "$(TANSU)" ]; then echo "tansu: $(TANSU)"; else \
	  echo "building tansu $(TANSU_VERSION) for the real-broker tests (once; ~25 min on 2 cores) into $(TANSU_ROOT)"; \
	  $(CARGO) install tansu --version $(TANSU_VERSION) --locked --features libsql,dynostore \
	    --root $(TANSU_ROOT) --target-dir $(TANSU_ROOT)/build && rm -rf $(TANSU_ROOT)/build; \
	fi

# $(call debian,PACKAGES,WHAT FOR): installs Debian packages when running as root on Debian
# (as CI does), else says how and fails.
debian = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's $(1): $(2)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null; \
	else \
	  echo "make test needs $(2): sudo apt-get install $(1)"; exit 1; \
	fi

# promtool, which the HTTP tests check /metrics with: Debian's prometheus package, installed
# here when running as root on Debian (as CI does), else the message says how.
promtool:
	@command -v promtool >/dev/null || { $(call debian,prometheus,promtool (the /metrics format check)); }

# Headless Chromium and chromedriver, which the web dashboard's test drives: Debian's chromium
# and chromium-driver packages, installed here when running as root on Debian (as CI does).
browser:
	@command -v chromedriver >/dev/null && command -v chromium >/dev/null || { \
	  $(call debian,chromium chromium-driver,a headless browser for the dashboard's test); }

# PostgreSQL 15, which the PostgreSQL output tests (host/tests/postgres.rs) start in a
# temporary directory: Debian's postgresql package, installed here when running as root on
# Debian (as CI does). Its own server is not started (the package's service is not needed).
PG_BIN ?= /usr/lib/postgresql/15/bin
postgres:
	@[ -x "$(PG_BIN)/initdb" ] || { $(call debian,postgresql,PostgreSQL 15 for the PostgreSQL output tests); }

# The plugins, as WebAssembly components, in target/wasm32-wasip2/plugin/.
plugins: target
	$(CARGO) build --profile plugin --target wasm32-wasip2 $(addprefix -p ,$(PLUGINS))

target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

check: plugins
	$(CARGO) run -p eddy -- check --config plugins.toml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Hot-swap latency and the stall it causes in another plugin (release build).
bench-reload: plugins
	$(CARGO) bench -p eddy --bench reload

# Throughput with durable state against state in memory (release build).
bench-state: plugins
	$(CARGO) bench -p eddy --bench state

# End-to-end throughput of the four plugins in the host against the same logic compiled
# natively, on the same broker and events (EDDY_BENCH_EVENTS, default 1,000,000).
bench-throughput: plugins
	$(CARGO) bench -p eddy --bench throughput

# Per-event cost of the sandbox: a no-op plugin against the same code natively.
bench-dispatch: plugins
	$(CARGO) bench -p eddy --bench dispatch

# Each shipped plugin's own cost in the sandbox against natively, without Kafka
# (EDDY_BENCH_PLUGIN=<name> for one, e.g. under perf with EDDY_PERFMAP=1).
bench-plugins: plugins
	$(CARGO) bench -p eddy --bench plugins

# The four shipped plugins in the host against the same jobs as Python consumer scripts
# (benches/peer/jobs.py, confluent-kafka in a venv it makes), on the same broker and events
# (EDDY_BENCH_EVENTS, default 200,000).
bench-peer: plugins
	$(CARGO) bench -p eddy --bench peer

# The four shipped plugins' pace beside plugins that panic, loop, eat memory and retry forever,
# against their pace beside the same plugins behaving.
bench-isolation: plugins
	$(CARGO) bench -p eddy --bench isolation

# PostgreSQL outputs: insert_if_absent / upsert against plain appends, and the warehouse
# plugin end to end against its outputs discarded (a real PostgreSQL 15 in a temp dir).
bench-postgres: plugins postgres
	$(CARGO) test -p eddy --test postgres -- --ignored --nocapture benchmark_

# Scaling out: changelog records/s restored by a new host, and the time from a
# host's SIGKILL to its partitions handled elsewhere (session timeout + restore).
bench-scale-out: plugins postgres
	$(CARGO) test -p eddy --test scale_out benchmark_restore_and_failover -- --ignored --nocapture

# Resident memory of the host with the four plugins, and per additional plugin.
bench-memory: plugins
	$(CARGO) bench -p eddy --bench memory

# Millions of distinct users through the shipped plugins.toml, hours of event time in minutes:
# state size and resident memory sampled every 15 s must level off (EDDY_SOAK_SECONDS, 240).
soak: plugins
	$(CARGO) bench -p eddy --bench soak

# Fuzz the event decoding (SDK parser + the four plugins) and plugins.toml parsing for
# FUZZ_SECONDS each, from the seeds (corpus/malformed/, fuzz/seeds/, the plugins.toml files).
# Fails on a crash, whose input lands in fuzz/artifacts/<target>/: reproduce it with
# `cargo fuzz run --sanitizer none <target> <file>`. `--sanitizer none` is what lets cargo-fuzz
# run on stable Rust (its default, ASan, needs the nightly-only -Zsanitizer). Builds, corpora and
# logs go to FUZZ_TARGET_DIR, under CARGO_TARGET_DIR when that is set (as in CI).
FUZZ_SECONDS ?= 30
FUZZ_TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)/fuzz
FUZZ_TARGETS := event_decode config_parse
FUZZ := $(CARGO) fuzz run --sanitizer none --target-dir $(FUZZ_TARGET_DIR)

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	$(CARGO) fuzz build --sanitizer none --target-dir $(FUZZ_TARGET_DIR)
	rm -rf $(FUZZ_TARGET_DIR)/corpus
	mkdir -p $(addprefix $(FUZZ_TARGET_DIR)/corpus/,$(FUZZ_TARGETS))
	cp corpus/malformed/* fuzz/seeds/event_decode/* $(FUZZ_TARGET_DIR)/corpus/event_decode/
	cp plugins.toml $(FUZZ_TARGET_DIR)/corpus/config_parse/plugins.toml
	cp deploy/plugins.toml $(FUZZ_TARGET_DIR)/corpus/config_parse/deploy-plugins.toml
	@for t in $(FUZZ_TARGETS); do \
	  log=$(FUZZ_TARGET_DIR)/$$t.log; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s (full output: $$log)"; \
	  if $(FUZZ) $$t $(FUZZ_TARGET_DIR)/corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=10 -dict=fuzz/$$t.dict >$$log 2>&1; then \
	    grep -E '^#[0-9]+[[:space:]]+DONE' $$log; \
	  else \
	    grep -Ev '^#[0-9]+[[:space:]]+(NEW|REDUCE|RELOAD|pulse)' $$log; exit 1; \
	  fi; \
	done
