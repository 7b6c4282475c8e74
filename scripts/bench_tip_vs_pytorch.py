#!/usr/bin/env python3
"""Times clipft's Tip-Adapter (benches/tip.rs) next to the official PyTorch logic on the same
features and the same number of CPU threads, and prints the ratios.

Workload: the full α/β grid (200 × 20, search_scale [7, 3]) for a 100-class, 16-shot cache
(1,600 keys) with 1,000 val images, and one Tip-Adapter-F epoch (batch 256, AdamW, cosine
schedule, plus the per-epoch evaluation), D = 512, random L2-normalised features.

PyTorch is timed twice for the search: `official` is utils.search_hp as written (it recomputes
the affinity for every (β, α)), `vectorised` computes the affinity once and each β's cache logits
once (the fair comparison with clipft's search).

    python3 scripts/bench_tip_vs_pytorch.py [--threads 2] [--repeats 3] [--skip-official]

Needs torch, numpy, safetensors; never needed by the tests.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

C, K, N, D = 100, 16, 1000, 512
NK = C * K


def make_features(path):
    rng = np.random.default_rng(0)

    def norm(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    protos = rng.standard_normal((C, D))
    cache_labels = np.repeat(np.arange(C), K)
    val_labels = np.arange(N) % C
    feats = {
        "keys": norm(protos[cache_labels] + 2.0 * rng.standard_normal((NK, D))),
        "train": norm(protos[cache_labels] + 2.0 * rng.standard_normal((NK, D))),
        "val": norm(protos[val_labels] + 2.0 * rng.standard_normal((N, D))),
        "classifier": norm(protos + 4.0 * rng.standard_normal((C, D))),
        "cache_labels": cache_labels.astype(np.int64),
        "val_labels": val_labels.astype(np.int64),
    }
    save_file(feats, path)
    return {k: torch.from_numpy(v) for k, v in feats.items()}


def cls_acc(output, target, topk=1):
    pred = output.topk(topk, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    acc = float(correct[:topk].reshape(-1).float().sum())
    return 100 * acc / target.shape[0]


def search_official(scale, step, cache_keys, cache_values, features, labels, clip_weights):
    # utils.search_hp, as written (keys [D, NK], clip_weights [D, C])
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alpha_list = [i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = features @ cache_keys
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            clip_logits = 100. * features @ clip_weights
            tip_logits = clip_logits + cache_logits * alpha
            acc = cls_acc(tip_logits, labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc


def search_vectorised(scale, step, cache_keys, cache_values, features, labels, clip_weights):
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alphas = torch.tensor([i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])])
    affinity = features @ cache_keys
    clip_logits = 100. * features @ clip_weights
    best = (0, 0, 0)
    for beta in beta_list:
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
        logits = clip_logits[None] + alphas[:, None, None] * cache_logits[None]  # [A, N, C]
        accs = (logits.argmax(-1) == labels[None]).float().mean(-1) * 100
        for j, acc in enumerate(accs.tolist()):
            if acc > best[2]:
                best = (beta, float(alphas[j]), acc)
    return best


def tipf_epoch(f, values, clip_weights, lr=1e-3, epochs=20, batch=256, beta=1.0, alpha=1.0):
    # run_tip_adapter_F's inner loop for one epoch over pre-encoded (normalised) features,
    # with the per-epoch evaluation (on val here).
    keys = f["keys"].t()
    adapter = torch.nn.Linear(keys.shape[0], keys.shape[1], bias=False)
    adapter.weight = torch.nn.Parameter(keys.t().clone())
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, eps=1e-4)
    iters = (NK + batch - 1) // batch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * iters)
    perm = torch.randperm(NK)
    adapter.train()
    for b in range(iters):
        idx = perm[b * batch:(b + 1) * batch]
        image_features, target = f["train"][idx], f["cache_labels"][idx]
        affinity = adapter(image_features)
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
        clip_logits = 100. * image_features @ clip_weights
        tip_logits = clip_logits + cache_logits * alpha
        loss = F.cross_entropy(tip_logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    adapter.eval()
    with torch.no_grad():
        affinity = adapter(f["val"])
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
        clip_logits = 100. * f["val"] @ clip_weights
        return cls_acc(clip_logits + cache_logits * alpha, f["val_labels"])


def best_of(repeats, fn):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-official", action="store_true", help="skip the slow literal search_hp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="clipft-tip-bench-")
    path = os.path.join(tmp, "features.safetensors")
    f = make_features(path)

    env = dict(os.environ, CLIPFT_TIP_BENCH_FEATURES=path, RAYON_NUM_THREADS=str(args.threads),
               CLIPFT_BENCH_REPEATS=str(args.repeats))
    out = subprocess.run(["cargo", "bench", "--bench", "tip"], cwd=root, env=env, check=True,
                         capture_output=True, text=True)
    for line in out.stderr.splitlines():
        if line.startswith(("cache ", "search:")):
            print("clipft " + line)
    rust = dict(line.split() for line in out.stdout.splitlines() if line.count(" ") == 1)
    rust = {k: float(v) for k, v in rust.items()}

    keys, clip_weights = f["keys"].t().contiguous(), f["classifier"].t().contiguous()
    values = F.one_hot(f["cache_labels"]).float()
    scale, step = [7, 3], [200, 20]
    t_vec, r_vec = best_of(args.repeats, lambda: search_vectorised(
        scale, step, keys, values, f["val"], f["val_labels"], clip_weights))
    if args.skip_official:
        t_off, r_off = float("nan"), None
    else:
        t_off, r_off = best_of(1, lambda: search_official(
            scale, step, keys, values, f["val"], f["val_labels"], clip_weights))
    torch.manual_seed(0)
    t_epoch, _ = best_of(args.repeats, lambda: tipf_epoch(f, values, clip_weights))

    print(f"threads {args.threads}, torch {torch.__version__}, cache {NK}x{D}, val {N}, grid 200x20")
    print(f"search: PyTorch official search_hp {t_off:.3f} s {r_off or ''}")
    print(f"search: PyTorch vectorised        {t_vec:.3f} s {r_vec}")
    print(f"search: clipft                    {rust['search_seconds']:.3f} s")
    print(f"search: clipft speed-up vs official {t_off / rust['search_seconds']:.1f}x, "
          f"vs vectorised PyTorch {t_vec / rust['search_seconds']:.2f}x")
    print(f"Tip-F epoch: PyTorch {t_epoch:.4f} s, clipft {rust['tipf_epoch_seconds']:.4f} s, "
          f"speed-up {t_epoch / rust['tipf_epoch_seconds']:.2f}x")


if __name__ == "__main__":
    main()
