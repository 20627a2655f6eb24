#!/usr/bin/env python3
"""The README's training loop, in torch 2.15 (CPU): records the learning rates for
``tests/torch_port.rs``.

An MLP (fc1: 4->8, ReLU, fc2: 8->3) plus a linear ``skip`` layer (4->3) that starts frozen.
torch's decay / no-decay recipe: AdamW(lr=3e-3, weight_decay=0.05) with the weights in one group
and the biases in another (``weight_decay=0``); a warmup then cosine schedule
(``SequentialLR([LinearLR(start_factor=0.1, total_iters=4), CosineAnnealingLR(T_max=20,
eta_min=1e-4)], milestones=[4])``), stepped after every optimizer step;
``clip_grad_norm_(params, 1.0)`` before each step; at step 6 every group's lr halved by hand; at
step 8 the ``skip`` layer unfrozen and added with ``add_param_group({"params": [skip.weight],
"lr": 1e-3, "weight_decay": 0.0})``. 16 steps.

Recorded: every group's lr before each step and after the last (``lrs[t]``, t = 0..16), and
whether the added group has an ``initial_lr``. The lrs do not depend on the gradients, so the
Rust port checks them exactly; its resume is checked bitwise against its own unbroken run.

Run: ``../venv/bin/python scripts/gen_torch_port.py``.
"""

import json
import math
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STEPS, HALVE_AT, ADD_AT = 16, 6, 8


def main():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
    skip = torch.nn.Linear(4, 3, bias=False)
    skip.weight.requires_grad_(False)
    decay = [fc1.weight, fc2.weight]
    no_decay = [fc1.bias, fc2.bias]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, weight_decay=0.05)
    L = torch.optim.lr_scheduler
    warmup = L.LinearLR(opt, start_factor=0.1, total_iters=4)
    cosine = L.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4)
    sched = L.SequentialLR(opt, [warmup, cosine], milestones=[4])
    x = torch.tensor([[math.sin(0.3 * i + j) for j in range(4)] for i in range(16)])
    y = torch.tensor([[math.cos(0.2 * i - j) for j in range(3)] for i in range(16)])
    lrs, initial_lr_of_added = [], "absent"
    for t in range(STEPS):
        if t == HALVE_AT:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.5
        if t == ADD_AT:
            skip.weight.requires_grad_(True)
            opt.add_param_group({"params": [skip.weight], "lr": 1e-3, "weight_decay": 0.0})
            initial_lr_of_added = opt.param_groups[2].get("initial_lr", "absent")
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        opt.zero_grad(set_to_none=True)
        out = fc2(torch.relu(fc1(x))) + skip(x)
        loss = ((out - y) ** 2).mean()
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    lrs.append([float(g["lr"]) for g in opt.param_groups])
    out = {
        "meta": {"torch_version": torch.__version__, "generator": "scripts/gen_torch_port.py"},
        "steps": STEPS, "halve_at": HALVE_AT, "add_at": ADD_AT,
        "initial_lr_of_added": initial_lr_of_added,
        "lrs": lrs,
    }
    path = os.path.join(ROOT, "tests/fixtures/torch_port.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{path}: {len(lrs)} records", file=sys.stderr)


if __name__ == "__main__":
    main()
