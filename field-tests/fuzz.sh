#!/usr/bin/env bash
# Fuzzes what strangers can send lime: request payloads (the `request` target)
# and data-plane frames (`frame`), each for SECONDS (default 60), starting from
# the seeds in schemas/fuzz/corpus and working in target/fuzz-corpus, with
# overflow checks on. Needs the nightly toolchain and cargo-fuzz (installed
# here when missing). A crash leaves its input in schemas/fuzz/artifacts/ and
# fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "field-tests/fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "field-tests/fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz
fi

for target in request frame; do
  work="target/fuzz-corpus/$target"
  mkdir -p "$work"
  cp -n schemas/fuzz/corpus/"$target"/* "$work"/ 2>/dev/null || true
  echo "field-tests/fuzz.sh: $target for ${seconds}s" >&2
  (cd schemas/fuzz && cargo +nightly fuzz run -O -a "$target" "../../$work" -- \
      -max_total_time="$seconds" -print_final_stats=1 2>&1) | grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|panicked|SUMMARY" || true
  if ls schemas/fuzz/artifacts/"$target"/crash-* >/dev/null 2>&1; then
    echo "field-tests/fuzz.sh: $target crashed; inputs in schemas/fuzz/artifacts/$target" >&2
    exit 1
  fi
done
echo "field-tests/fuzz.sh: no crashes" >&2
