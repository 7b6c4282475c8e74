#!/usr/bin/env python3
"""Image-feature throughput: clipft vs Hugging Face transformers, same checkpoint, images, threads.

    python3 scripts/bench_vs_pytorch.py [--threads 2] [--images 256] [--batch 32] [--dtype f32]

Builds one random ViT-B/32 CLIPModel with transformers (saved as safetensors), writes a folder
of 500x375 JPEGs cut from the photos in tests/fixtures/preprocess, times transformers
(decode+preprocess with CLIPImageProcessor, get_image_features, and end to end with a DataLoader),
then runs `cargo bench --bench extract` on the same files and prints both with the ratio.
Needs: torch, transformers, pillow (for this comparison only; clipft itself never needs Python).
"""
import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(d: Path):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPImageProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                         # the tiny tokenizer copied below: its start/end tokens
                         bos_token_id=1512, eos_token_id=1513, pad_token_id=1513),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512,
    )
    CLIPModel(cfg).eval().save_pretrained(d, safe_serialization=True)
    CLIPImageProcessor().save_pretrained(d)
    shutil.copy(ROOT / "configs/tiny-tokenizer.json", d / "tokenizer.json")


def make_images(d: Path, n: int):
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(ROOT / f"tests/fixtures/preprocess/photo{i}.jpg").convert("RGB") for i in (1, 2)]
    rng = random.Random(0)
    for i in range(n):
        src = photos[i % 2]
        w, h = rng.randint(src.width // 2, src.width), rng.randint(src.height // 2, src.height)
        x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
        src.crop((x, y, x + w, y + h)).resize((500, 375), Image.BILINEAR).save(d / f"{i:04d}.jpg", quality=90)


def bench_transformers(model_dir: Path, image_dir: Path, threads: int, batch: int, dtype: str):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    torch.set_num_threads(threads)
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    model = CLIPModel.from_pretrained(model_dir, torch_dtype=tdtype).eval()
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    paths = sorted(image_dir.glob("*.jpg"))
    n = len(paths)

    def prep(p):
        return proc(images=Image.open(p), return_tensors="pt")["pixel_values"][0]

    # Decode + preprocess, one process per thread (as a DataLoader with that many workers would).
    ds = [str(p) for p in paths]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return prep(ds[i])

    loader = lambda: torch.utils.data.DataLoader(DS(), batch_size=batch, num_workers=threads)
    t = time.perf_counter()
    pix = torch.cat([b for b in loader()])
    pre = n / (time.perf_counter() - t)

    with torch.inference_mode():
        batches = [pix[i:i + batch].to(tdtype) for i in range(0, n - batch + 1, batch)]
        model.get_image_features(pixel_values=batches[0])
        t = time.perf_counter()
        for b in batches:
            model.get_image_features(pixel_values=b)
        mod = len(batches) * batch / (time.perf_counter() - t)
        t = time.perf_counter()
        for b in loader():
            model.get_image_features(pixel_values=b.to(tdtype))
        e2e = n / (time.perf_counter() - t)
    return pre, mod, e2e


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--workdir", help="keep the checkpoint and images here (default: a temp dir)")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="clipft-bench-"))
    model_dir, image_dir = work / "vit-b32", work / "images"
    if not (model_dir / "model.safetensors").exists():
        make_checkpoint(model_dir)
    if not image_dir.exists():
        make_images(image_dir, args.images)

    import torch
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch}, {args.dtype}")
    pre, mod, e2e = bench_transformers(model_dir, image_dir, args.threads, args.batch, args.dtype)
    print(f"transformers  decode+preprocess {pre:8.1f} img/s   model {mod:8.1f} img/s   end to end {e2e:8.1f} img/s")

    env = dict(os.environ, CLIPFT_BENCH_MODEL=str(model_dir), CLIPFT_BENCH_IMAGES=str(image_dir),
               CLIPFT_BENCH_BATCH=str(args.batch), CLIPFT_BENCH_DTYPE=args.dtype,
               RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run(["cargo", "bench", "--bench", "extract"], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    print(out.stdout.strip())
    nums = dict(re.findall(r"^\s+(decode\+preprocess|model|end to end)\s+([\d.]+)", out.stdout, re.M))
    c = [float(nums[k]) for k in ("decode+preprocess", "model", "end to end")]
    print(f"ratio clipft/transformers: decode+preprocess {c[0] / pre:.2f}x   model {c[1] / mod:.2f}x   "
          f"end to end {c[2] / e2e:.2f}x")


if __name__ == "__main__":
    main()
