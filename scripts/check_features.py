#!/usr/bin/env python3
"""clipft image features vs Hugging Face transformers f32 on real-size JPEGs, per --dtype.

    python3 scripts/check_features.py [--dtype f32 bf16] [--device cpu] [--images 128]
        [--threads 2] [--clipft target/release/clipft] [--workdir DIR] [--image-dir DIR] [--fast-decode]

Uses the random ViT-B/32 checkpoint and the 500x375 JPEGs of scripts/bench_vs_pytorch.py (made
in --workdir if missing), runs `clipft features` once per dtype, and prints each one's cosine
to transformers' f32 features (min and mean over the images) and max abs difference; with a
reduced precision, transformers' own features in that dtype (`torch_dtype`) for comparison.
--image-dir uses the JPEGs of a folder instead; --fast-decode runs clipft with `--fast-decode`
(its features against the exact transformers ones: the option's effect on features).
Needs: torch, transformers, pillow, safetensors (for this check only).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_vs_pytorch as bench  # noqa: E402


def transformers_features(model_dir, paths, dtype, device, threads):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    model = CLIPModel.from_pretrained(model_dir, torch_dtype=tdtype).eval().to(device)
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), 32):
            px = proc(images=[Image.open(p) for p in paths[i:i + 32]], return_tensors="pt")["pixel_values"]
            out.append(bench.feats(model.get_image_features(pixel_values=px.to(device, tdtype))).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16", "f16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clipft", default=str(ROOT / "target/release/clipft"))
    ap.add_argument("--workdir")
    ap.add_argument("--image-dir", help="JPEGs to use instead of the generated 500x375 ones")
    ap.add_argument("--fast-decode", action="store_true", help="run clipft with --fast-decode")
    args = ap.parse_args()

    from safetensors import safe_open

    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipft-check-"))
    model_dir, image_dir = work / "vit-b32", Path(args.image_dir or work / "images")
    if not (model_dir / "config.json").exists():
        bench.make_checkpoint(model_dir)
    if not image_dir.exists():
        bench.make_images(image_dir, args.images)
    # A one-class dataset over the first --images JPEGs (one per image folder).
    ds = work / ("check-ds-" + image_dir.name if args.image_dir else "check-ds")
    cls = ds / "train" / "a"
    cls.mkdir(parents=True, exist_ok=True)
    for p in sorted(image_dir.glob("*.jpg"))[: args.images]:
        link = cls / p.name
        if not link.exists():
            link.symlink_to(p.resolve())

    ref = None
    for dt in args.dtype:
        out = work / f"check-{dt}.safetensors"
        subprocess.run([args.clipft, "features", "-q", "--model", str(model_dir), "--data", str(ds),
                        "--device", args.device, "--dtype", dt, "--threads", str(args.threads),
                        "--no-cache", "--out", str(out)] + (["--fast-decode"] if args.fast_decode else []),
                       check=True)
        with safe_open(out, "pt") as f:
            ours = f.get_tensor("image_features").float()
            meta = f.metadata()
        paths = json.loads(meta["clipft"])["paths"]
        if ref is None:
            ref = transformers_features(model_dir, paths, "f32", args.device, args.threads)
        cos = (ours * ref).sum(-1)
        label = " --fast-decode" if args.fast_decode else ""
        print(f"clipft {args.device} {dt:4}{label} vs transformers f32: {len(paths)} images, min cosine "
              f"{cos.min():.7f}, mean {cos.mean():.7f}, max abs diff {(ours - ref).abs().max():.2e}")
        if dt != "f32":
            theirs = transformers_features(model_dir, paths, dt, args.device, args.threads)
            cos = (theirs * ref).sum(-1)
            print(f"  (transformers {dt} vs f32: min cosine {cos.min():.7f}, mean {cos.mean():.7f})")


if __name__ == "__main__":
    main()
