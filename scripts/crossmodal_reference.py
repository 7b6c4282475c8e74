#!/usr/bin/env python3
"""Reference numbers for tests/crossmodal.rs, computed once with the logic of the official
cross-modal adaptation code (linzhiqiu/cross_modal_adaptation) in PyTorch on deterministic
fixtures. Writes tests/fixtures/crossmodal/reference.json.

  python3 scripts/crossmodal_reference.py

Fixture: C=5 classes, T=3 templates, D=16, 1 shot x 2 views (centre, flip) = 10 image rows,
NVAL=20 val rows; every matrix is the `formula` below (as in scripts/tip_reference.py).
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


def zeroshot_weight(text_raw):
    # official get_zero_shot_weights (engine/model/head.py): each text feature normalised, the
    # per-class mean, then normalised again
    w = F.normalize(text_raw, dim=1).view(C, T, D).mean(dim=1)
    return w / w.norm(dim=-1, keepdim=True)


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
    out = {
        "zeroshot_init": w0.tolist(),
        "head_logits": logits.tolist(),
        "batch_text_rows": ti, "batch_image_rows": ii,
        "batch_labels": by.tolist(),
        "batch_loss": loss.item(),
        "batch_grad": head.head.weight.grad.tolist(),
        "composition": comp,
        "wise_ft_0.5": wise.tolist(),
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "crossmodal", "reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
