#!/usr/bin/env python3
"""More LR-scheduler references recorded with PyTorch (2.15, CPU), beyond scripts/gen_fixtures.py.

Writes two files:

* ``tests/fixtures/schedulers_extra.json``: more cases in SCHEMA.md's ``schedulers.json``
  format (SGD, two groups with lr 0.1 and 0.01, momentum 0.9, 60 epochs; every lr and momentum
  before each ``optimizer.step(); scheduler.step()``), so the parity harness replays them:
  per-group lambdas, custom CyclicLR scale functions, milestones at 0, SequentialLR children
  that are not chainable (CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR), nested
  composites, the ``initial_lr`` ``setdefault`` of later schedulers, ReduceLROnPlateau options.
  ``lr_lambda`` and ``scale_fn`` are Python expressions of ``epoch`` / ``x``.
* ``tests/fixtures/sched/traces.json`` (read by ``tests/schedulers.rs``): what that format
  cannot hold: schedulers cycling ``betas[0]`` of Adam, the deprecated ``step(epoch)`` (closed
  forms), CosineAnnealingWarmRestarts with fractional epochs. Each case lists ``actions``
  (``null`` = ``step()``, a number = ``step(epoch)``) and the groups' ``lr`` and momentum (or
  ``betas[0]``) after construction (index 0) and after each action.

* ``tests/fixtures/sched/add_group.json`` (``--only add_group``; read by ``tests/schedulers.rs``):
  every scheduler kind on SGD (two groups, lr 0.1 and 0.01, momentum 0.9), with a third group
  (lr 0.05, and ``momentum`` 0.8) added by ``optimizer.add_param_group`` after ``add_after``
  actions; then more actions. Recorded: every group's ``lr`` and ``momentum`` after construction
  and after each action, whether the added group has an ``initial_lr`` after the add and at the
  end, and, where torch raises, the exception's type and message and the action that raised
  (the case stops there). ``actions``: ``null`` = ``step()``, a number = ``step(epoch)``;
  ReduceLROnPlateau steps with ``metrics[i]``.

Run: ``../venv/bin/python scripts/gen_scheduler_extra.py`` (all files) or
``../venv/bin/python scripts/gen_scheduler_extra.py --only add_group``.
"""

import json
import math
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
L = torch.optim.lr_scheduler
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
N_EPOCHS = 60


def lam(src):
    return eval("lambda epoch: " + src, {"math": math})


def make_scheduler(opt, name, config):
    cfg = dict(config)
    if "lr_lambda" in cfg:
        v = cfg["lr_lambda"]
        cfg["lr_lambda"] = [lam(s) for s in v] if isinstance(v, list) else lam(v)
    if "scale_fn" in cfg:
        cfg["scale_fn"] = eval("lambda x: " + cfg["scale_fn"], {"math": math})
    if name in ("SequentialLR", "ChainedScheduler"):
        cfg["schedulers"] = [make_scheduler(opt, n, c) for n, c in cfg["schedulers"]]
        if name == "ChainedScheduler":
            return L.ChainedScheduler(optimizer=opt, **cfg)
    return getattr(L, name)(opt, **cfg)


def run_schema_case(case):
    w = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": case["base_lrs"][0]},
                           {"params": [w[1]], "lr": case["base_lrs"][1]}],
                          momentum=case["momentum"], foreach=False)
    sched = make_scheduler(opt, case["scheduler"], case["config"])
    lrs, moms = [], []
    for e in range(N_EPOCHS):
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        moms.append([float(g["momentum"]) for g in opt.param_groups])
        opt.step()
        if case["scheduler"] == "ReduceLROnPlateau":
            sched.step(case["metrics"][e])
        else:
            sched.step()
    return lrs, moms


