#!/usr/bin/env bash
# Every benchmark run once on tiny inputs (the committed tiny checkpoint, a few images, one
# repetition), in the test profile: `cargo test --bench NAME` runs a harness-less bench's
# `main`. It catches a bench that no longer runs (a changed API, a refused input); nothing is
# timed or judged here. Speed is measured with `cargo bench` (README, "Speed").
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=tests/fixtures/tiny-clip
smoke() {
  local name=$1
  shift
  echo "bench smoke: $name"
  if ! out=$(env "$@" cargo test -q --bench "$name" 2>&1); then
    echo "$out" | tail -40
    echo "FAIL: benches/$name.rs did not run ($*)"
    exit 1
  fi
}
smoke extract CLIPFT_BENCH_MODEL=$tiny CLIPFT_BENCH_N=6 CLIPFT_BENCH_BATCH=4 CLIPFT_BENCH_TEXT_CLASSES=20
smoke fdalign CLIPFT_BENCH_MODEL=$tiny CLIPFT_BENCH_BATCH=2 CLIPFT_BENCH_STEPS=1
smoke tip CLIPFT_BENCH_REPEATS=1
smoke crossmodal CROSSMODAL_BENCH_ITERS=12
smoke layer_ops CLIPFT_BENCH_BATCH=1 CLIPFT_BENCH_REPS=1
smoke gemm CLIPFT_BENCH_ROWS=40 CLIPFT_BENCH_REPS=1
echo "bench smoke: all benches ran"
