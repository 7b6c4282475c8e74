#!/usr/bin/env python3
"""Reference numbers for tests/crossmodal.rs, computed once with the logic of the official
cross-modal adaptation code (linzhiqiu/cross_modal_adaptation) in PyTorch on deterministic
fixtures. Writes tests/fixtures/crossmodal/reference.json.

  python3 scripts/crossmodal_reference.py

Fixture: C=5 classes, T=3 templates, D=16, 1 shot x 2 views (centre, flip) = 10 image rows,
NVAL=20 val rows; every matrix is the `formula` below (as in scripts/tip_reference.py).

The `adapter_*` entries are the official `--classifier_head adapter` (engine/model/head.py
`Adapter` inside `LogitHead`, engine/model/logit.py) with formula weights in nn.Linear's default
range: forward logits, one batch's loss and autograd gradients, and a few AdamW steps over all
parameters (one optimizer, as train.py) on a fixed batch order with given learning rates.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

C, T, D, NIMG, NVAL = 5, 3, 16, 10, 20


def formula(rows, cols, salt):
    return torch.tensor(
        [[math.sin(0.731 * (i * cols + j) + 1.37 * salt) + 0.5 * math.cos(0.217 * (i + 1) * (j + 1) + salt)
          for j in range(cols)] for i in range(rows)],
        dtype=torch.float64).float()


class LinearHead(nn.Module):
    """The official `--classifier_head linear`: normalise the input, bias-free Linear, x exp(4.60517)."""

    def __init__(self, weight):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight.data = weight.clone()
        self.logit_scale = torch.tensor(4.60517)

    def forward(self, x):
        x = x / x.norm(dim=-1, keepdim=True)
        return self.head(x) * self.logit_scale.exp()


class AdapterHead(nn.Module):
    """The official `--classifier_head adapter`: LogitHead(Sequential(Adapter, Linear)). LogitHead
    normalises the input only; Adapter is Linear(D, D//4, no bias), ReLU, Linear(D//4, D, no bias),
    ReLU, then ratio * mlp(x) + (1 - ratio) * x with ratio 0.2."""

    def __init__(self, weight, fc1, fc2, ratio=0.2):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(fc1.shape[1], fc1.shape[0], bias=False), nn.ReLU(),
            nn.Linear(fc2.shape[1], fc2.shape[0], bias=False), nn.ReLU())
        self.fc[0].weight.data = fc1.clone()
        self.fc[2].weight.data = fc2.clone()
        self.ratio = ratio
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight.data = weight.clone()
        self.logit_scale = torch.tensor(4.60517)

    def forward(self, x):
        x = F.normalize(x, dim=1)
        x = self.ratio * self.fc(x) + (1 - self.ratio) * x
        return self.head(x) * self.logit_scale.exp()


def zeroshot_weight(text_raw):
    # official get_zero_shot_weights (engine/model/head.py): the per-class mean of the raw text
    # features, then normalised (the commented-out older version normalised each feature first)
    w = text_raw.view(C, T, D).mean(dim=1)
    return w / w.norm(dim=-1, keepdim=True)


def adapter_reference(text, img, text_labels, img_labels, w0, x, ti, ii):
    h = D // 4
    # formula weights inside nn.Linear's default bounds (1/sqrt(16) = 0.25, 1/sqrt(4) = 0.5); about
    # half of each layer's ReLU inputs are negative
    fc1 = 0.15 * formula(h, D, 7.0)
    fc2 = 0.3 * formula(D, h, 8.0)
    head = AdapterHead(w0, fc1, fc2)
    with torch.no_grad():
        logits = head(x)
    # one batch (as the linear reference) at the perturbed linear layer
    wp = w0 + 0.1 * formula(C, D, 6.0)
    head = AdapterHead(wp, fc1, fc2)
    bx = torch.cat([text[ti], img[ii]])
    by = torch.tensor([text_labels[r] for r in ti] + [img_labels[r] for r in ii])
    loss = F.cross_entropy(head(bx), by)
    loss.backward()
    grads = {"adapter_batch_grad_head": head.head.weight.grad.tolist(),
             "adapter_batch_grad_fc1": head.fc[0].weight.grad.tolist(),
             "adapter_batch_grad_fc2": head.fc[2].weight.grad.tolist()}
    # a few steps: one AdamW (betas 0.9/0.999, decoupled decay) over every parameter, as
    # train.py's build_optimizer; the lr of each step set as the scheduler would
    head = AdapterHead(w0, fc1, fc2)
    lrs = [1e-2, 5e-3, 2e-2, 1e-2, 3e-3, 1e-2]
    wd = 1e-2
    batches = [([0, 7, 14, 3], [1, 8, 5, 2]), ([2, 9, 11, 4], [0, 3, 6, 9]),
               ([13, 1, 5, 10], [4, 7, 2, 8]), ([6, 12, 8, 0], [5, 1, 9, 3]),
               ([3, 4, 14, 7], [6, 0, 8, 2]), ([11, 10, 2, 9], [7, 4, 1, 5])]
    opt = torch.optim.AdamW(head.parameters(), lr=lrs[0], weight_decay=wd, betas=(0.9, 0.999))
    losses = []
    for lr, (bt, bi) in zip(lrs, batches):
        for g in opt.param_groups:
            g["lr"] = lr
        bx = torch.cat([text[bt], img[bi]])
        by = torch.tensor([text_labels[r] for r in bt] + [img_labels[r] for r in bi])
        step_loss = F.cross_entropy(head(bx), by)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    # the official adapter sweep, HYPER_DICT['adapter'] (engine/optimizer/default.py), in
    # train.py's loop order
    grid = [{"lr": lr, "wd": wd_, "batch": bs}
            for lr in [0.0001, 0.00001, 0.000001, 0.0000001]
            for wd_ in [0.0, 0.001, 0.00001]
            for bs in [8]]
    return {
        "adapter_fc1": fc1.tolist(),
        "adapter_fc2": fc2.tolist(),
        "adapter_head_logits": logits.tolist(),
        "adapter_batch_loss": loss.item(),
        **grads,
        "adapter_train": {
            "lr": lrs, "wd": wd,
            "text_rows": [b[0] for b in batches], "image_rows": [b[1] for b in batches],
            "loss": losses,
            "head": head.head.weight.data.tolist(),
            "fc1": head.fc[0].weight.data.tolist(),
            "fc2": head.fc[2].weight.data.tolist(),
        },
        "adapter_grid": grid,
    }


def main():
    text = formula(C * T, D, 1.0)
    proto = formula(C, D, 2.0)
    img = torch.stack([3 * proto[i % C] + formula(NIMG, D, 3.0)[i] for i in range(NIMG)])
    img_labels = [i % C for i in range(NIMG)]
    text_labels = [r // T for r in range(C * T)]
    w0 = zeroshot_weight(text)
    head = LinearHead(w0)
    x = formula(4, D, 5.0) * 2.5
    logits = head(x)
    # a mixed batch: text rows, then image rows (the official loop concatenates image then text;
    # the mean cross-entropy and its gradient do not depend on the order)
    ti, ii = [0, 7, 14, 3], [1, 8, 5, 2]
    bx = torch.cat([text[ti], img[ii]])
    by = torch.tensor([text_labels[r] for r in ti] + [img_labels[r] for r in ii])
    head.head.weight.data = w0 + 0.1 * formula(C, D, 6.0)
    loss = F.cross_entropy(head(bx), by)
    loss.backward()
    # batch composition of the default sweep on this fixture: (text half, image half) or skip
    comp = []
    for lr in [1e-3, 1e-4]:
        for wd in [0.0, 1e-2, 1e-4]:
            for bs in [8, 32]:
                # official get_valid_batch_sizes: text int(bs * 0.5), image the rest, each
                # non-empty half strictly smaller than its dataset
                th = int(bs * 0.5)
                ih = bs - th
                ok = (th == 0 or th < C * T) and (ih == 0 or ih < NIMG)
                comp.append({"lr": lr, "wd": wd, "batch": bs, "text": th if ok else None,
                             "image": ih if ok else None})
    # WiSE-FT of the perturbed weight
    learned = head.head.weight.data
    wise = 0.5 * learned + 0.5 * w0 / w0.norm(dim=-1, keepdim=True)
    adapter = adapter_reference(text, img, text_labels, img_labels, w0, x, ti, ii)
    out = {
        "zeroshot_init": w0.tolist(),
        "head_logits": logits.tolist(),
        "batch_text_rows": ti, "batch_image_rows": ii,
        "batch_labels": by.tolist(),
        "batch_loss": loss.item(),
        "batch_grad": head.head.weight.grad.tolist(),
        "composition": comp,
        "wise_ft_0.5": wise.tolist(),
        **adapter,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "crossmodal", "reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
