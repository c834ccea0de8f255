#!/usr/bin/env bash
# The one command that answers "is it done?": format, lints, every test, and a benchmark
# smoke run. CI runs exactly this (.ci/run), and README.md names it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Enough model-test cases to matter, few enough for CI (raise it locally to hunt).
export PHXQ_MODEL_CASES="${PHXQ_MODEL_CASES:-256}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# README's first command must name one binary: `cargo run` at the root runs phxq.
cargo run --release --locked -- --version >/dev/null
# A short benchmark run proves the bench command works end to end; figures live in BENCHMARKS.md.
cargo run --release --locked -p phxq -- bench wal --writers 1,16 --seconds 1 --raw-seconds 1 >/dev/null
cargo run --release --locked -p phxq -- bench wal --writers 4 --writers-as threads --seconds 1 --raw-seconds 1 >/dev/null
echo "all checks passed"
