#!/usr/bin/env python3
"""Pixel agreement of clipft's preprocessing with transformers' CLIPImageProcessor on real
photographs of many sizes, aspect ratios, modes and formats.

    python3 scripts/check_preprocess.py [--processor preprocessor_config.json] [--fast-decode]

With --fast-decode, clipft's `--fast-decode` pixels are compared with Pillow's own reduced decoding
(`Image.draft` to the resize size, then the same resize from the full image's size, crop and
normalisation; expected equal), and their difference from the exact `CLIPImageProcessor` pixels
is printed: the accuracy cost of the option.

Uses the photographs shipped with scikit-image, re-encoded at various sizes (JPEG at several
qualities, PNG, grayscale, RGBA, palette, CMYK, 16-bit). Prints, per image, the max and mean
absolute difference of the normalised pixel values, and the same for all images together.
"""
import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROFILE = __import__("os").environ.get("CLIPFT_PROFILE", "release")


def make_images(d: Path):
    from skimage import data

    d.mkdir(parents=True, exist_ok=True)
    photos = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "camera": data.camera()}
    out = []
    sizes = [(500, 375), (375, 500), (640, 480), (1024, 683), (224, 224), (300, 100), (90, 260), (150, 113), (1600, 1200)]
    for i, (name, arr) in enumerate(photos.items()):
        im = Image.fromarray(arr)
        for j, size in enumerate(sizes):
            if (i + j) % 2:
                continue
            r = im.resize(size, Image.LANCZOS)
            q = [75, 90, 95][(i + j) % 3]
            p = d / f"{name}_{size[0]}x{size[1]}_q{q}.jpg"
            r.save(p, quality=q)
            out.append(p)
        base = im.convert("RGB").resize((480, 360), Image.LANCZOS)
        for mode, ext in [("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"), ("RGB", "png"), ("RGB", "webp")]:
            v = base.convert(mode)
            if mode == "RGBA":
                a = np.asarray(v).copy()
                a[..., 3] = np.linspace(40, 255, a.shape[1]).astype(np.uint8)[None, :]
                v = Image.fromarray(a, "RGBA")
            p = d / f"{name}_{mode}.{ext}"
            v.save(p)
            out.append(p)
        # 16-bit grayscale PNG (Pillow mode I;16)
        a16 = np.asarray(base.convert("L")).astype(np.uint16) * 257
        p = d / f"{name}_gray16.png"
        Image.fromarray(a16).save(p)
        out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processor", default=None, help="a preprocessor_config.json "
                    "(default: CLIPImageProcessor() defaults, 224 px, as openai/clip-vit-base-patch32)")
    ap.add_argument("--features", help="cargo features of the clipft build to check (e.g. cuda)")
    ap.add_argument("--fast-decode", action="store_true", help="check clipft --fast-decode against Pillow's Image.draft")
    ap.add_argument("--images", help="a folder of images to use instead of the generated set")
    args = ap.parse_args()
    try:  # transformers 5: the PIL backend (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4: the slow processor is the PIL one
        from transformers import CLIPImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.processor:
            cfg = Path(args.processor)
        else:
            CLIPImageProcessor().save_pretrained(tmp / "proc")
            cfg = tmp / "proc" / "preprocessor_config.json"
        images = sorted(Path(args.images).iterdir()) if args.images else make_images(tmp / "img")
        proc = CLIPImageProcessor.from_pretrained(cfg.parent)
        out = tmp / "px.safetensors"
        feats = ["--features", args.features] if args.features else []
        fast = ["--fast-decode"] if args.fast_decode else []
        subprocess.run(["cargo", "run", "-q", "--profile", PROFILE] + feats + ["--example", "pixels", "--"] + fast
                       + [str(cfg), str(out)] + [str(p) for p in images], cwd=ROOT, check=True)
        from safetensors.numpy import load_file
        ours = load_file(out)["pixel_values"]
        if args.fast_decode:
            return check_fast_decode(proc, images, ours)
        worst, total, count = 0.0, 0.0, 0
        for k, p in enumerate(images):
            ref = proc(images=Image.open(p), return_tensors="np")["pixel_values"][0]
            d = np.abs(ours[k] - ref)
            per_channel = d.reshape(3, -1).mean(axis=1)
            print(f"{p.name:34s} {Image.open(p).mode:5s} max {d.max():.4f}  mean {d.mean():.5f}  "
                  f"per-channel mean {per_channel[0]:.5f} {per_channel[1]:.5f} {per_channel[2]:.5f}")
            worst = max(worst, float(d.max()))
            total += float(d.sum())
            count += d.size
        print(f"ALL {len(images)} images: max abs diff {worst:.4f}, mean abs diff {total / count:.6f} "
              f"(one 8-bit level = {1 / 255 / 0.2686:.4f} after normalisation)")


def draft_reference(proc, path):
    """Pillow's reduced decoding: `Image.draft` to the resize size (libjpeg picks 1/2, 1/4 or
    1/8 while the image stays at least that large), resize to the size the full image would get,
    then the processor's crop and normalisation. `None` for files clipft decodes in full
    (not a YCbCr / RGB / grey JPEG)."""
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    im = Image.open(path)
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None, im.size
    w, h = im.size
    edge = proc.size["shortest_edge"]
    new_h, new_w = get_resize_output_image_size(np.zeros((h, w, 3), np.uint8), size=edge, default_to_square=False,
                                                input_data_format=ChannelDimension.LAST)
    im.draft("RGB", (new_w, new_h))
    drafted = im.size
    resized = im.convert("RGB").resize((new_w, new_h), Image.Resampling(proc.resample))
    return proc(images=resized, do_resize=False, return_tensors="np")["pixel_values"][0], drafted


def check_fast_decode(proc, images, ours):
    level = 1 / 255 / 0.2686
    worst_ref, worst, total, count, reduced = 0.0, 0.0, 0.0, 0, 0
    for k, p in enumerate(images):
        exact = proc(images=Image.open(p), return_tensors="np")["pixel_values"][0]
        ref, drafted = draft_reference(proc, p)
        size = Image.open(p).size
        vs_ref = float(np.abs(ours[k] - ref).max()) if ref is not None else float("nan")
        d = np.abs(ours[k] - exact)
        if drafted != size:
            reduced += 1
            total += float(d.sum())
            count += d.size
            worst = max(worst, float(d.max()))
        if ref is not None:
            worst_ref = max(worst_ref, vs_ref)
        print(f"{p.name:34s} {size[0]}x{size[1]} -> {drafted[0]}x{drafted[1]}  vs Image.draft max {vs_ref:.2e}  "
              f"vs exact: max {d.max() / level:5.1f} mean {d.mean() / level:.3f} levels")
    print(f"ALL {len(images)} images, {reduced} reduced: max abs diff to Pillow's Image.draft path {worst_ref:.2e}; "
          f"reduced images vs exact pixels: max {worst / level:.1f}, mean {total / max(count, 1) / level:.3f} 8-bit levels")


if __name__ == "__main__":
    main()
