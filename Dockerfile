# The Eddy host with the shipped plugins. Built by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
RUN cargo build --profile plugin --target wasm32-wasip2 \
        -p eddy-logger -p eddy-analytics -p eddy-alert -p eddy-fraud -p eddy-dashboard -p eddy-behaviour -p eddy-warehouse -p eddy-reducer \
 && cargo build --release -p eddy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/eddy /usr/local/bin/eddy
COPY --from=build /src/target/wasm32-wasip2/plugin/*.wasm /opt/eddy/plugins/
# Seed 004's tables (deploy/plugins.toml applies them at start: `migrate_on_start`).
COPY migrations /opt/eddy/migrations
EXPOSE 9464
ENTRYPOINT ["eddy"]
CMD ["run", "--config", "/etc/eddy/plugins.toml"]
