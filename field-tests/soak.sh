#!/usr/bin/env bash
# The long soak: a local cluster on the tiny model under bursty load from
# robots that hang up mid-answer, for SECONDS (default 600). Prints what
# happened and RSS per process; fails if a request was lost, duplicated or
# wrongly handled. The test suite runs a one-minute version.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/lime bench soak --seconds "${1:-600}"
