#!/usr/bin/env python3
"""PyTorch-made optarena checkpoints and the trajectories torch continued them with.

    ../venv/bin/python scripts/gen_checkpoint_fixtures.py --out tests/fixtures/checkpoints

For each case (Adam, SGD with momentum and Muon, two param groups each): parameters start at
``hashed(seed, 0, n_total)`` and step ``t`` uses gradients ``hashed(seed, t, n_total)``, as in
shared/fixtures/SCHEMA.md (``hashed`` is imported from gen_fixtures.py). torch takes
``k`` steps; ``scripts/torch_checkpoint.py`` converts its ``state_dict()`` and the model's
``named_parameters()`` into ``<name>.safetensors``; torch then takes steps ``k+1 ..= k+m`` and
records the parameters after each into ``torch_resume.json`` (the Adam and SGD files
were made on another machine: regenerated on a CPU with other vector instructions, torch's Adam
differs from them by an ulp in places, so the Muon case was added to the committed files
alone):

    {"cases": [{"name", "optimizer", "dtype", "seed", "checkpoint": "<file>", "k",
                "params": [[name, shape], ...],          # model order = arena order
                "steps": [{"step": t, "params": ["<base64>", ...]}, ...]}]}

The Rust test (tests/checkpoint_torch.rs) builds an arena of those names and shapes with
placeholder values and an optimizer with default hyperparameters, loads the checkpoint (which
restores the values, the groups' hyperparameters and the state), continues, and compares
with SCHEMA.md's elementwise tolerances (Muon: ``"compare": "direction"``, SCHEMA.md's
direction and norm test on each parameter's change since the checkpoint).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import b64, hashed  # noqa: E402  (SCHEMA.md's inputs and base64 arrays)
from torch_checkpoint import read_optarena, save_torch_as_optarena  # noqa: E402

torch.set_num_threads(1)

CASES = [
    {
        "name": "adam_groups2",
        "optimizer": "Adam",
        "dtype": "float32",
        "seed": 7101,
        "k": 4,
        "m": 6,
        "defaults": {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-7},
        "groups": [
            {"params": [("enc.weight", [7, 5]), ("enc.bias", [5])], "overrides": {}},
            {"params": [("head.weight", [3, 11]), ("head.bias", [3]), ("head.scale", [1])],
             "overrides": {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}},
        ],
    },
    {
        "name": "sgd_momentum_groups2",
        "optimizer": "SGD",
        "dtype": "float64",
        "seed": 7202,
        "k": 3,
        "m": 6,
        "defaults": {"lr": 0.1, "momentum": 0.9, "dampening": 0.1},
        "groups": [
            {"params": [("enc.weight", [6, 4]), ("enc.bias", [4])], "overrides": {}},
            {"params": [("head.weight", [2, 9]), ("head.bias", [2])],
             "overrides": {"lr": 0.02, "nesterov": True, "dampening": 0.0,
                           "weight_decay": 0.01}},
        ],
    },
    {
        # Muon: matrices only; a tuple (ns_coefficients) and a None (adjust_lr_fn) in the
        # groups, no step in the state. Compared by direction and norm, as SCHEMA.md's Muon
        # section says (torch's Newton-Schulz products are bf16).
        "name": "muon_groups2",
        "optimizer": "Muon",
        "dtype": "float32",
        "seed": 7303,
        "k": 3,
        "m": 4,
        "compare": "direction",
        "defaults": {"lr": 0.02, "ns_coefficients": (3.0, -4.0, 1.9)},
        "groups": [
            {"params": [("enc.weight", [7, 5]), ("mid.weight", [5, 12])], "overrides": {}},
            {"params": [("head.weight", [3, 11])],
             "overrides": {"momentum": 0.9, "nesterov": False,
                           "adjust_lr_fn": "match_rms_adamw"}},
        ],
    },
]


def torch_optimizer(name, groups, **kwargs):
    """torch.optim.<name> on its single-tensor code path (Muon has no other, and no
    ``foreach`` keyword)."""
    impl = {} if name == "Muon" else {"foreach": False}
    return getattr(torch.optim, name)(groups, **impl, **kwargs)


class Model(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        for name, shape, values in params:
            # Dotted names need nesting; keep one flat level with '.' mapped to submodules.
            owner = self
            parts = name.split(".")
            for part in parts[:-1]:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(parts[-1], torch.nn.Parameter(values.reshape(shape)))


def run(case, out_dir):
    dtype = {"float32": torch.float32, "float64": torch.float64}[case["dtype"]]
    specs = [p for g in case["groups"] for p in g["params"]]
    sizes = [int(np.prod(s)) for _, s in specs]
    n_total = sum(sizes)

    def split(values):
        out, at = [], 0
        for n in sizes:
            out.append(torch.tensor(values[at:at + n], dtype=dtype))
            at += n
        return out

    init = split(hashed(case["seed"], 0, n_total))
    model = Model([(name, shape, v) for (name, shape), v in zip(specs, init)])
    named = dict(model.named_parameters())
    assert list(named) == [n for n, _ in specs]
    groups = [dict(g["overrides"], params=[named[n] for n, _ in g["params"]])
              for g in case["groups"]]
    opt = torch_optimizer(case["optimizer"], groups, **case["defaults"])
    params = [named[n] for n, _ in specs]

    def step(t):
        for p, g in zip(params, split(hashed(case["seed"], t, n_total))):
            p.grad = g.reshape(p.shape).clone()
        opt.step()

    for t in range(1, case["k"] + 1):
        step(t)
    fname = case["name"] + ".safetensors"
    path = os.path.join(out_dir, fname)
    size = save_torch_as_optarena(path, opt, model.named_parameters())
    with open(path, "rb") as f:
        read_optarena(f.read())  # checks both checksums, reads through safetensors
    steps = []
    for t in range(case["k"] + 1, case["k"] + case["m"] + 1):
        step(t)
        steps.append({"step": t, "params": [b64(p.detach().numpy().reshape(-1), case["dtype"])
                                            for p in params]})
    print(f"{case['name']}: {fname} ({size} bytes) after {case['k']} steps, "
          f"{len(steps)} steps recorded")
    out = {"name": case["name"], "optimizer": case["optimizer"], "dtype": case["dtype"],
           "seed": case["seed"], "checkpoint": fname, "k": case["k"],
           "params": [[n, s] for n, s in specs], "steps": steps}
    if "compare" in case:
        out["compare"] = case["compare"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/checkpoints")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = [run(c, args.out) for c in CASES]
    meta = {"torch": torch.__version__, "generator": "scripts/gen_checkpoint_fixtures.py"}
    with open(os.path.join(args.out, "torch_resume.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
