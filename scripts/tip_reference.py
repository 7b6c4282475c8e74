#!/usr/bin/env python3
"""Reference numbers for clipft's Tip-Adapter tests (tests/tip.rs).

A port of the official Tip-Adapter logic (gaopengcuhk/Tip-Adapter: utils.build_cache_model,
utils.search_hp, main.run_tip_adapter, main.run_tip_adapter_F) in PyTorch, run on small
deterministic fixtures that tests/tip.rs regenerates from the same formula. Differences from the
official script, all deliberate: float32 everywhere (the official code runs CLIP in fp16 on CUDA),
one-hot values in float32, and Tip-Adapter-F's epoch is chosen on val (the official code peeks at
test). Writes tests/fixtures/tip/reference.json; never needed by the tests themselves.

    python3 scripts/tip_reference.py > tests/fixtures/tip/reference.json
"""
import json
import math
import sys

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float32)

C, K, D, E, NVAL = 5, 4, 16, 3, 40
NK = C * K


def formula(rows, cols, salt):
    """Deterministic pseudo-random matrix in f64, cast to f32 (same formula in tests/tip.rs)."""
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            t = i * cols + j
            out[i, j] = math.sin(0.731 * t + 1.37 * salt) + 0.5 * math.cos(0.217 * (i + 1) * (j + 1) + salt)
    return out.to(torch.float32)


def normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


def fixtures():
    proto = formula(C, D, 1)
    train_labels = torch.tensor([k // K for k in range(NK)])
    # E raw augmented views of the NK train images: [E, NK, D]
    views = torch.stack([3.0 * proto[train_labels] + formula(NK, D, 10 + e) for e in range(E)])
    val_labels = torch.tensor([n % C for n in range(NVAL)])
    val = normalize(proto[val_labels] + 0.8 * formula(NVAL, D, 30))
    clip_weights = normalize(proto + 1.0 * formula(C, D, 40))  # [C, D]
    return proto, views, train_labels, val, val_labels, clip_weights


def cls_acc(output, target):
    pred = output.topk(1, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return 100 * float(correct[:1].reshape(-1).float().sum()) / target.shape[0]


def build_cache(views, labels):
    # build_cache_model: mean of the raw features over augment epochs, then L2-normalise.
    keys = views.mean(dim=0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    values = F.one_hot(labels).float()
    return keys.t(), values  # keys as in the official code: [D, NK]


def tip_logits(features, affinity, values, clip_weights, beta, alpha):
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
    clip_logits = 100.0 * features @ clip_weights.t()
    return clip_logits + cache_logits * alpha


def search_hp(scale, step, features, labels, clip_weights, values, affinity):
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alpha_list = [i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            acc = cls_acc(tip_logits(features, affinity, values, clip_weights, beta, alpha), labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return {"beta": best_beta, "alpha": best_alpha, "acc": best_acc}


def main():
    proto, views, train_labels, val, val_labels, clip_weights = fixtures()
    keys, values = build_cache(views, train_labels)
    affinity = val @ keys
    out = {
        "sizes": {"C": C, "K": K, "D": D, "E": E, "NVAL": NVAL},
        "cache_keys": keys.t().tolist(),
        # normalise-then-average would give different keys; pinned to catch the wrong order
        "cache_keys_wrong_order_row0": normalize(normalize(views).mean(0))[0].tolist(),
        "logits_b1_a117": tip_logits(val, affinity, values, clip_weights, 1.0, 1.17).tolist(),
        "logits_b55_a3": tip_logits(val, affinity, values, clip_weights, 5.5, 3.0).tolist(),
        "zero_shot_acc": cls_acc(100.0 * val @ clip_weights.t(), val_labels),
        "grid_7_3_20_10": {
            "betas": [i * (7 - 0.1) / 20 + 0.1 for i in range(20)],
            "alphas": [i * (3 - 0.1) / 10 + 0.1 for i in range(10)],
        },
        "search_7_3_20_10": search_hp([7, 3], [20, 10], val, val_labels, clip_weights, values, affinity),
        "search_12_10_200_20": search_hp([12, 10], [200, 20], val, val_labels, clip_weights, values, affinity),
    }

    # Tip-Adapter-F (run_tip_adapter_F) with a fixed batch order: epochs x batches of size 8,
    # epoch e trains on view e % E (normalised), order (7k + 3e) mod NK.
    epochs, batch, lr, beta, alpha = 3, 8, 1e-3, 1.0, 1.17
    adapter = torch.nn.Linear(D, NK, bias=False)
    adapter.weight = torch.nn.Parameter(keys.t().clone())
    iters = (NK + batch - 1) // batch
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * iters)
    losses, val_accs, lrs = [], [], []
    for e in range(epochs):
        feats = normalize(views[e % E])
        order = [(7 * k + 3 * e) % NK for k in range(NK)]
        for b in range(iters):
            idx = torch.tensor(order[b * batch:(b + 1) * batch])
            x, y = feats[idx], train_labels[idx]
            logits = tip_logits(x, adapter(x), values, clip_weights, beta, alpha)
            loss = F.cross_entropy(logits, y)
            lrs.append(sched.get_last_lr()[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        with torch.no_grad():
            val_accs.append(cls_acc(tip_logits(val, adapter(val), values, clip_weights, beta, alpha), val_labels))
    with torch.no_grad():
        out["tipf"] = {
            "epochs": epochs, "batch": batch, "lr": lr, "init_beta": beta, "init_alpha": alpha,
            "losses": losses, "lrs": lrs, "val_accs": val_accs,
            "weight": adapter.weight.tolist(),
            "search_7_3_20_10": search_hp([7, 3], [20, 10], val, val_labels, clip_weights, values, adapter(val)),
        }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
