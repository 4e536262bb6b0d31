#!/usr/bin/env bash
# Runs every check: format, build, all tests (unit, golden, Kafka integration against
# real Kafka-protocol brokers started by testcontainers/). Installs what it needs first,
# idempotently. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

# librdkafka is vendored and built with its own configure script: it needs a C compiler,
# make, perl, zlib headers, and OpenSSL (TLS, SASL/SCRAM, the registry client's HTTPS)
# found through pkg-config. Install them if missing (Debian/Ubuntu, as root or sudo).
missing=()
need cc || missing+=(build-essential)
need make || missing+=(make)
need perl || missing+=(perl)
need pkg-config || missing+=(pkg-config)
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
# The TLS test puts stunnel (a TLS terminator) in front of the embedded broker and makes
# its certificates with the openssl command.
need stunnel4 || need stunnel || missing+=(stunnel4)
need openssl || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
need cargo || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# tansu, a separate Kafka-compatible broker the tests also run against (produce, fetch,
# consumer groups, CreateTopics, SASL/SCRAM; no transactions). Built once into a cache
# outside the clone, about 10 minutes cold; LAMINAR_REQUIRE_TANSU makes its tests fail,
# rather than skip, if it is not there.
tools="${LAMINAR_TOOLS_DIR:-${HOME}/.cache/laminar-ci/tools}"
if ! [ -x "$tools/bin/tansu" ] && ! need tansu; then
  echo "installing tansu into $tools (once)"
  start=$(date +%s)
  CARGO_TARGET_DIR="$tools/build" cargo install tansu --version 0.6.0 --locked \
    --features dynostore,libsql --root "$tools"
  rm -rf "$tools/build"
  echo "tansu: $(( $(date +%s) - start )) s"
fi
export PATH="$tools/bin:$PATH"
export LAMINAR_REQUIRE_TANSU=1 LAMINAR_REQUIRE_TLS=1

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
