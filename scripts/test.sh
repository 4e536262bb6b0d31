#!/usr/bin/env bash
# Runs every check: format, build, all tests (unit, golden, Kafka integration against
# real Kafka-protocol brokers started by testcontainers/). Installs what it needs first,
# idempotently. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

# librdkafka is vendored and built with its own configure script: it needs a C compiler,
# make, perl and zlib headers. Install them if missing (Debian/Ubuntu, as root or sudo).
missing=()
need cc || missing+=(build-essential)
need make || missing+=(make)
need perl || missing+=(perl)
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
need cargo || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

if need rustfmt; then
  cargo fmt --all -- --check
fi

start=$(date +%s)
cargo build --workspace --all-targets
echo "build: $(( $(date +%s) - start )) s"

start=$(date +%s)
cargo clippy --workspace --all-targets -- -D warnings
echo "clippy: $(( $(date +%s) - start )) s"

start=$(date +%s)
cargo test --workspace "$@"
echo "tests: $(( $(date +%s) - start )) s"
