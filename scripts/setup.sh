#!/usr/bin/env bash
# Installs what building and testing Busbar needs on a fresh machine of this kind (Debian, Rust
# toolchain present). Idempotent. Today that is nothing beyond the Rust toolchain: the protobuf
# compiler is protox (pure Rust, a build dependency), and sled/openraft/tonic are crates.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy 2>/dev/null || true
echo "setup: ok ($(cargo --version))"
