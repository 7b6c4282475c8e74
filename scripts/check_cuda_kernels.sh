#!/usr/bin/env bash
# Checks clipft's CUDA kernels (src/model/cuda_kernels.cu) on the CPU: compiles them with g++
# against a CPU emulation of the CUDA features they use (scripts/cuda_emu/cuda_emu.h) and
# compares them with double-precision references. Needs g++ >= 12 (C++20), no GPU or CUDA.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
g++ -std=c++20 -O1 -pthread -Wall -Wno-unused-function -o "$OUT/check" \
  "$ROOT/scripts/cuda_emu/check_cuda_kernels.cpp"
"$OUT/check"
