# The two commands a new user needs:
#   make run    build the plugins and the host, then run the shipped plugins.toml
#   make test   build everything and run every test
# Both install the wasm32-wasip2 Rust target first if it is missing.

PLUGINS := eddy-logger eddy-analytics eddy-alert eddy-fraud eddy-fixture-misbehave
CARGO ?= cargo

.PHONY: run test plugins target check lint bench-reload bench-state

run: plugins
	$(CARGO) run --release -p eddy -- run --config plugins.toml

test: target
	$(CARGO) test --workspace

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
