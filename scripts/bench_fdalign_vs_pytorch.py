#!/usr/bin/env python3
"""One FD-Align training step, PyTorch vs clipft, same random ViT-B/32 checkpoint and threads.

    python3 scripts/bench_fdalign_vs_pytorch.py [--threads 2] [--batch 32] [--steps 3]
        [--device cpu|cuda] [--autocast bf16|f16] [--bench-bin PATH]

The step: frozen-encoder forward (no grad) for P0, trainable forward, CE + 20 * KLDivLoss over
20 spurious prototypes, backward, SGD(momentum 0.9, nesterov, weight decay 5e-4). With --autocast both sides train in mixed
precision: PyTorch under torch.autocast (f16 with a GradScaler), clipft with its f32 weights
cast once per step (`clipft fdalign train --dtype`, f16 with its loss scaler). Prints seconds
per step and peak resident memory for both (each in its own process), and the ratio.
Needs torch and transformers; clipft itself never needs Python.
"""
import argparse
import copy
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytorch_step(model_dir, threads, batch, steps, device="cpu", autocast=None):
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    clip = CLIPModel.from_pretrained(model_dir).to(device)
    vision, proj = clip.vision_model, clip.visual_projection
    frozen_v, frozen_p = copy.deepcopy(vision).eval(), copy.deepcopy(proj).eval()
    vision.train()
    s = clip.config.vision_config.image_size
    d = clip.config.projection_dim
    x = torch.randn(batch, 3, s, s, device=device)
    y = torch.arange(batch, device=device) % 100
    protos = torch.randn(20, d, device=device) * 10
    head = torch.nn.Linear(d, 100).to(device)
    params = list(vision.parameters()) + list(proj.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=5e-5 * batch / 256, momentum=0.9, nesterov=True, weight_decay=5e-4)
    kl = torch.nn.KLDivLoss()

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = dict(device_type="cuda" if cuda else "cpu", dtype=torch.float16 if autocast == "f16" else torch.bfloat16,
               enabled=autocast is not None)
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=autocast == "f16")

    # Seconds per phase over the timed steps, as the clipft bench splits them.
    phases = [0.0] * 4

    def step(phases):
        t = time.perf_counter()

        def lap(i):
            nonlocal t
            sync()
            now = time.perf_counter()
            phases[i] += now - t
            t = now

        with torch.autocast(**amp):
            with torch.no_grad():
                f0 = frozen_p(frozen_v(pixel_values=x).pooler_output)
            lap(0)
            ft = proj(vision(pixel_values=x).pooler_output)
            ctx = lambda f: F.normalize(f.float(), dim=-1) @ protos.t()
            loss = F.cross_entropy(head(F.normalize(ft.float(), dim=-1)), y) + 20 * kl(torch.log(F.softmax(ctx(ft), 1)), F.softmax(ctx(f0), 1))
            lap(1)
        opt.zero_grad()
        scaler.scale(loss).backward()
        lap(2)
        scaler.step(opt)
        scaler.update()
        lap(3)

    step([0.0] * 4)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step(phases)
    sync()
    per_step = (time.perf_counter() - t) / steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("PYTORCH_PHASES " + " ".join(f"{p / steps:.3f}" for p in phases))
    print(f"PYTORCH {per_step:.3f} {peak:.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", help="checkpoint folder (default: a random ViT-B/32 written by transformers)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--autocast", choices=["bf16", "f16"],
                    help="mixed precision on both sides (PyTorch torch.autocast, clipft --dtype)")
    ap.add_argument("--bench-bin", help="prebuilt clipft fdalign bench binary (default: cargo bench)")
    ap.add_argument("--_pytorch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._pytorch:
        return pytorch_step(args._pytorch, args.threads, args.batch, args.steps, args.device, args.autocast)
    work = Path(tempfile.mkdtemp(prefix="clipft-fd-bench-"))
    model = Path(args.model) if args.model else work / "vit-b32"
    if not args.model:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_vs_pytorch import make_checkpoint
        make_checkpoint(model)
    py = subprocess.run([sys.executable, __file__, "--_pytorch", str(model), "--threads", str(args.threads),
                         "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
                        + (["--autocast", args.autocast] if args.autocast else []), capture_output=True, text=True)
    if py.returncode:
        sys.exit(py.stderr)
    pt_step, pt_peak = map(float, re.search(r"PYTORCH ([\d.]+) ([\d.]+)", py.stdout).groups())
    pt_phases = re.search(r"PYTORCH_PHASES (.+)", py.stdout).group(1).split()
    env = dict(os.environ, CLIPFT_BENCH_MODEL=str(model), CLIPFT_BENCH_BATCH=str(args.batch),
               CLIPFT_BENCH_STEPS=str(args.steps), CLIPFT_BENCH_DEVICE=args.device,
               CLIPFT_BENCH_DTYPE=args.autocast or "f32",
               RAYON_NUM_THREADS=str(args.threads))
    cmd = [args.bench_bin] if args.bench_bin else ["cargo", "bench", "--bench", "fdalign"]
    rs = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if rs.returncode:
        sys.exit(rs.stderr)
    print(rs.stdout.strip())
    cf_step = float(re.search(r"seconds per step\s+([\d.]+)", rs.stdout).group(1))
    cf_peak = float(re.search(r"peak RSS MiB\s+([\d.]+)", rs.stdout).group(1))
    what = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"PyTorch FD-Align step: {pt_step:.3f} s/step, {what} {pt_peak:.0f} MiB ({args.device}, "
          f"{args.autocast or 'f32'}, {args.threads} threads, batch {args.batch})")
    mem = "" if args.device.startswith("cuda") else f"   peak memory clipft/PyTorch: {cf_peak / pt_peak:.2f}"
    names = ["frozen forward", "trainable forward", "backward", "SGD update"]
    print("    " + "; ".join(f"{n} {p} s" for n, p in zip(names, pt_phases)))
    print(f"ratio (PyTorch time / clipft time): {pt_step / cf_step:.2f}x{mem}")


if __name__ == "__main__":
    main()
