#!/usr/bin/env bash
# lime's whole test suite. Sets up the Python packages that the reference tests
# compare against in a virtualenv under target/, then runs every crate's tests in
# release (numerics are too slow unoptimised). Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/py
if [ ! -x "$venv/bin/python" ]; then
  echo "field-tests/test.sh: creating $venv" >&2
  python3 -m venv "$venv" || {
    echo "field-tests/test.sh: python3 cannot make a virtualenv; install python3-venv (Debian) and retry" >&2
    exit 1
  }
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r field-tests/requirements.txt
export LIME_PYTHON="$PWD/$venv/bin/python"
log=target/test.log
cargo test --release --workspace "$@" 2>&1 | tee "$log"
# cargo prints one result line per test binary; end with the totals.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
