#!/usr/bin/env bash
# How much a write into pages the machine has not touched yet costs against a write over cached
# pages: 1000 MiB into a new file, then the same over that file's cached pages. On VMs whose balloon
# reports freed guest pages to the host, the first is many times slower (docs/benchmarks.md, the
# seventh session's "Latest": why 1 KiB batched stays far from 5x).
#
#   bash benches/page-touch.sh [DIR]      # DIR defaults to the repository's target/
set -euo pipefail
dir=${1:-$(cd "$(dirname "$0")/.." && pwd)/target}
mkdir -p "$dir"
f="$dir/page-touch.$$"
trap 'rm -f "$f"' EXIT
echo -n "new file:      "; dd if=/dev/zero of="$f" bs=1M count=1000 2>&1 | tail -1
echo -n "cached pages:  "; dd if=/dev/zero of="$f" bs=1M count=1000 conv=notrunc 2>&1 | tail -1
