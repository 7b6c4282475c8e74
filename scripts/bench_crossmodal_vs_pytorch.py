#!/usr/bin/env python3
"""The official cross-modal linear-probe training logic (linzhiqiu/cross_modal_adaptation:
normalised bias-free linear head x exp(4.60517), half-text/half-image batches from separately
shuffled loaders, cross-entropy, AdamW(0.9, 0.999), 50 linear warm-up iterations from 1e-5 then
cosine over the iterations, val every 100 iterations keeping the best state;
engine/optimizer/scheduler.py, train.py) in PyTorch on the
same synthetic sizes and threads as `benches/crossmodal.rs`, then the Rust bench, and the ratio.

  python3 scripts/bench_crossmodal_vs_pytorch.py [--iters 1280] [--threads 2] [--no-rust]

With --iters below 12800 both sides run that many iterations per setting and are extrapolated
linearly to the full 12 x 12800 sweep.
"""
import argparse
import copy
import math
import os
import re
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

C, D, SHOTS, NVAL = 100, 512, 16, 1000


class Head(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.linear = nn.Linear(D, C, bias=False)
        self.linear.weight.data = w.clone()
        self.scale = math.exp(4.60517)

    def forward(self, x):
        return self.linear(F.normalize(x, dim=-1)) * self.scale


def loader(n, bs, g):
    """An endless DataLoader(shuffle=True, drop_last=True) over row indices."""
    while True:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - bs + 1, bs):
            yield perm[s:s + bs]


def train_one(text, tl, img, il, val, vl, w0, lr, wd, bs, iters):
    th, ih = bs // 2, bs - bs // 2
    if th > len(text) or ih > len(img):
        return None
    g = torch.Generator().manual_seed(1)
    tstream, istream = loader(len(text), th, g), loader(len(img), ih, g)
    head = Head(w0)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    best, best_state = -1.0, None
    for it in range(iters):
        # official LinearWarmupScheduler(50, min_lr 1e-5) around CosineAnnealingLR(T_max=iters)
        if it == 0:
            cur = 1e-5
        elif it < 50:
            cur = lr * it / 50
        else:
            cur = lr * (1 + math.cos(math.pi * (it - 50) / iters)) / 2
        for pg in opt.param_groups:
            pg["lr"] = cur
        ti, ii = next(tstream), next(istream)
        x = torch.cat([text[ti], img[ii]])
        y = torch.cat([tl[ti], il[ii]])
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 100 == 0:  # official: validate after the step of it = 0, 100, 200, ...
            with torch.no_grad():
                acc = (head(val).argmax(1) == vl).float().mean().item()
            if acc > best:
                best, best_state = acc, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-rust", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    text = F.normalize(torch.rand(C, D) - 0.5, dim=-1)
    tl = torch.arange(C)
    img = F.normalize(torch.rand(C * SHOTS * 2, D) - 0.5, dim=-1)
    il = torch.arange(C * SHOTS * 2) % C
    val = F.normalize(torch.rand(NVAL, D) - 0.5, dim=-1)
    vl = torch.arange(NVAL) % C
    w0 = F.normalize(text.clone(), dim=-1)
    t0 = time.time()
    for lr in [1e-3, 1e-4]:
        for wd in [0.0, 1e-2, 1e-4]:
            for bs in [8, 32]:
                train_one(text, tl, img, il, val, vl, w0, lr, wd, bs, a.iters)
    py = time.time() - t0
    py_full = py * 12800 / a.iters
    print(f"pytorch (official logic): 12 x {a.iters} iterations, {a.threads} threads: {py:.2f} s "
          f"(full 12 x 12800: {py_full:.1f} s)")
    if a.no_rust:
        return
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), CROSSMODAL_BENCH_ITERS=str(a.iters))
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run(["cargo", "bench", "--bench", "crossmodal"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout
    print(out.strip())
    m = re.search(r"full 12 x 12800: ([0-9.]+) s", out)
    if m:
        rs = float(m.group(1))
        print(f"ratio pytorch / clipft (full sweep): {py_full / rs:.1f}x")


if __name__ == "__main__":
    main()
