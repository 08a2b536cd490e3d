#!/usr/bin/env bash
# lime's whole test suite. Sets up what the tests use besides Rust: the Python
# packages the reference tests compare against (a virtualenv under target/) and
# mosquitto with its command-line clients (the MQTT tests run real robots' tools
# and an external broker), systemd-analyze (the unit files are verified) and
# openssl (the TLS test makes its certificates).
# Builds every binary, since the cluster tests start
# lime-broker and lime-stage processes, then runs every crate's tests in release
# (numerics are too slow unoptimised). Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in mosquitto mosquitto_pub mosquitto_sub stdbuf systemd-analyze openssl; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "field-tests/test.sh: installing mosquitto, mosquitto-clients, systemd (systemd-analyze) and openssl (test certificates)" >&2
    apt-get update -q && apt-get install -y -q mosquitto mosquitto-clients coreutils systemd openssl
  else
    echo "field-tests/test.sh: missing ${missing[*]}; install the Debian packages mosquitto, mosquitto-clients, systemd and openssl" >&2
    exit 1
  fi
fi

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

cargo build --release --workspace --bins
log=target/test.log
status=0
cargo test --release --workspace "$@" 2>&1 | tee "$log" || status=$?
# cargo prints one result line per test binary; end with the totals.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
