#!/usr/bin/env bash
# Fetches Intel MKL's shared libraries from PyPI (the `mkl` wheel, no Python needed to use
# them) into DIR, for `CLIPFT_BLAS=DIR/libmkl_rt.so.3` (README: Model options).
#
#     scripts/fetch_mkl.sh DIR [VERSION]
#
# Only the libraries `cblas_sgemm` needs are kept (the runtime dispatcher, the LP64 interface,
# the core, the sequential layer and the per-CPU kernels): about 440 MB. A missing one is a
# fatal error inside MKL, which ends the process.
set -euo pipefail
dir=${1:?usage: scripts/fetch_mkl.sh DIR [VERSION]}
spec=mkl${2:+==$2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$spec"
wheel=$(ls "$tmp"/mkl-*.whl)
mkdir -p "$dir"
python3 - "$wheel" "$dir" <<'PY'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
keep = ("libmkl_rt.", "libmkl_intel_lp64.", "libmkl_core.", "libmkl_sequential.", "libmkl_def.", "libmkl_mc3.",
        "libmkl_avx2.", "libmkl_avx512.", "libmkl_avx10.")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if "/data/lib/" in name and base.startswith(keep):
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
PY
echo "$dir/libmkl_rt.so.3"
