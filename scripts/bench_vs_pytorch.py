#!/usr/bin/env python3
"""Image-feature throughput: clipft vs Hugging Face transformers, same checkpoint, images, threads.

    python3 scripts/bench_vs_pytorch.py [--threads 2] [--images 256] [--batch 32] [--dtype f32]
        [--device cpu|cuda] [--passes 1] [--text-classes 20] [--bench-bin PATH] [--features F] [--repeat 1]

Builds one random ViT-B/32 CLIPModel with transformers (saved as safetensors), writes a folder
of 500x375 JPEGs cut from the photos in tests/fixtures/preprocess, times transformers
(decode+preprocess with CLIPImageProcessor, get_image_features, end to end with a DataLoader of
--threads workers, and a class-name x 80-template text classifier encoded class by class),
then runs `cargo bench --bench extract` (or a prebuilt bench binary, --bench-bin, e.g. on the
GPU machine) on the same files and prints both with the ratio.
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


PARTS = ["golden", "retriever", "sports car", "tabby", "cat", "maple", "leaf", "aircraft carrier"]


def class_name(i: int) -> str:
    """The same made-up class names as benches/extract.rs (distinct for i < 64)."""
    return f"{PARTS[i % 8]} {PARTS[(i // 8 + i * 3 + 1) % 8]}"


def imagenet80():
    return [l.rstrip("\n") for l in open(ROOT / "configs/templates/imagenet80.txt") if l.strip()]


def feats(out):
    """get_*_features: a tensor in transformers 4, an output with pooler_output in 5."""
    import torch
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def bench_transformers(model_dir: Path, image_dir: Path, threads: int, batch: int, dtype: str,
                       device: str = "cpu", passes: int = 1, text_classes: int = 20):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    if device == "cpu":
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    model = CLIPModel.from_pretrained(model_dir, torch_dtype=tdtype).eval().to(device)
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
        batches = [pix[i:i + batch].to(device=device, dtype=tdtype) for i in range(0, n - batch + 1, batch)]
        model.get_image_features(pixel_values=batches[0])
        sync()
        t = time.perf_counter()
        for _ in range(passes):
            for b in batches:
                model.get_image_features(pixel_values=b)
        sync()
        mod = passes * len(batches) * batch / (time.perf_counter() - t)
        t = time.perf_counter()
        for b in loader():
            model.get_image_features(pixel_values=b.to(device=device, dtype=tdtype))
        sync()
        e2e = n / (time.perf_counter() - t)

        text = None
        if text_classes > 0:
            tok = CLIPTokenizerFast.from_pretrained(model_dir)
            temps = imagenet80()

            def classifier(names):
                for name in names:
                    enc = tok([t.replace("{}", name) for t in temps], padding=True, return_tensors="pt")
                    f = model.get_text_features(**{k: v.to(device) for k, v in enc.items()})
                    feats(f).float().cpu()

            classifier([class_name(0)])
            sync()
            t = time.perf_counter()
            classifier([class_name(i) for i in range(text_classes)])
            text = text_classes * len(temps) / (time.perf_counter() - t)
    return pre, mod, e2e, text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--passes", type=int, default=1, help="passes over the batches in the model-only timing")
    ap.add_argument("--text-classes", type=int, default=20, help="class names x 80 templates for the text timing")
    ap.add_argument("--bench-bin", help="prebuilt clipft extract bench binary (default: cargo bench)")
    ap.add_argument("--features", help="cargo features for `cargo bench` (e.g. cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two sides this often; report the best")
    ap.add_argument("--workdir", help="keep the checkpoint and images here (default: a temp dir)")
    args = ap.parse_args()
    if not 0 <= args.text_classes <= 64:
        ap.error("--text-classes: 0 to 64 (the made-up class names must be distinct)")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="clipft-bench-"))
    model_dir, image_dir = work / "vit-b32", work / "images"
    if not (model_dir / "model.safetensors").exists():
        make_checkpoint(model_dir)
    if not image_dir.exists():
        make_images(image_dir, args.images)

    import torch
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch}, {args.dtype}, {args.device}, best of {args.repeat}")
    env = dict(os.environ, CLIPFT_BENCH_MODEL=str(model_dir), CLIPFT_BENCH_IMAGES=str(image_dir),
               CLIPFT_BENCH_BATCH=str(args.batch), CLIPFT_BENCH_DTYPE=args.dtype,
               CLIPFT_BENCH_DEVICE=args.device, CLIPFT_BENCH_PASSES=str(args.passes),
               CLIPFT_BENCH_TEXT_CLASSES=str(args.text_classes), RAYON_NUM_THREADS=str(args.threads))
    feats = ["--features", args.features] if args.features else []
    cmd = [args.bench_bin] if args.bench_bin else ["cargo", "bench"] + feats + ["--bench", "extract"]
    keys = ("decode+preprocess", "model", "end to end", "text")
    # The two sides alternate, and each number is the best of the repeats: on a shared machine
    # the best run is the one least disturbed by neighbours.
    ref = {k: 0.0 for k in keys}
    ours = {k: 0.0 for k in keys}
    feed = ""
    for _ in range(args.repeat):
        r = bench_transformers(model_dir, image_dir, args.threads, args.batch, args.dtype,
                               args.device, args.passes, args.text_classes)
        for k, v in zip(keys, r):
            ref[k] = max(ref[k], v or 0.0)
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        header = out.stdout.strip().splitlines()[0]
        for k, v in re.findall(r"^\s+(decode\+preprocess|model|end to end|text)\s+([\d.]+)", out.stdout, re.M):
            ours[k] = max(ours[k], float(v))
        # clipft's pipeline alone (decode, upload, normalise on the device): no PyTorch column.
        m = re.search(r"^\s+pipeline feed\s+([\d.]+) img/s\s+(.*)$", out.stdout, re.M)
        if m and float(m.group(1)) > float(feed.split()[0] if feed else 0):
            feed = f"{m.group(1)} img/s {m.group(2)}"
    unit = lambda k: "prompts/s" if k == "text" else "img/s"
    print(header)
    for k in keys:
        if ref[k] and ours[k]:
            print(f"  {k:18} transformers {ref[k]:9.1f} {unit(k):9}  clipft {ours[k]:9.1f}  ratio {ours[k] / ref[k]:.2f}x")
    print(f"  clipft end to end is {100 * ours['end to end'] / ours['model']:.0f}% of its model-only rate")
    if feed:
        print(f"  clipft pipeline feed (no model): {feed}")


if __name__ == "__main__":
    main()
