#!/usr/bin/env bash
# Installs what building and testing Busbar needs on a fresh machine of this kind (Debian, Rust
# toolchain present). Idempotent. Beyond the Rust toolchain: the protobuf compiler is protox (pure
# Rust, a build dependency), and sled/openraft/tonic are crates; the Jepsen suite (jepsen/run)
# needs iptables and nsenter (util-linux) on the host, installed here when missing.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy 2>/dev/null || true
missing=()
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]} (for jepsen/run)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: ${missing[*]} missing (jepsen/run needs them); install as root with apt-get" >&2
  fi
fi
echo "setup: ok ($(cargo --version))"
