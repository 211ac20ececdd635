#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each (FUZZ_SECONDS, default 60), starting
# from the seeds kept in fuzz/seeds/<target> (the corpus it grows stays in fuzz/corpus, out of git).
# Needs a nightly toolchain (libFuzzer's instrumentation); without one it says so and exits 0. Installs
# cargo-fuzz when it is missing. A crash fails the run; its input is in fuzz/artifacts/<target>/.
#
# Env: FUZZ_SECONDS, FUZZ_TARGETS (default: every target fuzz/Cargo.toml lists), FUZZ_SEED (default 1:
# the same inputs in the same order on every run, so CI does not fail on a finding no one has seen).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "scripts/fuzz.sh: no nightly toolchain here (rustup toolchain list); fuzzing skipped"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-$(sed -n 's/^name = "\([a-z_0-9]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^ebb-fuzz$')}
cd fuzz
# The patched h2 and hyper are path dependencies, whose lints cargo does not cap: h2 denies missing
# docs, and under `--cfg fuzzing` it compiles a module without them.
export RUSTFLAGS="${RUSTFLAGS:-} --cap-lints=warn"
cargo +nightly fuzz build >/dev/null 2>&1 || cargo +nightly fuzz build
for t in $targets; do
  mkdir -p "corpus/$t"
  echo "scripts/fuzz.sh: $t for ${seconds}s"
  # -rss_limit_mb: a leak or a blow-up is a finding too. -print_final_stats: executions and memory.
  log="../target/fuzz-$t.log"
  mkdir -p ../target
  failed=0
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -seed="${FUZZ_SEED:-1}" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || failed=1
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$log" || true
  if [ "$failed" = 1 ] || [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    tail -30 "$log" >&2
    echo "scripts/fuzz.sh: $t failed (log: target/fuzz-$t.log, inputs: fuzz/artifacts/$t/)" >&2
    exit 1
  fi
done
