# Multi-stage build: compile with the full toolchain, run on a slim image as non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends zlib1g-dev libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --bin laminar && strip target/release/laminar

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/laminar laminar \
    && mkdir -p /var/lib/laminar && chown laminar /var/lib/laminar
COPY --from=build /src/target/release/laminar /usr/local/bin/laminar
USER laminar
WORKDIR /var/lib/laminar
VOLUME ["/pipelines", "/var/lib/laminar"]
EXPOSE 9464
ENTRYPOINT ["laminar"]
CMD ["--help"]