def metrics(mode, seed):
    vals, level = [], 1.0
    for e in range(N_EPOCHS):
        if (e + seed) % 11 < 2:
            level -= 0.05 * 0.7 ** (e // 11)
        vals.append(level + [0.0, 0.01, 0.004, 0.02, 0.0][(e * 3 + seed) % 5])
    return vals if mode == "min" else [2.0 - v for v in vals]


SCHEMA_CASES = [
    ("LambdaLR", {"lr_lambda": ["0.95**epoch", "1.0 / (epoch + 1)"]}),
    ("LambdaLR", {"lr_lambda": "0.5**(epoch // 10)"}),
    ("MultiplicativeLR", {"lr_lambda": ["0.9", "0.99"]}),
    ("MultiplicativeLR", {"lr_lambda": "1.0 - 0.01 * (epoch % 3)"}),
    ("StepLR", {"step_size": 3, "gamma": 0.7}),
    ("MultiStepLR", {"milestones": [0, 5, 5, 50], "gamma": 0.5}),
    ("ConstantLR", {"factor": 1.0, "total_iters": 3}),
    ("ConstantLR", {"factor": 0.0, "total_iters": 70}),
    ("LinearLR", {"start_factor": 0.5, "end_factor": 0.0, "total_iters": 10}),
    ("LinearLR", {"start_factor": 1.0, "end_factor": 1.0, "total_iters": 4}),
    ("PolynomialLR", {"total_iters": 60, "power": 3.0}),
    ("PolynomialLR", {"total_iters": 0}),
    ("CosineAnnealingLR", {"T_max": 1}),
    ("CosineAnnealingLR", {"T_max": 3, "eta_min": 0.05}),
    ("CosineAnnealingWarmRestarts", {"T_0": 1}),
    ("CosineAnnealingWarmRestarts", {"T_0": 7, "T_mult": 2, "eta_min": 0.002}),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 3, "scale_fn": "1.0 / (1.0 + 0.2 * x)"}),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 3, "scale_fn": "0.99**x", "scale_mode": "iterations", "mode": "nonsense"}),
    ("CyclicLR", {"base_lr": [0.01, 0.002], "max_lr": 0.05, "step_size_up": 1, "step_size_down": 0}),
    ("CyclicLR", {"base_lr": 0.01, "max_lr": 0.05, "step_size_up": 2.5, "step_size_down": 4.5, "mode": "triangular2", "base_momentum": [0.5, 0.6], "max_momentum": [0.9, 0.99]}),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 60, "pct_start": 0.0}),
    ("OneCycleLR", {"max_lr": [0.3, 0.05], "total_steps": 65, "three_phase": True, "anneal_strategy": "linear", "pct_start": 0.4, "div_factor": 1.0}),
    ("SequentialLR", {"schedulers": [["CosineAnnealingWarmRestarts", {"T_0": 4}], ["ExponentialLR", {"gamma": 0.9}]], "milestones": [15]}),
    ("SequentialLR", {"schedulers": [["ExponentialLR", {"gamma": 0.9}], ["CosineAnnealingWarmRestarts", {"T_0": 6, "T_mult": 2}]], "milestones": [10]}),
    ("SequentialLR", {"schedulers": [["MultiplicativeLR", {"lr_lambda": "0.95"}], ["LambdaLR", {"lr_lambda": "0.9**epoch"}], ["PolynomialLR", {"total_iters": 20, "power": 2.0}]], "milestones": [10, 30]}),
    ("SequentialLR", {"schedulers": [["CyclicLR", {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4}], ["CosineAnnealingLR", {"T_max": 15}]], "milestones": [20]}),
    ("SequentialLR", {"schedulers": [["OneCycleLR", {"max_lr": 0.2, "total_steps": 30}], ["ConstantLR", {"factor": 0.5, "total_iters": 10}]], "milestones": [30]}),
    ("SequentialLR", {"schedulers": [["StepLR", {"step_size": 4, "gamma": 0.5}], ["MultiStepLR", {"milestones": [3, 9]}]], "milestones": [0]}),
    ("SequentialLR", {"schedulers": [["LinearLR", {"start_factor": 0.2, "total_iters": 5}], ["ExponentialLR", {"gamma": 0.95}], ["CosineAnnealingLR", {"T_max": 10, "eta_min": 0.001}]], "milestones": [5, 40]}),
    ("SequentialLR", {"schedulers": [["SequentialLR", {"schedulers": [["ConstantLR", {"factor": 0.1, "total_iters": 3}], ["ExponentialLR", {"gamma": 0.8}]], "milestones": [3]}], ["StepLR", {"step_size": 5, "gamma": 0.5}]], "milestones": [20]}),
    ("SequentialLR", {"schedulers": [["ChainedScheduler", {"schedulers": [["ConstantLR", {"factor": 0.5, "total_iters": 4}], ["ExponentialLR", {"gamma": 0.97}]]}], ["CosineAnnealingLR", {"T_max": 12}]], "milestones": [25]}),
    ("ChainedScheduler", {"schedulers": [["CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 5}], ["ExponentialLR", {"gamma": 0.97}]]}),
    ("ChainedScheduler", {"schedulers": [["ExponentialLR", {"gamma": 0.97}], ["CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 5}]]}),
    ("ChainedScheduler", {"schedulers": [["MultiplicativeLR", {"lr_lambda": "0.98"}], ["StepLR", {"step_size": 7, "gamma": 0.5}], ["CosineAnnealingWarmRestarts", {"T_0": 9}]]}),
    ("ChainedScheduler", {"schedulers": [["ConstantLR", {"factor": 0.5, "total_iters": 5}], ["OneCycleLR", {"max_lr": 0.1, "total_steps": 60}]]}),
    ("ChainedScheduler", {"schedulers": [["SequentialLR", {"schedulers": [["LinearLR", {"start_factor": 0.25, "total_iters": 8}], ["CosineAnnealingLR", {"T_max": 20}]], "milestones": [8]}], ["LambdaLR", {"lr_lambda": "1.0 + 0.01 * epoch"}]]}),
    ("ReduceLROnPlateau", {"mode": "min", "factor": 0.5, "patience": 1, "threshold": 0.02, "threshold_mode": "abs", "cooldown": 1}),
    ("ReduceLROnPlateau", {"mode": "max", "factor": 0.0, "patience": 2, "min_lr": [0.001, 0.0]}),
    ("ReduceLROnPlateau", {"mode": "min", "factor": -0.5, "patience": 0, "min_lr": 0.002}),
    ("ReduceLROnPlateau", {"mode": "min", "factor": 0.9, "patience": 0, "eps": 0.005, "cooldown": 4}),
    ("ReduceLROnPlateau", {}),
]


def gen_schema(meta):
    cases = []
    for i, (name, config) in enumerate(SCHEMA_CASES):
        m = metrics(config.get("mode", "min"), i) if name == "ReduceLROnPlateau" else None
        case = {"name": f"sched-extra/{name}/{i}", "scheduler": name, "config": config,
                "base_lrs": [0.1, 0.01], "momentum": 0.9, "metrics": m}
        case["lrs"], case["momentums"] = run_schema_case(case)
        cases.append(case)
    return {"meta": meta, "cases": cases}


def mom_key(opt):
    return "betas" if "betas" in opt.defaults else "momentum"


def values(opt):
    key = mom_key(opt)
    lrs = [float(g["lr"]) for g in opt.param_groups]
    ms = [float(g[key][0] if key == "betas" else g[key]) for g in opt.param_groups]
    return lrs, ms


def run_trace(case):
    w = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    groups = [{"params": [w[0]], "lr": case["base_lrs"][0]},
              {"params": [w[1]], "lr": case["base_lrs"][1]}]
    cls = getattr(torch.optim, case["optimizer"])
    opt = cls(groups, foreach=False, **case["opt_defaults"])
    sched = make_scheduler(opt, case["scheduler"], case["config"])
    lrs, ms = [], []
    l, m = values(opt)
    lrs.append(l)
    ms.append(m)
    for a in case["actions"]:
        opt.step()
        if a is None:
            sched.step()
        else:
            sched.step(a)
        l, m = values(opt)
        lrs.append(l)
        ms.append(m)
    case["momentum_key"] = mom_key(opt)
    case["lrs"], case["momentums"] = lrs, ms
    return case


def trace(name, config, actions, optimizer="SGD", opt_defaults=None):
    return {"name": f"trace/{name}", "optimizer": optimizer,
            "opt_defaults": opt_defaults if opt_defaults is not None else {"momentum": 0.9},
            "base_lrs": [0.1, 0.01], "scheduler": name, "config": config, "actions": actions}


EPOCHS = [None, None, 5, None, 3, 10, None, None, 0, 7, 7, None, 12, 2, None]
ADAM = {"betas": [0.9, 0.999]}


def gen_traces(meta):
    cases = [
        trace("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 4}, [None] * 30, "Adam", ADAM),
        trace("CyclicLR", {"base_lr": [0.001, 0.002], "max_lr": [0.1, 0.05], "step_size_up": 3, "step_size_down": 5, "mode": "exp_range", "gamma": 0.95, "base_momentum": [0.7, 0.8], "max_momentum": 0.95}, [None] * 30, "Adam", {"betas": [0.5, 0.99]}),
        trace("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 4, "cycle_momentum": False}, [None] * 12, "Adam", ADAM),
        trace("OneCycleLR", {"max_lr": 0.1, "total_steps": 30}, [None] * 30, "Adam", ADAM),
        trace("OneCycleLR", {"max_lr": [0.1, 0.2], "total_steps": 25, "three_phase": True, "base_momentum": 0.6, "max_momentum": [0.9, 0.95]}, [None] * 25, "AdamW", ADAM),
        trace("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 4}, [None] * 20, "RAdam", {"betas": [0.8, 0.9]}),
        trace("StepLR", {"step_size": 3, "gamma": 0.5}, EPOCHS),
        trace("MultiStepLR", {"milestones": [2, 5, 5, 9], "gamma": 0.5}, EPOCHS),
        trace("ConstantLR", {"factor": 0.5, "total_iters": 4}, EPOCHS),
        trace("LinearLR", {"start_factor": 0.25, "total_iters": 8}, EPOCHS),
        trace("ExponentialLR", {"gamma": 0.9}, EPOCHS),
        trace("PolynomialLR", {"total_iters": 11, "power": 1.5}, EPOCHS),
        trace("CosineAnnealingLR", {"T_max": 6, "eta_min": 0.001}, EPOCHS),
        trace("LambdaLR", {"lr_lambda": "0.9**epoch"}, EPOCHS),
        trace("MultiplicativeLR", {"lr_lambda": "0.9 + 0.001 * epoch"}, EPOCHS),
        trace("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 4}, EPOCHS),
        trace("OneCycleLR", {"max_lr": 0.1, "total_steps": 20}, EPOCHS),
        trace("CosineAnnealingWarmRestarts", {"T_0": 10}, [0.5, 1.25, 3.7, None, None, 12.3, 40.0, None, 7, 7.5, None]),
        trace("CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 2, "eta_min": 0.001}, [0.5, 2.9, 3.0, 3.1, None, 8.5, 9.0, 20.25, None, None, 100.0, 1, None]),
        trace("CosineAnnealingWarmRestarts", {"T_0": 2, "T_mult": 3}, [None, None, None, 2.5, 7.9, 8, None, 26.5, None]),
    ]
    return {"meta": meta, "cases": [run_trace(c) for c in cases]}


def run_add_group(case):
    w = [torch.zeros(1, requires_grad=True) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": 0.1}, {"params": [w[1]], "lr": 0.01}],
                          momentum=0.9, foreach=False)
    sched = make_scheduler(opt, case["scheduler"], case["config"])
    lrs, ms = [], []

    def record():
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        ms.append([float(g["momentum"]) for g in opt.param_groups])

    record()
    case["error"] = None
    for i, a in enumerate(case["actions"]):
        if i == case["add_after"]:
            opt.add_param_group({"params": [w[2]], "lr": 0.05, "momentum": 0.8})
            case["initial_lr_after_add"] = opt.param_groups[2].get("initial_lr")
        opt.step()
        try:
            if case["scheduler"] == "ReduceLROnPlateau":
                sched.step(case["metrics"][i])
            elif a is None:
                sched.step()
            else:
                sched.step(a)
        except Exception as e:  # torch's error: recorded, and the case ends
            case["error"] = {"type": type(e).__name__, "message": str(e), "action": i}
            break
        record()
    case["initial_lr_at_end"] = opt.param_groups[-1].get("initial_lr")
    case["lrs"], case["momentums"] = lrs, ms
    return case


def add_case(name, config, add_after, actions, metrics=None):
    return {"name": f"add_group/{name}/{len(ADD_CASES)}", "scheduler": name, "config": config,
            "add_after": add_after, "actions": actions, "metrics": metrics}


ADD_CASES = []
PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
for _name, _config, _k, _actions, *_m in [
    ("StepLR", {"step_size": 3, "gamma": 0.5}, 4, [None] * 16),
    ("StepLR", {"step_size": 3, "gamma": 0.5}, 4, [None] * 6 + [9]),
    ("MultiStepLR", {"milestones": [2, 6, 6, 11], "gamma": 0.5}, 3, [None] * 16),
    ("ConstantLR", {"factor": 0.5, "total_iters": 6}, 3, [None] * 12),
    ("ConstantLR", {"factor": 0.5, "total_iters": 6}, 3, [None] * 4 + [2]),
    ("LinearLR", {"start_factor": 0.25, "total_iters": 8}, 3, [None] * 14),
    ("ExponentialLR", {"gamma": 0.9}, 5, [None] * 12),
    ("ExponentialLR", {"gamma": 0.9}, 5, [None] * 7 + [3]),
    ("PolynomialLR", {"total_iters": 11, "power": 1.5}, 4, [None] * 15),
    ("CosineAnnealingLR", {"T_max": 10, "eta_min": 0.001}, 4, [None] * 16),
    ("CosineAnnealingLR", {"T_max": 10, "eta_min": 0.001}, 4, [None] * 8),
    ("CosineAnnealingLR", {"T_max": 10}, 0, [None] * 10),
    ("LambdaLR", {"lr_lambda": "0.9**epoch"}, 3, [None] * 8),
    ("MultiplicativeLR", {"lr_lambda": "0.95"}, 3, [None] * 8),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 4}, 3, [None] * 8),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 4, "cycle_momentum": False}, 3, [None] * 8),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 20}, 3, [None] * 8),
    ("CosineAnnealingWarmRestarts", {"T_0": 5}, 3, [None] * 8),
    ("ReduceLROnPlateau", {"factor": 0.5, "patience": 2}, 3, [None] * 20, PLATEAU_METRICS),
    ("ReduceLROnPlateau", {"factor": 0.5, "patience": 2, "min_lr": [0.0, 0.001]}, 3, [None] * 20, PLATEAU_METRICS),
    ("SequentialLR", {"schedulers": [["LinearLR", {"start_factor": 0.1, "total_iters": 5}], ["CosineAnnealingLR", {"T_max": 30}]], "milestones": [5]}, 7, [None] * 20),
    ("SequentialLR", {"schedulers": [["LinearLR", {"start_factor": 0.1, "total_iters": 5}], ["CosineAnnealingLR", {"T_max": 30}]], "milestones": [5]}, 2, [None] * 10),
    ("SequentialLR", {"schedulers": [["ExponentialLR", {"gamma": 0.9}], ["StepLR", {"step_size": 2, "gamma": 0.5}]], "milestones": [3]}, 5, [None] * 14),
    ("ChainedScheduler", {"schedulers": [["ExponentialLR", {"gamma": 0.97}], ["StepLR", {"step_size": 3, "gamma": 0.5}]]}, 4, [None] * 14),
    ("ChainedScheduler", {"schedulers": [["ConstantLR", {"factor": 0.5, "total_iters": 6}], ["CosineAnnealingLR", {"T_max": 8}]]}, 3, [None] * 14),
    ("ChainedScheduler", {"schedulers": [["ExponentialLR", {"gamma": 0.97}], ["LambdaLR", {"lr_lambda": "0.9**epoch"}]]}, 3, [None] * 8),
]:
    ADD_CASES.append(add_case(_name, _config, _k, _actions, _m[0] if _m else None))


def gen_add_group(meta):
    return {"meta": meta, "cases": [run_add_group(dict(c)) for c in ADD_CASES]}


def main():
    meta = {"torch_version": torch.__version__, "generator": "scripts/gen_scheduler_extra.py"}
    if sys.argv[1:] == ["--only", "add_group"] or not sys.argv[1:]:
        c = gen_add_group(meta)
        os.makedirs(os.path.join(ROOT, "tests/fixtures/sched"), exist_ok=True)
        with open(os.path.join(ROOT, "tests/fixtures/sched/add_group.json"), "w") as f:
            json.dump(c, f, indent=None)
        print(f"sched/add_group.json: {len(c['cases'])} cases", file=sys.stderr)
        if sys.argv[1:]:
            return
    elif sys.argv[1:]:
        sys.exit(f"usage: {sys.argv[0]} [--only add_group]")
    a = gen_schema(meta)
    b = gen_traces(meta)
    with open(os.path.join(ROOT, "tests/fixtures/schedulers_extra.json"), "w") as f:
        json.dump(a, f)
    os.makedirs(os.path.join(ROOT, "tests/fixtures/sched"), exist_ok=True)
    with open(os.path.join(ROOT, "tests/fixtures/sched/traces.json"), "w") as f:
        json.dump(b, f)
    print(f"schedulers_extra.json: {len(a['cases'])} cases; sched/traces.json: {len(b['cases'])} cases",
          file=sys.stderr)


if __name__ == "__main__":
    main()
