#!/usr/bin/env bash
# GPU side-by-side: clipft (CUDA build) vs PyTorch + transformers on the same random ViT-B/32,
# same JPEGs, same GPU, in one run. Meant for the lent GPU machine, which has PyTorch but no Rust:
#
#   here:  rm -rf .gpu && CARGO_FEATURES=cuda OUT_DIR=.gpu \
#              CARGO_BUILD_ARGS="--bin clipft --bench extract --bench fdalign --bench layer_ops --bench gemm --test cuda" \
#              ../shared/gpu/build-cuda.sh .       (with nasm installed: SIMD JPEG decoding)
#          tar -cf - .gpu | xz -T2 > .gpu.tar.xz   (the six binaries are ~170 MB, over the device
#                                             tool's 64 MiB carry limit; packed ~55 MB)
#   there: tar -xJf .gpu.tar.xz && scripts/bench_gpu.sh .gpu
#                                            (BIN_DIR holds clipft, extract, fdalign, layer_ops,
#                                             cuda (the test), gemm for CPU=1; cargo's hash
#                                             suffixes are fine)
#
# Prints, per dtype (f32, bf16, f16): decode+preprocess, model-only and end-to-end images/s and
# text prompts/s for both, with ratios; then clipft's CUDA features against transformers' f32
# features (cosine); then one FD-Align training step (f32 vs PyTorch f32 and bf16 autocast).
# clipft's own CUDA kernels (src/model/cuda_kernels.cu; CLIPFT_CUDA_KERNELS=1) are first checked
# against the CPU path by the `cuda` test binary; the comparison with PyTorch runs with them on
# (KERNELS=0: off), then model-only is repeated with them off, and the features check covers both.
# Env: IMAGES (2048), BATCH (256), THREADS (all cores), PASSES (10), WORK (a temp dir),
# DTYPES ("f32 bf16 f16"), LAYERS=0 / FDALIGN=0 to skip those parts; CPU=1 first checks the
# host CPU's kernels (AMX where the CPU has it: the GEMM rates with and without AMX, and
# clipft --dtype bf16 and f32 against PyTorch on the CPU, 256 images), and CPU=only stops there.
set -euo pipefail
BIN=$(cd "${1:?usage: bench_gpu.sh BIN_DIR}" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGES=${IMAGES:-2048}
BATCH=${BATCH:-256}
THREADS=${THREADS:-$(nproc)}
PASSES=${PASSES:-10}
WORK=${WORK:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
NV=$(python3 -c 'import nvidia; print(nvidia.__path__[0])' 2>/dev/null || true)
[ -n "$NV" ] && export LD_LIBRARY_PATH=$NV/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cd "$ROOT"
# Binaries as build-cuda.sh copies them (name-<hash>) are found under their plain names.
for n in clipft extract fdalign layer_ops gemm cuda; do
  if [ ! -e "$BIN/$n" ]; then
    f=$(ls "$BIN/$n"-* 2>/dev/null | head -1 || true)
    if [ -n "$f" ]; then ln -sf "$(basename "$f")" "$BIN/$n"; fi
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ "${CPU:-0}" != 0 ]; then
  echo "== host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $THREADS threads," \
    "flags: $(grep -m1 -o -w -E 'amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  RAYON_NUM_THREADS=$THREADS CLIPFT_BENCH_REPS=5 "$BIN/gemm" || echo "gemm bench failed"
  CLIPFT_NO_AMX=1 RAYON_NUM_THREADS=$THREADS CLIPFT_BENCH_REPS=5 "$BIN/gemm" || echo "gemm bench failed"
  for dt in bf16 f32; do
    python3 scripts/bench_vs_pytorch.py --device cpu --dtype $dt --batch 32 --threads "$THREADS" \
      --images 256 --text-classes 20 --bench-bin "$BIN/extract" --workdir "$WORK/cpu" || echo "CPU $dt failed"
  done
  [ "$CPU" = only ] && exit 0
fi

export CLIPFT_CUDA_KERNELS=${KERNELS:-1}
if [ -x "$BIN/cuda" ]; then
  echo "== clipft CUDA features vs its CPU f32 path, clipft's CUDA kernels off and on"
  "$BIN/cuda" --nocapture --test-threads 1 || echo "CUDA feature test failed"
fi

for dt in ${DTYPES:-f32 bf16 f16}; do
  echo "== image + text features, $dt, batch $BATCH, $THREADS threads, CLIPFT_CUDA_KERNELS=$CLIPFT_CUDA_KERNELS"
  python3 scripts/bench_vs_pytorch.py --device cuda --dtype "$dt" --batch "$BATCH" --threads "$THREADS" \
    --images "$IMAGES" --passes "$PASSES" --text-classes 20 --bench-bin "$BIN/extract" --workdir "$WORK"
done

if [ "$CLIPFT_CUDA_KERNELS" = 1 ]; then
  echo "== clipft alone with its CUDA kernels off (candle's ops), for comparison"
  for dt in ${DTYPES:-f32 bf16 f16}; do
    CLIPFT_CUDA_KERNELS=0 CLIPFT_BENCH_MODEL=$WORK/vit-b32 CLIPFT_BENCH_IMAGES=$WORK/images \
      CLIPFT_BENCH_BATCH=$BATCH CLIPFT_BENCH_DTYPE=$dt CLIPFT_BENCH_DEVICE=cuda \
      CLIPFT_BENCH_PASSES=$PASSES CLIPFT_BENCH_TEXT_CLASSES=20 RAYON_NUM_THREADS=$THREADS \
      "$BIN/extract" | sed "s/^/$dt kernels off: /" || echo "extract $dt failed"
  done
fi

[ "${LAYERS:-1}" = 0 ] || echo "== one ViT-B/32 encoder layer, op by op, batch $BATCH"
[ "${LAYERS:-1}" = 0 ] || for dt in f32 bf16; do
  CLIPFT_BENCH_DEVICE=cuda CLIPFT_BENCH_DTYPE=$dt CLIPFT_BENCH_BATCH=$BATCH "$BIN/layer_ops" || true
done

echo "== clipft CUDA features vs transformers f32 (first 256 images)"
DS=$WORK/ds
mkdir -p "$DS/train/a"
for f in $(cd "$WORK/images" && ls | sort | head -256); do ln -sf "$WORK/images/$f" "$DS/train/a/$f"; done
for k in 0 1; do
  for dt in f32 bf16 f16; do
    CLIPFT_CUDA_KERNELS=$k "$BIN/clipft" features -q --model "$WORK/vit-b32" --data "$DS" --split train \
      --device cuda --dtype "$dt" --batch-size 64 --no-cache --out "$WORK/feat-$dt-k$k.safetensors" \
      || echo "clipft features $dt kernels $k failed"
  done
done
python3 - "$WORK" <<'EOF' || echo "feature check failed"
import sys
from pathlib import Path
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPModel
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
w = Path(sys.argv[1])
paths = sorted((w / "ds/train/a").iterdir())
model = CLIPModel.from_pretrained(w / "vit-b32").eval().cuda()
proc = CLIPImageProcessor.from_pretrained(w / "vit-b32")
with torch.inference_mode():
    feats = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output
    ref = torch.cat([feats(model.get_image_features(pixel_values=proc(images=[Image.open(p) for p in paths[i:i + 64]],
                                                                    return_tensors="pt")["pixel_values"].cuda()))
                     for i in range(0, len(paths), 64)])
ref = torch.nn.functional.normalize(ref.float(), dim=-1).cpu()
for k in (0, 1):
    for dt in ("f32", "bf16", "f16"):
        p = w / f"feat-{dt}-k{k}.safetensors"
        if not p.exists():
            print(f"clipft cuda {dt:4} kernels {k}: no features")
            continue
        f = load_file(p)["image_features"].float()
        cos = (f * ref).sum(-1)
        print(f"clipft cuda {dt:4} kernels {k} vs transformers f32: rows {len(f)}, min cosine {cos.min():.6f}, "
              f"mean cosine {cos.mean():.6f}, max abs diff {(f - ref).abs().max():.2e}")
EOF

[ "${FDALIGN:-1}" = 0 ] && exit 0
echo "== FD-Align training step, batch $BATCH"
python3 scripts/bench_fdalign_vs_pytorch.py --device cuda --batch "$BATCH" --steps 5 --threads "$THREADS" \
  --model "$WORK/vit-b32" --bench-bin "$BIN/fdalign"
for amp in bf16 f16; do
  python3 scripts/bench_fdalign_vs_pytorch.py --device cuda --batch "$BATCH" --steps 5 --threads "$THREADS" \
    --model "$WORK/vit-b32" --bench-bin "$BIN/fdalign" --autocast $amp
done
if [ "$CLIPFT_CUDA_KERNELS" = 1 ]; then
  echo "== FD-Align step, bf16, clipft's kernels (layer norm) off"
  CLIPFT_CUDA_KERNELS=0 python3 scripts/bench_fdalign_vs_pytorch.py --device cuda --batch "$BATCH" --steps 5 \
    --threads "$THREADS" --model "$WORK/vit-b32" --bench-bin "$BIN/fdalign" --autocast bf16
fi
