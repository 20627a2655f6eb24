#!/usr/bin/env python3
"""Generate the PyTorch reference fixtures used by optarena's parity tests.

Run from the repository root, in a Python environment that has torch (2.15, CPU is enough)
and numpy:

    python scripts/gen_fixtures.py --out tests/fixtures

It writes, in the format of shared/fixtures/SCHEMA.md:

* ``elementwise_<Optimizer>.json`` for SGD, Adam, AdamW, RAdam, NAdam, Adamax, Adagrad,
  Adadelta, RMSprop, Rprop, ASGD and Adafactor: every configuration in PyTorch's own test
  list (``torch.testing._internal.common_optimizers.optim_db``, each OptimizerInfo's
  ``optim_inputs_func(device="cpu", dtype=torch.float32)``), named
  ``<Optimizer>/<desc>/groups1`` (one group) and, for a representative subset (``default``,
  every config whose desc mentions ``maximize``, the last config of torch's list and every
  extra), ``.../groups2`` (two groups, the second with per-group overrides); plus extra
  combinations torch's list misses; each also in float64 (name suffix ``/float64``).
  25 steps, every step recorded (files that would exceed ~3 MB record steps
  1,2,3,5,10,15,20,25 instead). Always ``foreach=False`` (the single-tensor code path).
  The implementation switches ``foreach``, ``fused``, ``capturable`` and ``differentiable``
  are dropped from torch's kwargs.
  Skipped torch configs (the summary printed at the end lists them):
    - configs with a Tensor ``lr`` (SGD "tensor lr", Adagrad "Tensor lr"): the format
      stores plain numbers;
    - configs that torch's list only offers for CUDA devices (``capturable`` variants,
      Tensor lr/betas with capturable): they need a GPU; without ``capturable`` they
      duplicate CPU configs.
* ``elementwise_subnormal.json``: every elementwise optimizer (a few in float64 too) with
  tiny parameters and gradients, ``"param_scale"`` and ``"grad_scale"`` (powers of two, so
  inputs stay exact; fields optarena's reader adds to SCHEMA.md's format: initial values are
  ``hashed(seed, 0, n) * param_scale``, gradients ``hashed(seed, t, n) * grad_scale``). Their
  squares and moving averages fall below the smallest normal number, the range optarena's
  default flush-to-zero mode treats differently from torch. ``--only subnormal`` writes only
  this file.
* ``muon.json``: torch.optim.Muon (float32, 12 steps, every step recorded, ``"compare":
  "direction"`` as SCHEMA.md's Muon section says): the default, nesterov off, several
  momentums (0, 0.3, 0.9), weight_decay 0 and 0.5, every ``adjust_lr_fn``, ns_steps 1, 3
  and 10, a larger eps, other ns_coefficients, and tall, wide, square, single-row and
  single-column shapes; ``/groups2`` cases give the second group other values of most
  options. ``--only muon`` writes only this file.
* ``lbfgs.json``: LBFGS on Rosenbrock and a diagonal quadratic (n = 10), float32 and
  float64, ten settings each (default, strong_wolfe, history_size/max_iter, lr < 1,
  tolerance_grad/tolerance_change, max_eval). ``compare`` follows SCHEMA.md: the case is
  re-run from x0 moved by 1 ulp in 8 patterns; the longest prefix of its first 10 step()
  calls where every perturbed run keeps the loss within 1/10 of SCHEMA's tolerance (and, in
  float64, the same evals) is recorded as a ``trajectory`` case if it has at least 4 calls.
  Otherwise it is an ``outcome`` case holding only the record after 60 (or 100, 200) calls,
  kept only if no perturbed run ends above torch's loss + tolerance (torch itself would pass
  it); if that fails the case is re-seeded (seed from ``<name>#k``), as printed.
* ``schedulers.json``: every scheduler of ``torch.optim.lr_scheduler`` (SGD, two groups with
  lr 0.1 and 0.01, momentum 0.9, 60 epochs). CosineAnnealingWarmRestarts stepped with
  fractional epochs cannot be expressed in the format (no per-step epoch field), so it is
  not generated.
* ``clip.json``: ``clip_grad_norm_`` (norm types 1, 2, 3, inf, 0.5, 1.5; max_norm below and
  above the total norm, and 0) and ``clip_grad_value_``. A case whose torch (f32) result is
  further than 4e-7 (grads) / 2e-6 (total_norm) relative from the same formula in f64 is
  re-seeded (``<name>#k``), so that no fixture sits at the edge of SCHEMA's tolerance.

* ``swalr.json`` (``--only swalr``): torch.optim.swa_utils.SWALR in the ``schedulers.json``
  format: one number or one per group for ``swa_lr``, ``anneal_epochs`` 0, 1, 4, 5, 7, 25, 80
  (never finished), ``"cos"`` and ``"linear"``, annealing down and up; SWALR as SequentialLR's
  second child; and torch's SWA recipe, where a warm-up scheduler (LinearLR,
  CosineAnnealingLR) is built first, SWALR second, and the warm-up is stepped for
  ``warmup.epochs`` epochs before SWALR takes over (``"warmup": {"scheduler", "config",
  "epochs"}``, a field optarena's reader adds to SCHEMA.md's format).

* ``averaged.json`` (``--only averaged``): torch.optim.swa_utils.AveragedModel over a
  ``ParameterList``, SCHEMA.md's AveragedModel section: the default equal running mean
  (``"swa"``) and ``get_ema_multi_avg_fn(decay)`` (``"ema"``) for decay 0.999, 0.99, 0.9, 0.75,
  0.5, 0.3 (lerp weights on both sides of ATen's 0.5 switch), 0 and 1; float32 and (with a
  ``"dtype": "float64"`` field, which optarena's reader adds; absent means float32) float64;
  a case larger than one 16K-element chunk.

* ``sparse_adam.json`` (``--only sparse_adam``): torch.optim.SparseAdam in SCHEMA.md's
  SparseAdam section (``"sparse_rows": true``; rows of the hashed gradient are kept where
  ``hashed(seed, 10000 + t, n_rows) > 0``, then ``to_sparse(sparse_dim=1)``): defaults, lr,
  betas and eps (zero betas too), maximize, per-group overrides, float32 and float64, and
  tables of one to three rows that often get an empty gradient (the step still counts). 20
  steps, every step recorded. Cases with an ``"lr_scheduler": {"name", "config"}`` field (which
  optarena's reader adds to SCHEMA.md's format) also build that torch LR scheduler on the
  optimizer (``make_scheduler``: StepLR; CosineAnnealingLR down to ``eta_min = 0``, so one
  step runs at lr 0; OneCycleLR, which also cycles ``betas[0]``; SequentialLR of a LinearLR
  warm-up and ExponentialLR; SWALR annealing each group to its own ``swa_lr``), step it after
  every ``opt.step()``, and record each step's
  group learning rates (``"lrs"``, the values the step used) and first betas (``"beta1s"``).

* ``bf16.json`` (``--only bf16``): SCHEMA.md's bfloat16 cases, torch's ``fused=True`` CPU
  kernels on bf16 parameters (parameters, gradients and state in bf16, each step computed in
  f32): SGD (momentum, nesterov, dampening, weight_decay, maximize), Adam and AdamW (amsgrad,
  weight_decay, maximize, betas, eps) and Adagrad (lr_decay, initial_accumulator_value, eps,
  weight_decay, maximize), one and two groups, SHAPES (tails of 5, 1, 3 and 2 elements past
  the 16-lane body) and longer tensors (1000, 51, 64, 4099 elements). 25 steps, every step
  recorded.

``--check DIR`` instead re-runs every case found in the fixture files of DIR (e.g.
shared/fixtures/sample) from its own description and reports whether torch reproduces the
stored values bit for bit. The script is deterministic; it takes about two minutes on 2 cores.

Notes on torch's behaviour that the fixtures capture (the default dtype stays float32):
* NAdam's ``mu_product`` and ASGD's ``eta``/``mu`` (and every optimizer's ``step``) are
  0-dim float32 tensors even for float64 parameters, so float64 NAdam/ASGD trajectories
  depend on those values being rounded to f32 (ASGD: eta = f32(lr) at step 1).
* ``clip_grad_norm_`` computes ``max_norm / (total_norm + 1e-6)`` in the gradients' dtype
  (f32) and multiplies by the clamped coefficient, also by exactly 1.0 when not clipping.
* LBFGS records hold params too, but only loss (and float64 evals) decide ``compare``.
"""

import argparse
import base64
import json
import math
import os
import sys
import time
import zlib

import numpy as np
import torch

torch.set_num_threads(1)

MASK64 = (1 << 64) - 1
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
NP_DTYPES = {"float32": "<f4", "float64": "<f8"}
IMPL_SWITCHES = ("foreach", "fused", "capturable", "differentiable")
MAX_FILE_BYTES = 3_000_000
N_STEPS = 25
SPARSE_STEPS = [1, 2, 3, 5, 10, 15, 20, 25]
SHAPES = [[7, 5], [5], [33], [3, 4, 2], [1], [130]]

# --------------------------------------------------------------------------------------
# hashed(seed, t, n): SCHEMA.md's counter-based inputs (wrapping uint64 arithmetic)
# --------------------------------------------------------------------------------------


def _splitmix64_py(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def hashed_py(seed, t, n):
    """Reference (slow, pure Python) implementation of hashed()."""
    out = []
    for i in range(n):
        h = _splitmix64_py((seed * 0x100000001B3 + t * 0x9E3779B1 + i) & MASK64)
        if h & 0xFF == 0:
            out.append(0.0)
        else:
            unit = (h >> 40) / 2.0**24 * 2 - 1
            k = ((h >> 8) & 7) - 4
            out.append(unit * 2.0**k)
    return np.array(out, dtype=np.float64)


def hashed(seed, t, n):
    """hashed(seed, t, n) as float64 values (all exactly representable in f32)."""
    base = (seed * 0x100000001B3 + t * 0x9E3779B1) & MASK64
    with np.errstate(over="ignore"):
        x = np.uint64(base) + np.arange(n, dtype=np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = z ^ (z >> np.uint64(31))
    unit = (h >> np.uint64(40)).astype(np.float64) / 2.0**24 * 2 - 1
    k = ((h >> np.uint64(8)) & np.uint64(7)).astype(np.int64) - 4
    val = np.ldexp(unit, k)
    val[(h & np.uint64(0xFF)) == 0] = 0.0
    return val


def check_hashed():
    # SCHEMA.md's check value (printed to 7-8 significant digits)
    want = [6.380665, -0.01529538, -0.8362646, -0.05153453, 0.34291106, -0.27646607]
    got = hashed(12345, 3, 6).astype(np.float32)
    assert np.allclose(got, want, rtol=1e-6, atol=0), got
    for seed, t, n in [(12345, 3, 300), (0, 0, 50), (2**40 + 17, 25, 200), (424542, 1, 1073)]:
        assert np.array_equal(hashed(seed, t, n), hashed_py(seed, t, n)), (seed, t, n)
        v = hashed(seed, t, n)
        assert np.array_equal(v.astype(np.float32).astype(np.float64), v)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def b64(arr, dtype):
    return base64.b64encode(np.ascontiguousarray(arr, dtype=NP_DTYPES[dtype]).tobytes()).decode("ascii")


def tensor_b64(t, dtype):
    """A tensor's values as SCHEMA.md stores them: numpy's f32/f64 bytes, or for "bfloat16"
    the tensor's own 2-byte bf16 values (numpy has no bfloat16)."""
    t = t.detach().contiguous()
    if dtype == "bfloat16":
        return base64.b64encode(t.view(torch.int16).numpy().astype("<i2").tobytes()).decode("ascii")
    return b64(t.numpy(), dtype)


def unb64(s, dtype):
    if dtype == "bfloat16":
        # The upper 16 bits of the f32 (SCHEMA.md's bfloat16 cases).
        bits = np.frombuffer(base64.b64decode(s), dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(base64.b64decode(s), dtype=NP_DTYPES[dtype])


def numel(shape):
    return int(np.prod(shape)) if shape else 1


def split(values, shapes, dtype):
    out, off = [], 0
    for s in shapes:
        m = numel(s)
        out.append(torch.tensor(values[off:off + m].reshape(s), dtype=torch.float64).to(dtype))
        off += m
    assert off == len(values)
    return out


def to_torch_kwargs(d):
    """JSON keyword arguments -> torch ones (lists become tuples: betas, etas, eps, ...)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


class Seeds:
    """Distinct, deterministic seeds derived from case names."""

    def __init__(self):
        self.used = set()

    def __call__(self, name):
        s = 100_000 + zlib.crc32(name.encode()) % 900_000
        while s in self.used:
            s += 1
        self.used.add(s)
        return s


SEEDS = Seeds()

# --------------------------------------------------------------------------------------
# elementwise optimizers
# --------------------------------------------------------------------------------------


def run_elementwise(case, record_steps):
    dtype = DTYPES[case["dtype"]]
    shapes = [s for g in case["groups"] for s in g["shapes"]]
    n_total = sum(numel(s) for s in shapes)
    seed = case["seed"]
    # Optional scales (elementwise_subnormal.json): powers of two, so the inputs stay exact.
    param_scale, grad_scale = case.get("param_scale", 1.0), case.get("grad_scale", 1.0)
    params = [p.requires_grad_(True)
              for p in split(hashed(seed, 0, n_total) * param_scale, shapes, dtype)]
    groups, i = [], 0
    for g in case["groups"]:
        k = len(g["shapes"])
        groups.append({"params": params[i:i + k], **to_torch_kwargs(g["overrides"])})
        i += k
    cls = getattr(torch.optim, case["optimizer"])
    # Muon has a single-tensor implementation only, and no `foreach` keyword; bfloat16 cases
    # are torch's fused CPU kernels (SCHEMA.md's bfloat16 cases).
    if case["optimizer"] == "Muon":
        impl = {}
    elif case["dtype"] == "bfloat16":
        impl = {"fused": True}
    else:
        impl = {"foreach": False}
    opt = cls(groups, **to_torch_kwargs(case["defaults"]), **impl)
    steps = []
    for t in range(1, max(record_steps) + 1):
        for p, g in zip(params, split(hashed(seed, t, n_total) * grad_scale, shapes, dtype)):
            p.grad = g
        opt.step()
        if t in record_steps:
            steps.append({"step": t, "params": [tensor_b64(p, case["dtype"]) for p in params]})
    return steps


# Per-group overrides of the second group in "groups2" cases. The first dict is used for
# every config (it matches shared/fixtures/sample); the second is added for non-default
# configs so that per-group values of the config's own options are exercised too.
GROUP2 = {
    "SGD": ({"lr": 0.0025, "weight_decay": 0.05}, {"momentum": 0.5}),
    "Adam": ({"lr": 0.0005, "betas": [0.8, 0.99]}, {"weight_decay": 0.02, "amsgrad": False}),
    "AdamW": ({"lr": 0.0005, "weight_decay": 0.2}, {"betas": [0.8, 0.99], "amsgrad": False}),
    "RAdam": ({"lr": 0.002, "eps": 1e-06}, {"weight_decay": 0.02, "betas": [0.8, 0.99]}),
    "NAdam": ({"lr": 0.001}, {"weight_decay": 0.02, "momentum_decay": 0.008}),
    "Adamax": ({"lr": 0.001}, {"weight_decay": 0.02, "betas": [0.8, 0.99]}),
    "Adagrad": ({"lr": 0.02}, {"weight_decay": 0.02, "lr_decay": 0.1}),
    "Adadelta": ({"lr": 0.5}, {"weight_decay": 0.02, "rho": 0.8}),
    "RMSprop": ({"lr": 0.002}, {"weight_decay": 0.02, "alpha": 0.9, "momentum": 0.5, "centered": False}),
    "Rprop": ({"lr": 0.001}, {"etas": [0.4, 1.3], "step_sizes": [1e-05, 1.0]}),
    "ASGD": ({"lr": 0.02}, {"weight_decay": 0.02, "lambd": 0.001, "alpha": 0.5}),
    "Adafactor": ({"lr": 0.005}, {"weight_decay": 0.02, "beta2_decay": -0.6}),
}

# Extra combinations torch's list misses: (desc, kwargs[, shapes]).
EXTRAS = {
    "SGD": [
        ("extra: nesterov, weight_decay, maximize", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
        ("extra: momentum, dampening, weight_decay, maximize", {"lr": 0.01, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05, "maximize": True}),
        ("extra: nesterov, lr", {"lr": 0.05, "momentum": 0.5, "nesterov": True}),
    ],
    "Adam": [
        ("extra: amsgrad, maximize, weight_decay", {"weight_decay": 0.1, "amsgrad": True, "maximize": True}),
        ("extra: decoupled_weight_decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("extra: decoupled_weight_decay, amsgrad, maximize", {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True, "maximize": True, "decoupled_weight_decay": True}),
        ("extra: betas, eps", {"lr": 0.02, "betas": [0.5, 0.9], "eps": 0.001}),
    ],
    "AdamW": [
        ("extra: amsgrad, maximize", {"weight_decay": 0.1, "amsgrad": True, "maximize": True}),
        ("extra: betas, eps, zero weight_decay", {"lr": 0.02, "betas": [0.5, 0.9], "eps": 0.001, "weight_decay": 0.0}),
    ],
    "RAdam": [
        ("extra: decoupled_weight_decay, maximize", {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
        ("extra: betas, lr", {"lr": 0.01, "betas": [0.8, 0.9]}),
    ],
    "NAdam": [
        ("extra: decoupled_weight_decay, maximize, betas", {"lr": 0.01, "betas": [0.8, 0.99], "weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True}),
        ("extra: decoupled_weight_decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ],
    "Adamax": [
        ("extra: betas, eps, weight_decay", {"lr": 0.01, "betas": [0.8, 0.95], "eps": 0.0001, "weight_decay": 0.05}),
    ],
    "Adagrad": [
        ("extra: lr_decay, initial_accumulator_value, eps", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.5, "eps": 1e-06}),
        ("extra: lr_decay, maximize, weight_decay", {"lr": 0.05, "lr_decay": 0.2, "weight_decay": 0.05, "maximize": True}),
    ],
    "Adadelta": [
        ("extra: rho, eps, lr, maximize", {"lr": 0.5, "rho": 0.8, "eps": 0.0001, "maximize": True}),
    ],
    "RMSprop": [
        ("extra: momentum, not centered", {"momentum": 0.9}),
        ("extra: centered, momentum, alpha, eps", {"lr": 0.005, "alpha": 0.9, "eps": 1e-05, "centered": True, "momentum": 0.5}),
        ("extra: alpha, maximize", {"alpha": 0.5, "maximize": True}),
    ],
    "Rprop": [
        ("extra: etas, step_sizes", {"lr": 0.05, "etas": [0.3, 1.5], "step_sizes": [0.001, 0.2]}),
        ("extra: etas, step_sizes, maximize", {"lr": 0.001, "etas": [0.6, 1.1], "step_sizes": [0.0001, 0.01], "maximize": True}),
    ],
    "ASGD": [
        ("extra: small t0", {"t0": 5}),
        ("extra: lambd, alpha, t0, weight_decay", {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 3, "weight_decay": 0.01}),
        ("extra: maximize, lambd, lr", {"lr": 0.1, "lambd": 0.05, "maximize": True}),
    ],
    "Adafactor": [
        ("extra: eps with null, d, beta2_decay", {"lr": 0.02, "beta2_decay": -0.5, "eps": [None, 0.01], "d": 2.0}),
        ("extra: explicit eps1", {"eps": [1e-15, 0.001]}),
        ("extra: maximize, weight_decay, lr", {"lr": 0.05, "weight_decay": 0.05, "maximize": True}),
        ("extra: 1-D, 3-D, 4-D and size-1 shapes", {}, [[4, 3, 5], [2, 3, 4, 5], [17], [6, 1], [1, 6], [1, 1], [2, 1, 3]]),
    ],
}

ELEMENTWISE = ["SGD", "Adam", "AdamW", "RAdam", "NAdam", "Adamax", "Adagrad", "Adadelta",
               "RMSprop", "Rprop", "ASGD", "Adafactor"]


def _has_tensor(v):
    if torch.is_tensor(v):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    return False


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def torch_configs(skipped):
    """{optimizer: [(desc, kwargs)]} from torch's optim_db; records skipped configs."""
    from torch.testing._internal.common_optimizers import optim_db

    out = {}
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in ELEMENTWISE:
            continue
        cpu = info.optim_inputs_func(device="cpu", dtype=torch.float32)
        cfgs, seen = [], set()
        for oi in cpu:
            if oi.params is not None:
                skipped.append((name, oi.desc, "custom params layout, not expressible"))
                continue
            if any(_has_tensor(v) for v in oi.kwargs.values()):
                skipped.append((name, oi.desc, "Tensor lr/betas (format stores numbers)"))
                continue
            kw = {k: _jsonable(v) for k, v in oi.kwargs.items() if k not in IMPL_SWITCHES}
            if oi.desc in seen:
                raise RuntimeError(f"duplicate desc {name}/{oi.desc}")
            seen.add(oi.desc)
            cfgs.append((oi.desc, kw))
        try:
            cuda = info.optim_inputs_func(device="cuda", dtype=torch.float32)
        except Exception as e:  # pragma: no cover - depends on torch internals
            cuda = []
            print(f"note: could not list CUDA-only configs of {name}: {e}", file=sys.stderr)
        cpu_descs = {oi.desc for oi in cpu}
        for oi in cuda:
            if oi.desc not in cpu_descs:
                skipped.append((name, oi.desc, "CUDA-only config (capturable=True on a GPU)"))
        out[name] = cfgs
    return out


def elementwise_cases(name, cfgs):
    base2, more2 = GROUP2[name]
    specs = []
    last_torch = cfgs[-1][0]
    for entry in cfgs + [tuple(e) for e in EXTRAS.get(name, [])]:
        desc, kw = entry[0], entry[1]
        shapes = entry[2] if len(entry) > 2 else SHAPES
        two = desc == "default" or "maximize" in desc or desc == last_torch or desc.startswith("extra:")
        layouts = [("groups1", [{"overrides": {}, "shapes": shapes}])]
        if two:
            ov = dict(base2)
            if desc != "default":
                for k, v in more2.items():
                    # only override options the config itself uses (or harmless ones)
                    if k in kw or k in ("weight_decay", "betas", "alpha", "rho", "lambd", "beta2_decay"):
                        ov[k] = v
                if name == "SGD" and "momentum" not in kw:
                    ov.pop("momentum", None)
                if name == "SGD" and kw.get("nesterov"):
                    ov["dampening"] = 0.0
            h = len(shapes) // 2
            layouts.append(("groups2", [{"overrides": {}, "shapes": shapes[:h]},
                                        {"overrides": ov, "shapes": shapes[h:]}]))
        for dtype in ("float32", "float64"):
            for lname, groups in layouts:
                cname = f"{name}/{desc}/{lname}" + ("/float64" if dtype == "float64" else "")
                specs.append({"name": cname, "optimizer": name, "dtype": dtype, "defaults": dict(kw),
                              "groups": groups, "seed": SEEDS(cname)})
    return specs


def gen_elementwise(out_dir, meta, skipped, summary):
    cfgs = torch_configs(skipped)
    for name in ELEMENTWISE:
        specs = elementwise_cases(name, cfgs[name])
        for record in (list(range(1, N_STEPS + 1)), SPARSE_STEPS):
            cases = [dict(s, steps=run_elementwise(s, record)) for s in specs]
            text = json.dumps({"meta": meta, "cases": cases})
            if len(text) <= MAX_FILE_BYTES:
                break
        fname = f"elementwise_{name}.json"
        write(out_dir, fname, text)
        summary.append((fname, len(cases), len(text),
                        "every step" if len(record) == N_STEPS else f"steps {record}"))


# Subnormal state: tiny gradients (and parameters) whose squares and averages fall below the
# smallest normal number, the range where Intel cores slow down and where optarena's default
# flush-to-zero mode differs from torch. Every case must pass in both modes.
SUBNORMAL_SCALES = {
    # dtype: (param_scale, grad_scale). hashed() values lie in [2^-28, 2^4); the f32 scales
    # put gradients near 2^-66 (squares near 2^-132, below f32's 2^-126) and parameters near
    # 2^-60, so the updates are visible at a relative tolerance. Same idea for f64 (2^-1022).
    "float32": (2.0 ** -60, 2.0 ** -66),
    "float64": (2.0 ** -500, 2.0 ** -530),
}
SUBNORMAL_CONFIGS = [
    ("SGD", "momentum, nesterov", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    ("Adam", "default", {}),
    ("Adam", "amsgrad, weight_decay", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", "default", {}),
    ("RAdam", "default", {}),
    ("NAdam", "default", {}),
    ("Adamax", "default", {}),
    ("Adagrad", "lr_decay", {"lr_decay": 0.01}),
    ("Adadelta", "default", {}),
    ("RMSprop", "centered, momentum", {"centered": True, "momentum": 0.9}),
    ("RMSprop", "default", {}),
    ("Rprop", "default", {}),
    ("ASGD", "default", {}),
    ("Adafactor", "default", {}),
]


def gen_subnormal(out_dir, meta, summary):
    specs = []
    for name, desc, kw in SUBNORMAL_CONFIGS:
        for dtype in ("float32", "float64"):
            if dtype == "float64" and name not in ("Adam", "Adagrad", "RMSprop"):
                continue
            cname = f"{name}/subnormal/{desc}" + ("/float64" if dtype == "float64" else "")
            param_scale, grad_scale = SUBNORMAL_SCALES[dtype]
            specs.append({"name": cname, "optimizer": name, "dtype": dtype, "defaults": dict(kw),
                          "groups": [{"overrides": {}, "shapes": [[7, 5], [5], [33]]}],
                          "seed": SEEDS(cname), "param_scale": param_scale,
                          "grad_scale": grad_scale})
    cases = [dict(s, steps=run_elementwise(s, list(range(1, 11)))) for s in specs]
    text = json.dumps({"meta": meta, "cases": cases})
    fname = "elementwise_subnormal.json"
    write(out_dir, fname, text)
    summary.append((fname, len(cases), len(text), "every step of 10"))


# --------------------------------------------------------------------------------------
# bfloat16 (bf16.json): torch's fused CPU kernels on bf16 parameters
# --------------------------------------------------------------------------------------

# (optimizer, desc, defaults, overrides of a second group or None, shapes). torch has fused CPU
# kernels for these four. lr is raised in most cases so that updates are larger than half a
# bf16 unit in the last place of the parameters (2^-9 relative), where they would stall.
BF16_SHAPES = SHAPES
BF16_LONG = [[1000], [17, 3], [64], [4099]]
BF16_CASES = [
    ("SGD", "default", {}, None, BF16_SHAPES),
    ("SGD", "lr", {"lr": 0.05}, {"lr": 0.0025, "weight_decay": 0.05}, BF16_SHAPES),
    ("SGD", "momentum", {"lr": 0.02, "momentum": 0.9}, None, BF16_SHAPES),
    ("SGD", "nesterov, weight_decay, maximize",
     {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}, None, BF16_SHAPES),
    ("SGD", "momentum, dampening, weight_decay, maximize",
     {"lr": 0.01, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05, "maximize": True},
     {"momentum": 0.5, "lr": 0.03}, BF16_SHAPES),
    ("SGD", "nesterov, long", {"lr": 0.05, "momentum": 0.5, "nesterov": True}, None, BF16_LONG),
    ("Adam", "default", {}, None, BF16_SHAPES),
    ("Adam", "lr", {"lr": 0.02}, {"lr": 0.005, "betas": [0.8, 0.99]}, BF16_SHAPES),
    ("Adam", "amsgrad", {"lr": 0.01, "amsgrad": True}, None, BF16_SHAPES),
    ("Adam", "weight_decay", {"lr": 0.01, "weight_decay": 0.1}, None, BF16_SHAPES),
    ("Adam", "amsgrad, maximize, weight_decay",
     {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}, None, BF16_SHAPES),
    ("Adam", "betas, eps", {"lr": 0.02, "betas": [0.5, 0.9], "eps": 0.001}, None, BF16_SHAPES),
    ("Adam", "long", {"lr": 0.01}, None, BF16_LONG),
    ("AdamW", "default", {}, None, BF16_SHAPES),
    ("AdamW", "lr, weight_decay", {"lr": 0.02, "weight_decay": 0.2}, {"lr": 0.005, "weight_decay": 0.0}, BF16_SHAPES),
    ("AdamW", "amsgrad", {"lr": 0.01, "amsgrad": True}, None, BF16_SHAPES),
    ("AdamW", "amsgrad, maximize", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True},
     None, BF16_SHAPES),
    ("AdamW", "betas, eps", {"lr": 0.02, "betas": [0.5, 0.9], "eps": 0.001}, None, BF16_SHAPES),
    ("AdamW", "long", {"lr": 0.01, "weight_decay": 0.1}, None, BF16_LONG),
    ("Adagrad", "default", {}, None, BF16_SHAPES),
    ("Adagrad", "lr", {"lr": 0.1}, {"lr": 0.02}, BF16_SHAPES),
    ("Adagrad", "lr_decay, initial_accumulator_value, eps",
     {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.5, "eps": 1e-06}, None, BF16_SHAPES),
    ("Adagrad", "lr_decay, maximize, weight_decay",
     {"lr": 0.05, "lr_decay": 0.2, "weight_decay": 0.05, "maximize": True}, None, BF16_SHAPES),
    ("Adagrad", "long", {"lr": 0.05}, None, BF16_LONG),
]


def gen_bf16(out_dir, meta, summary):
    """bf16.json: SCHEMA.md's bfloat16 cases, torch's fused=True step on bf16 parameters."""
    cases = []
    for opt, desc, defaults, g2, shapes in BF16_CASES:
        if g2 is None:
            groups = [{"overrides": {}, "shapes": shapes}]
        else:
            groups = [{"overrides": {}, "shapes": shapes[:3]}, {"overrides": g2, "shapes": shapes[3:]}]
        name = f"{opt}/bf16/{desc}/groups{len(groups)}"
        case = {"name": name, "optimizer": opt, "dtype": "bfloat16", "defaults": dict(defaults),
                "groups": groups, "seed": SEEDS(name)}
        case["steps"] = run_elementwise(case, list(range(1, N_STEPS + 1)))
        cases.append(case)
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "bf16.json", text)
    summary.append(("bf16.json", len(cases), len(text), "every step of 25"))


# --------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------

# Every option of torch.optim.Muon, one at a time and in combinations: (desc, kwargs[, shapes]).
# Shapes cover wide, tall, square, a single row and column (rank-1 updates) and sizes that are
# not multiples of the GEMM's register blocks.
MUON_SHAPES = [[7, 5], [16, 9], [3, 40], [12, 12]]
MUON_CONFIGS = [
    ("default", {}),
    ("nesterov off", {"nesterov": False}),
    ("momentum 0.9", {"momentum": 0.9}),
    ("momentum 0", {"momentum": 0.0}),
    ("momentum 0.3, nesterov", {"momentum": 0.3}),
    ("momentum 0.3, nesterov off", {"momentum": 0.3, "nesterov": False}),
    ("weight_decay 0", {"weight_decay": 0.0}),
    ("weight_decay 0.5, lr 0.02", {"weight_decay": 0.5, "lr": 0.02}),
    ("adjust_lr_fn original", {"adjust_lr_fn": "original"}),
    ("adjust_lr_fn match_rms_adamw", {"adjust_lr_fn": "match_rms_adamw"}),
    ("adjust_lr_fn spectral_unclamped", {"adjust_lr_fn": "spectral_unclamped"}),
    ("ns_steps 1", {"ns_steps": 1}),
    ("ns_steps 3", {"ns_steps": 3}),
    ("ns_steps 10", {"ns_steps": 10}),
    ("eps 1e-3", {"eps": 1e-3}),
    ("ns_coefficients (2, -1.5, 0.5)", {"ns_coefficients": [2.0, -1.5, 0.5]}),
    ("lr 0.02, momentum 0.9, nesterov off, match_rms_adamw",
     {"lr": 0.02, "momentum": 0.9, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"}),
    ("tall and wide", {}, [[64, 16], [16, 64], [33, 7], [7, 33], [1, 9], [9, 1], [2, 2]]),
    ("larger", {"adjust_lr_fn": "spectral_unclamped"}, [[96, 48], [40, 130]]),
]
MUON_GROUP2 = {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.02, "nesterov": False,
               "adjust_lr_fn": "match_rms_adamw", "ns_steps": 4}


def gen_muon(out_dir, meta, summary):
    """muon.json: SCHEMA.md's Muon section (compared by update direction and norm)."""
    specs = []
    for desc, kw, *rest in MUON_CONFIGS:
        shapes = rest[0] if rest else MUON_SHAPES
        for n_groups in (1, 2):
            if n_groups == 2 and desc not in ("default", "nesterov off", "tall and wide"):
                continue
            cname = f"Muon/{desc}/groups{n_groups}"
            if n_groups == 1:
                groups = [{"overrides": {}, "shapes": shapes}]
            else:
                half = len(shapes) // 2
                groups = [{"overrides": {}, "shapes": shapes[:half]},
                          {"overrides": dict(MUON_GROUP2), "shapes": shapes[half:]}]
            specs.append({"name": cname, "optimizer": "Muon", "dtype": "float32",
                          "defaults": dict(kw), "groups": groups, "seed": SEEDS(cname),
                          "compare": "direction"})
    cases = [dict(s, steps=run_elementwise(s, list(range(1, 13)))) for s in specs]
    text = json.dumps({"meta": meta, "cases": cases})
    fname = "muon.json"
    write(out_dir, fname, text)
    summary.append((fname, len(cases), len(text), "every step of 12"))


# --------------------------------------------------------------------------------------
# LBFGS
# --------------------------------------------------------------------------------------


def lbfgs_problem(case):
    dtype = DTYPES[case["dtype"]]
    n, seed = case["n"], case["seed"]
    x0 = torch.tensor(hashed(seed, 0, n) * case["x0_scale"], dtype=torch.float64).to(dtype)
    if case["function"] == "rosenbrock":
        def f(x):
            return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
    elif case["function"] == "quadratic":
        d = torch.tensor(np.abs(hashed(seed, 1, n)) + case["d_offset"], dtype=torch.float64).to(dtype)
        b = torch.tensor(hashed(seed, 2, n), dtype=torch.float64).to(dtype)

        def f(x):
            return 0.5 * (d * x * x).sum() - (b * x).sum()
    else:
        raise ValueError(case["function"])
    return x0, f


def run_lbfgs(case, n_calls, x0=None):
    x0_default, f = lbfgs_problem(case)
    x = (x0_default if x0 is None else x0).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], **case["defaults"])

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    recs = []
    for t in range(1, n_calls + 1):
        loss = opt.step(closure)
        recs.append({"step": t, "loss": float(loss.detach()), "evals": int(opt.state[x]["func_evals"]),
                     "x": x.detach().clone()})
    return recs


def lbfgs_tol(dtype, v):
    return (1e-4 * abs(v) + 1e-6) if dtype == "float32" else (1e-8 * abs(v) + 1e-12)


def perturbations(x0, seed):
    """x0 moved by 1 ulp in 8 deterministic patterns."""
    inf = torch.tensor(float("inf"), dtype=x0.dtype)
    up, down = torch.nextafter(x0, inf), torch.nextafter(x0, -inf)
    alt = torch.where(torch.arange(len(x0)) % 2 == 0, up, down)
    first = x0.clone()
    first[0] = up[0]
    last = x0.clone()
    last[-1] = down[-1]
    out = [up, down, alt, first, last]
    for t in (97, 98, 99):
        out.append(torch.where(torch.tensor(hashed(seed, t, len(x0))) > 0, up, down))
    return out


LBFGS_SETTINGS = [
    {},
    {"line_search_fn": "strong_wolfe"},
    {"history_size": 5, "max_iter": 7},
    {"history_size": 5, "max_iter": 7, "line_search_fn": "strong_wolfe"},
    {"lr": 0.5},
    {"lr": 0.5, "line_search_fn": "strong_wolfe"},
    {"tolerance_grad": 1e-05, "tolerance_change": 1e-07},
    {"max_iter": 4, "max_eval": 6},
    {"history_size": 2, "max_iter": 10, "tolerance_change": 1e-12, "line_search_fn": "strong_wolfe"},
    {"lr": 0.1, "max_iter": 3, "history_size": 10},
]
LBFGS_TRAJ_CALLS = 10      # step() calls recorded by a trajectory case (at most)
LBFGS_MIN_TRAJ = 4         # shorter stable prefixes make an outcome case instead
LBFGS_MARGIN = 0.1         # perturbed runs must stay within this fraction of the tolerance
LBFGS_OUTCOME_CALLS = (60, 100, 200)
LBFGS_RESEEDS = 6


def lbfgs_case_json(case, recs):
    out = {k: v for k, v in case.items()}
    out["steps"] = [{"step": r["step"], "loss": r["loss"], "evals": r["evals"],
                     "params": [b64(r["x"].numpy(), case["dtype"])]} for r in recs]
    return out


def classify_lbfgs(case):
    """Trajectory (longest stable prefix, >= LBFGS_MIN_TRAJ calls) or outcome, or None.

    A record is stable when every 1-ulp perturbation of x0 gives a loss within
    LBFGS_MARGIN x SCHEMA's tolerance (and, in float64, the same evals). An outcome case
    is kept only when no perturbed run ends above torch's loss + tolerance, i.e. when
    torch itself would pass it from a perturbed start; None otherwise.
    """
    dtype = case["dtype"]
    x0, _ = lbfgs_problem(case)
    pert = perturbations(x0, case["seed"])
    ref = run_lbfgs(case, LBFGS_TRAJ_CALLS)
    k = len(ref)
    for xp in pert:
        for j, (a, b) in enumerate(zip(ref, run_lbfgs(case, LBFGS_TRAJ_CALLS, xp))):
            bad = abs(a["loss"] - b["loss"]) > LBFGS_MARGIN * lbfgs_tol(dtype, a["loss"])
            bad |= dtype == "float64" and a["evals"] != b["evals"]
            if bad:
                k = min(k, j)
                break
    if k >= LBFGS_MIN_TRAJ:
        return "trajectory", ref[:k]
    for n_calls in LBFGS_OUTCOME_CALLS:
        ref = run_lbfgs(case, n_calls)
        final = ref[-1]["loss"]
        worst = max(run_lbfgs(case, n_calls, xp)[-1]["loss"] for xp in pert)
        if worst <= final + lbfgs_tol(dtype, final):
            return "outcome", ref[-1:]
    return None, None


def gen_lbfgs(out_dir, meta, summary, notes):
    cases = []
    for function in ("rosenbrock", "quadratic"):
        for dtype in ("float32", "float64"):
            for i, d in enumerate(LBFGS_SETTINGS):
                name = f"LBFGS/{function}/{i}/{dtype}"
                for attempt in range(LBFGS_RESEEDS):
                    seed = SEEDS(name if attempt == 0 else f"{name}#{attempt}")
                    case = {"name": name, "optimizer": "LBFGS", "function": function, "dtype": dtype,
                            "defaults": dict(d), "seed": seed, "n": 10, "x0_scale": 0.5,
                            "d_offset": 0.5}
                    compare, recs = classify_lbfgs(case)
                    if compare:
                        break
                    notes.append(f"{name}: seed {seed} dropped: a 1-ulp perturbed start ends above "
                                 f"torch's final loss + tolerance")
                if not compare:
                    notes.append(f"{name}: no fair seed found, case omitted")
                    continue
                case["compare"] = compare
                cases.append(lbfgs_case_json(case, recs))
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "lbfgs.json", text)
    ntraj = sum(c["compare"] == "trajectory" for c in cases)
    summary.append(("lbfgs.json", len(cases), len(text), f"{ntraj} trajectory, {len(cases) - ntraj} outcome"))


# --------------------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------------------

LAMBDAS = {
    "LambdaLR": {"0.95**epoch": lambda epoch: 0.95 ** epoch},
    "MultiplicativeLR": {"0.9": lambda epoch: 0.9},
}
N_EPOCHS = 60


def make_scheduler(opt, name, config):
    L = torch.optim.lr_scheduler
    cfg = dict(config)
    if name in LAMBDAS:
        cfg["lr_lambda"] = LAMBDAS[name][cfg["lr_lambda"]]
    if name == "SWALR":
        return torch.optim.swa_utils.SWALR(opt, **cfg)
    if name in ("SequentialLR", "ChainedScheduler"):
        cfg["schedulers"] = [make_scheduler(opt, n, c) for n, c in cfg["schedulers"]]
        if name == "ChainedScheduler":
            return L.ChainedScheduler(optimizer=opt, **cfg)
    return getattr(L, name)(opt, **cfg)


def run_scheduler(case):
    w = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": case["base_lrs"][0]},
                           {"params": [w[1]], "lr": case["base_lrs"][1]}],
                          momentum=case["momentum"], foreach=False)
    sched = make_scheduler(opt, case["scheduler"], case["config"])
    lrs, moms = [], []
    for e in range(N_EPOCHS):
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        moms.append([float(g["momentum"]) for g in opt.param_groups])
        opt.step()  # no gradients: a no-op, but keeps torch's call order (no warning)
        if case["scheduler"] == "ReduceLROnPlateau":
            sched.step(case["metrics"][e])
        else:
            sched.step()
    return lrs, moms


def plateau_metrics(mode):
    """60 dyadic numbers: bursts of improvement separated by noisy plateaus."""
    vals, level = [], 1.0
    for e in range(N_EPOCHS):
        if e % 12 < 3:
            level -= 0.0625 * 0.5 ** (e // 12)
        wiggle = [0.0, 0.015625, 0.0078125, 0.0][e % 4]
        vals.append(level + wiggle)
    return vals if mode == "min" else [2.0 - v for v in vals]


SCHEDULERS = [
    ("LambdaLR", {"lr_lambda": "0.95**epoch"}),
    ("MultiplicativeLR", {"lr_lambda": "0.9"}),
    ("StepLR", {"step_size": 7, "gamma": 0.5}),
    ("StepLR", {"step_size": 1, "gamma": 0.95}),
    ("StepLR", {"step_size": 10}),
    ("MultiStepLR", {"milestones": [5, 12, 30], "gamma": 0.3}),
    ("MultiStepLR", {"milestones": [10, 10, 20]}),
    ("MultiStepLR", {"milestones": [40, 25], "gamma": 0.5}),
    ("ConstantLR", {}),
    ("ConstantLR", {"factor": 0.5, "total_iters": 10}),
    ("ConstantLR", {"factor": 0.25, "total_iters": 0}),
    ("LinearLR", {}),
    ("LinearLR", {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 20}),
    ("LinearLR", {"start_factor": 1.0, "end_factor": 0.2, "total_iters": 30}),
    ("ExponentialLR", {"gamma": 0.93}),
    ("ExponentialLR", {"gamma": 0.99}),
    ("PolynomialLR", {}),
    ("PolynomialLR", {"total_iters": 40, "power": 2.0}),
    ("PolynomialLR", {"total_iters": 30, "power": 0.5}),
    ("CosineAnnealingLR", {"T_max": 20, "eta_min": 0.001}),
    ("CosineAnnealingLR", {"T_max": 60}),
    ("CosineAnnealingLR", {"T_max": 10, "eta_min": 0.0}),
    ("CosineAnnealingLR", {"T_max": 7, "eta_min": 0.005}),
    ("CosineAnnealingWarmRestarts", {"T_0": 10}),
    ("CosineAnnealingWarmRestarts", {"T_0": 5, "T_mult": 2, "eta_min": 0.001}),
    ("CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 3}),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 5, "mode": "triangular"}),
    ("CyclicLR", {"base_lr": [0.01, 0.001], "max_lr": [0.1, 0.02], "step_size_up": 4, "step_size_down": 8, "mode": "triangular2"}),
    ("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 6, "mode": "exp_range", "gamma": 0.97}),
    ("CyclicLR", {"base_lr": 0.01, "max_lr": 0.05, "step_size_up": 10, "cycle_momentum": False}),
    ("CyclicLR", {"base_lr": 0.002, "max_lr": 0.2, "step_size_up": 3, "step_size_down": 5, "mode": "exp_range", "gamma": 0.9, "base_momentum": 0.7, "max_momentum": 0.95}),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 60}),
    ("OneCycleLR", {"max_lr": [0.2, 0.05], "total_steps": 60, "anneal_strategy": "linear", "pct_start": 0.25}),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 60, "three_phase": True}),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 60, "three_phase": True, "anneal_strategy": "linear"}),
    ("OneCycleLR", {"max_lr": 0.1, "epochs": 6, "steps_per_epoch": 10, "div_factor": 10.0, "final_div_factor": 100.0, "base_momentum": 0.8, "max_momentum": 0.9}),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 70, "cycle_momentum": False}),
    ("OneCycleLR", {"max_lr": [0.1, 0.02], "total_steps": 80, "base_momentum": [0.8, 0.7], "max_momentum": [0.9, 0.95]}),
    ("SequentialLR", {"schedulers": [["ConstantLR", {"factor": 0.1, "total_iters": 2}], ["ExponentialLR", {"gamma": 0.9}]], "milestones": [2]}),
    ("SequentialLR", {"schedulers": [["LinearLR", {"start_factor": 0.1, "total_iters": 5}], ["CosineAnnealingLR", {"T_max": 30, "eta_min": 0.001}], ["StepLR", {"step_size": 5, "gamma": 0.5}]], "milestones": [5, 35]}),
    ("ChainedScheduler", {"schedulers": [["ConstantLR", {"factor": 0.1, "total_iters": 2}], ["ExponentialLR", {"gamma": 0.9}]]}),
    ("ChainedScheduler", {"schedulers": [["LinearLR", {"start_factor": 0.5, "total_iters": 10}], ["StepLR", {"step_size": 15, "gamma": 0.3}], ["ExponentialLR", {"gamma": 0.98}]]}),
    ("ReduceLROnPlateau", {"mode": "min", "factor": 0.5, "patience": 3}),
    ("ReduceLROnPlateau", {"mode": "max", "factor": 0.3, "patience": 2, "threshold": 0.01, "threshold_mode": "abs", "cooldown": 3}),
    ("ReduceLROnPlateau", {"mode": "min", "factor": 0.5, "patience": 2, "threshold": 0.05, "threshold_mode": "rel", "cooldown": 2, "min_lr": [0.02, 0.001]}),
    ("ReduceLROnPlateau", {"mode": "min", "factor": 0.5, "patience": 0, "min_lr": 0.0005, "eps": 0.001}),
    ("ReduceLROnPlateau", {"mode": "max", "factor": 0.5, "patience": 1, "threshold_mode": "rel", "threshold": 0.02}),
]


def gen_schedulers(out_dir, meta, summary):
    cases = []
    for i, (name, config) in enumerate(SCHEDULERS):
        metrics = plateau_metrics(config.get("mode", "min")) if name == "ReduceLROnPlateau" else None
        case = {"name": f"sched/{name}/{i}", "scheduler": name, "config": config,
                "base_lrs": [0.1, 0.01], "momentum": 0.9, "metrics": metrics}
        case["lrs"], case["momentums"] = run_scheduler(case)
        if name == "ReduceLROnPlateau":
            reductions = sum(a != b for a, b in zip(case["lrs"], case["lrs"][1:]))
            assert reductions >= 3, (case["name"], reductions)
        cases.append(case)
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "schedulers.json", text)
    summary.append(("schedulers.json", len(cases), len(text), ""))


# --------------------------------------------------------------------------------------
# gradient clipping
# --------------------------------------------------------------------------------------

CLIP_SHAPES = [[7, 5], [5], [33], [1000]]


def run_clip(case):
    shapes = case["shapes"]
    n_total = sum(numel(s) for s in shapes)
    params = []
    for g in split(hashed(case["seed"], 1, n_total), shapes, torch.float32):
        p = torch.zeros(g.shape, requires_grad=True)
        p.grad = g
        params.append(p)
    out = {}
    if "max_norm" in case:
        nt = case["norm_type"]
        nt = float("inf") if nt == "inf" else float(nt)
        total = torch.nn.utils.clip_grad_norm_(params, case["max_norm"], norm_type=nt, foreach=False)
        out["total_norm"] = float(total)
    else:
        torch.nn.utils.clip_grad_value_(params, case["clip_value"], foreach=False)
    out["grads"] = [b64(p.grad.numpy(), "float32") for p in params]
    return out


CLIP_MAX_GRAD_ERR = 4e-7   # torch's clipped grads vs exact f64 arithmetic (SCHEMA allows 1e-6)
CLIP_MAX_NORM_ERR = 2e-6   # torch's total_norm vs exact f64 (SCHEMA allows 1e-5)
CLIP_RESEEDS = 10


def clip_errors(case, r):
    """Relative errors of torch's f32 result against the same formula in exact-ish f64."""
    g = hashed(case["seed"], 1, sum(numel(s) for s in case["shapes"]))
    got = np.concatenate([unb64(x, "float32") for x in r["grads"]]).astype(np.float64)
    if "max_norm" not in case:
        return 0.0, float(np.max(np.abs(got - np.clip(g, -case["clip_value"], case["clip_value"]))))
    p = math.inf if case["norm_type"] == "inf" else float(case["norm_type"])
    a = np.abs(g)
    total = float(np.max(a)) if p == math.inf else float(np.sum(a ** p) ** (1.0 / p))
    want = g * min(1.0, case["max_norm"] / (total + 1e-6))
    nz = want != 0
    grad_err = float(np.max(np.abs(got[nz] - want[nz]) / np.abs(want[nz]))) if nz.any() else float(np.max(np.abs(got)))
    return abs(r["total_norm"] - total) / total, grad_err


def clip_case(name, fields, notes):
    """Build a clip case; re-seed while torch's own f32 rounding sits near SCHEMA's tolerance."""
    for attempt in range(CLIP_RESEEDS):
        case = {"name": name, "shapes": fields["shapes"],
                "seed": SEEDS(name if attempt == 0 else f"{name}#{attempt}")}
        case.update({k: v for k, v in fields.items() if k != "shapes"})
        r = run_clip(case)
        norm_err, grad_err = clip_errors(case, r)
        if norm_err <= CLIP_MAX_NORM_ERR and grad_err <= CLIP_MAX_GRAD_ERR:
            break
        notes.append(f"{name}: seed {case['seed']} dropped: torch's f32 result is {norm_err:.2g} (norm) / "
                     f"{grad_err:.2g} (grads) from exact arithmetic")
    else:
        raise RuntimeError(f"{name}: no seed within the error budget")
    if "total_norm" in r:
        case["total_norm"] = r["total_norm"]
    case["grads"] = r["grads"]
    return case


def gen_clip(out_dir, meta, summary, notes):
    cases, i = [], 0
    norm_cases = []
    for norm_type in (2.0, 1.0, 3.0, "inf", 0.5, 1.5):
        big = 10000.0 if norm_type == "inf" or norm_type >= 1 else 1e9  # nothing clipped
        for max_norm in (1.0, 0.1, big):
            norm_cases.append((norm_type, max_norm, CLIP_SHAPES))
    norm_cases += [(2.0, 0.0, CLIP_SHAPES), (2.0, 5.0, [[1]]), ("inf", 0.5, [[3, 4, 2], [130], [1], [64, 64]]),
                   (1.0, 2.0, [[3, 4, 2], [130], [1]])]
    for i, (norm_type, max_norm, shapes) in enumerate(norm_cases):
        cases.append(clip_case(f"clip_norm/{i}", {"shapes": shapes, "max_norm": max_norm,
                                                   "norm_type": norm_type}, notes))
    for j, (clip_value, shapes) in enumerate(((0.3, CLIP_SHAPES), (0.05, CLIP_SHAPES), (1.0, CLIP_SHAPES),
                                             (100.0, CLIP_SHAPES), (0.125, [[3, 4, 2], [130], [1]]))):
        cases.append(clip_case(f"clip_value/{j}", {"shapes": shapes, "clip_value": clip_value}, notes))
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "clip.json", text)
    summary.append(("clip.json", len(cases), len(text), ""))


# --------------------------------------------------------------------------------------
# checking existing fixture files (e.g. shared/fixtures/sample) against this generator
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Stochastic Weight Averaging: SWALR (swalr.json)
# --------------------------------------------------------------------------------------

SWALR_CASES = [
    ({"swa_lr": 0.05}, None),
    ({"swa_lr": [0.05, 0.002], "anneal_epochs": 5, "anneal_strategy": "linear"}, None),
    ({"swa_lr": 0.02, "anneal_epochs": 7, "anneal_strategy": "cos"}, None),
    ({"swa_lr": [0.3, 0.05], "anneal_epochs": 4}, None),            # anneals upwards
    ({"swa_lr": 0.05, "anneal_epochs": 0}, None),
    ({"swa_lr": 0.05, "anneal_epochs": 0, "anneal_strategy": "linear"}, None),
    ({"swa_lr": 0.01, "anneal_epochs": 1, "anneal_strategy": "linear"}, None),
    ({"swa_lr": 0.01, "anneal_epochs": 1}, None),
    ({"swa_lr": [0.001, 0.0], "anneal_epochs": 80, "anneal_strategy": "linear"}, None),  # never done
    ({"swa_lr": 0.004, "anneal_epochs": 25}, None),
    # torch's SWA recipe: the warm-up scheduler is built first, SWALR second; the warm-up is
    # stepped for `epochs` epochs, SWALR after that ("warmup": an optarena extension).
    ({"swa_lr": 0.05, "anneal_epochs": 5}, {"scheduler": "LinearLR",
                                           "config": {"start_factor": 0.25, "total_iters": 8}, "epochs": 12}),
    ({"swa_lr": [0.02, 0.005], "anneal_epochs": 3, "anneal_strategy": "linear"},
     {"scheduler": "CosineAnnealingLR", "config": {"T_max": 30, "eta_min": 0.001}, "epochs": 20}),
    ({"swa_lr": 0.05, "anneal_epochs": 0}, {"scheduler": "LinearLR", "config": {"total_iters": 4}, "epochs": 6}),
]


def run_swalr_recipe(case):
    """SWALR after a warm-up scheduler, as in torch's recipe (the other cases use run_scheduler)."""
    w = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": case["base_lrs"][0]},
                           {"params": [w[1]], "lr": case["base_lrs"][1]}],
                          momentum=case["momentum"], foreach=False)
    wu = case["warmup"]
    warm = make_scheduler(opt, wu["scheduler"], wu["config"])
    swa = torch.optim.swa_utils.SWALR(opt, **case["config"])
    lrs, moms = [], []
    for e in range(N_EPOCHS):
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        moms.append([float(g["momentum"]) for g in opt.param_groups])
        opt.step()
        (warm if e < wu["epochs"] else swa).step()
    return lrs, moms


def gen_swalr(out_dir, meta, summary):
    cases = []
    for i, (config, warmup) in enumerate(SWALR_CASES):
        case = {"name": f"sched/SWALR/{i}", "scheduler": "SWALR", "config": config,
                "base_lrs": [0.1, 0.01], "momentum": 0.9, "metrics": None}
        if warmup is not None:
            case["name"] += f"/after-{warmup['scheduler']}"
            case["warmup"] = warmup
            case["lrs"], case["momentums"] = run_swalr_recipe(case)
        else:
            case["lrs"], case["momentums"] = run_scheduler(case)
        cases.append(case)
    # SWALR as SequentialLR's second child (SequentialLR calls its _update_lr(0) at the milestone).
    case = {"name": "sched/SequentialLR/LinearLR+SWALR", "scheduler": "SequentialLR",
            "config": {"schedulers": [["LinearLR", {"start_factor": 0.5, "total_iters": 5}],
                                      ["SWALR", {"swa_lr": 0.02, "anneal_epochs": 6}]],
                       "milestones": [10]},
            "base_lrs": [0.1, 0.01], "momentum": 0.9, "metrics": None}
    case["lrs"], case["momentums"] = run_scheduler(case)
    cases.append(case)
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "swalr.json", text)
    summary.append(("swalr.json", len(cases), len(text), ""))


# --------------------------------------------------------------------------------------
# Stochastic Weight Averaging: AveragedModel (averaged.json)
# --------------------------------------------------------------------------------------

AVERAGED_SHAPES = [[7, 5], [5], [33]]
AVERAGED_CASES = [  # (kind, decay, dtype, shapes, updates)
    ("swa", None, "float32", AVERAGED_SHAPES, 25),
    ("swa", None, "float64", AVERAGED_SHAPES, 25),
    ("swa", None, "float32", [[130, 130], [3]], 4),   # more than one 16K chunk
    ("ema", 0.999, "float32", AVERAGED_SHAPES, 20),  # torch's default decay
    ("ema", 0.99, "float32", AVERAGED_SHAPES, 20),
    ("ema", 0.9, "float32", AVERAGED_SHAPES, 20),
    ("ema", 0.5, "float32", AVERAGED_SHAPES, 10),    # weight 0.5: ATen's second lerp formula
    ("ema", 0.3, "float32", AVERAGED_SHAPES, 10),    # weight 0.7: ATen's second lerp formula
    ("ema", 0.0, "float32", AVERAGED_SHAPES, 5),     # the average is the last model
    ("ema", 1.0, "float32", AVERAGED_SHAPES, 5),     # the average stays the first model
    ("ema", 0.9, "float64", AVERAGED_SHAPES, 20),
    ("ema", 0.75, "float32", [[130, 130], [3]], 4),
]


def run_averaged(case):
    """AveragedModel over a ParameterList: set the model to hashed(seed, t), update, record."""
    dtype = DTYPES[case.get("dtype", "float32")]
    shapes, seed = case["shapes"], case["seed"]
    n_total = sum(numel(s) for s in shapes)
    model = torch.nn.ParameterList([torch.nn.Parameter(p) for p in split(hashed(seed, 0, n_total), shapes, dtype)])
    su = torch.optim.swa_utils
    if case["averaged"] == "swa":
        avg = su.AveragedModel(model)
    else:
        avg = su.AveragedModel(model, multi_avg_fn=su.get_ema_multi_avg_fn(case["decay"]))
    out = []
    for t in range(1, case["n_updates"] + 1):
        with torch.no_grad():
            for p, v in zip(model.parameters(), split(hashed(seed, t, n_total), shapes, dtype)):
                p.copy_(v)
        avg.update_parameters(model)
        assert int(avg.n_averaged) == t
        out.append({"step": t, "params": [b64(p.detach().numpy(), case.get("dtype", "float32"))
                                          for p in avg.module.parameters()]})
    return out


def gen_averaged(out_dir, meta, summary):
    cases = []
    for kind, decay, dtype, shapes, n in AVERAGED_CASES:
        name = f"averaged/{kind}/{decay}/{dtype}/{'x'.join(str(numel(s)) for s in shapes)}"
        case = {"name": name, "averaged": kind, "decay": decay, "dtype": dtype, "shapes": shapes,
                "seed": SEEDS(name), "n_updates": n}
        case["updates"] = run_averaged(case)
        del case["n_updates"]
        cases.append(case)
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "averaged.json", text)
    summary.append(("averaged.json", len(cases), len(text), ""))


# --------------------------------------------------------------------------------------
# SparseAdam (sparse_adam.json)
# --------------------------------------------------------------------------------------

SPARSE_SHAPES = [[10, 4], [6, 7], [9, 3]]
SPARSE_CASES = [  # (desc, defaults, overrides of a second group or None, dtype, shapes)
    ("default", {}, None, "float32", SPARSE_SHAPES),
    ("default", {}, {"lr": 0.003}, "float32", SPARSE_SHAPES),
    ("lr", {"lr": 0.01}, None, "float32", SPARSE_SHAPES),
    ("betas, eps", {"lr": 0.005, "betas": [0.8, 0.99], "eps": 1e-6}, None, "float32", SPARSE_SHAPES),
    ("maximize", {"lr": 0.002, "maximize": True}, {"betas": [0.5, 0.9]}, "float32", SPARSE_SHAPES),
    ("zero betas", {"betas": [0.0, 0.0], "eps": 0.1}, None, "float32", SPARSE_SHAPES),
    # [2, 5] and [1, 3] often get no row at all: an empty sparse gradient still counts a step.
    ("small tables", {"lr": 0.01}, {"lr": 0.02, "maximize": True}, "float32", [[2, 5], [40, 16], [1, 3], [3, 1]]),
    ("default", {}, None, "float64", SPARSE_SHAPES),
    ("betas, eps, maximize", {"lr": 0.01, "betas": [0.7, 0.95], "eps": 1e-4, "maximize": True},
     {"lr": 0.001}, "float64", SPARSE_SHAPES),
]
SPARSE_STEPS = 20
# (desc, defaults, overrides of a second group or None, dtype, scheduler name, its config)
SPARSE_SCHED_CASES = [
    ("StepLR", {"lr": 0.01}, {"lr": 0.02}, "float32", "StepLR", {"step_size": 4, "gamma": 0.5}),
    ("CosineAnnealingLR to 0", {"lr": 0.01}, None, "float32", "CosineAnnealingLR",
     {"T_max": 10, "eta_min": 0.0}),
    ("OneCycleLR", {}, {"betas": [0.9, 0.99]}, "float64", "OneCycleLR",
     {"max_lr": [0.05, 0.02], "total_steps": SPARSE_STEPS}),
    ("SequentialLR", {"lr": 0.02, "maximize": True}, {"lr": 0.005}, "float32", "SequentialLR",
     {"schedulers": [["LinearLR", {"start_factor": 0.2, "total_iters": 5}],
                     ["ExponentialLR", {"gamma": 0.9}]], "milestones": [5]}),
    ("SWALR", {"lr": 0.01}, {"lr": 0.002}, "float32", "SWALR",
     {"swa_lr": [0.05, 0.001], "anneal_epochs": 6, "anneal_strategy": "linear"}),
]


def run_sparse_adam(case):
    """SCHEMA.md's SparseAdam section: the dense hashed gradient with rows masked out by
    hashed(seed, 10000 + t, n_rows) > 0, then to_sparse(sparse_dim=1)."""
    dtype = DTYPES[case["dtype"]]
    shapes = [s for g in case["groups"] for s in g["shapes"]]
    n_total = sum(numel(s) for s in shapes)
    n_rows = sum(s[0] for s in shapes)
    seed = case["seed"]
    params = [p.requires_grad_(True) for p in split(hashed(seed, 0, n_total), shapes, dtype)]
    groups, i = [], 0
    for g in case["groups"]:
        k = len(g["shapes"])
        groups.append({"params": params[i:i + k], **to_torch_kwargs(g["overrides"])})
        i += k
    opt = torch.optim.SparseAdam(groups, **to_torch_kwargs(case["defaults"]))
    sched = None
    if "lr_scheduler" in case:
        sched = make_scheduler(opt, case["lr_scheduler"]["name"], case["lr_scheduler"]["config"])
    steps = []
    for t in range(1, SPARSE_STEPS + 1):
        lrs = [float(g["lr"]) for g in opt.param_groups]
        beta1s = [float(g["betas"][0]) for g in opt.param_groups]
        keep = hashed(seed, 10000 + t, n_rows) > 0
        r = 0
        for p, g in zip(params, split(hashed(seed, t, n_total), shapes, dtype)):
            mask = torch.from_numpy(keep[r:r + g.shape[0]].copy())
            r += g.shape[0]
            g = g * mask.to(dtype).reshape(-1, *([1] * (g.dim() - 1)))
            p.grad = g.to_sparse(sparse_dim=1)
        opt.step()
        record = {"step": t, "params": [b64(p.detach().numpy(), case["dtype"]) for p in params]}
        if sched is not None:
            record["lrs"], record["beta1s"] = lrs, beta1s
            sched.step()
        steps.append(record)
    return steps


def gen_sparse_adam(out_dir, meta, summary):
    cases = []
    for desc, defaults, g2, dtype, shapes in SPARSE_CASES:
        if g2 is None:
            groups = [{"overrides": {}, "shapes": shapes}]
        else:
            groups = [{"overrides": {}, "shapes": shapes[:-1]}, {"overrides": g2, "shapes": shapes[-1:]}]
        name = f"SparseAdam/{desc}/groups{len(groups)}" + ("" if dtype == "float32" else "/float64")
        case = {"name": name, "optimizer": "SparseAdam", "dtype": dtype, "defaults": defaults,
                "groups": groups, "seed": SEEDS(name), "sparse_rows": True}
        case["steps"] = run_sparse_adam(case)
        cases.append(case)
    for desc, defaults, g2, dtype, sched, config in SPARSE_SCHED_CASES:
        shapes = SPARSE_SHAPES
        if g2 is None:
            groups = [{"overrides": {}, "shapes": shapes}]
        else:
            groups = [{"overrides": {}, "shapes": shapes[:-1]}, {"overrides": g2, "shapes": shapes[-1:]}]
        name = f"SparseAdam/{desc}/groups{len(groups)}" + ("" if dtype == "float32" else "/float64")
        case = {"name": name, "optimizer": "SparseAdam", "dtype": dtype, "defaults": defaults,
                "groups": groups, "seed": SEEDS(name), "sparse_rows": True,
                "lr_scheduler": {"name": sched, "config": config}}
        case["steps"] = run_sparse_adam(case)
        cases.append(case)
    text = json.dumps({"meta": meta, "cases": cases})
    write(out_dir, "sparse_adam.json", text)
    summary.append(("sparse_adam.json", len(cases), len(text), ""))


def check_dir(d):
    n_ok = n_bad = 0
    for fname in sorted(os.listdir(d)):
        if not fname.endswith(".json"):
            continue
        data = json.load(open(os.path.join(d, fname)))
        for case in data["cases"]:
            kind, ok, detail = None, False, ""
            if case.get("sparse_rows"):
                kind = "sparse_adam"
                ok = run_sparse_adam(case) == case["steps"]
            elif "groups" in case:
                kind = "elementwise"
                steps = run_elementwise(case, [s["step"] for s in case["steps"]])
                ok = steps == case["steps"]
                if not ok:
                    diffs = []
                    for a, b in zip(steps, case["steps"]):
                        for pa, pb in zip(a["params"], b["params"]):
                            x, y = unb64(pa, case["dtype"]), unb64(pb, case["dtype"])
                            diffs.append(float(np.max(np.abs(x - y) / (np.abs(y) + 1e-30))))
                    detail = f"max rel diff {max(diffs):.3g}"
            elif case.get("optimizer") == "LBFGS":
                kind = "lbfgs"
                want = case["steps"]
                recs = run_lbfgs(case, want[-1]["step"])
                got = lbfgs_case_json(case, [r for r in recs if r["step"] in {s["step"] for s in want}])["steps"]
                ok = got == want
                if not ok:
                    detail = f"loss {got[-1]['loss']} vs {want[-1]['loss']}, evals {got[-1]['evals']} vs {want[-1]['evals']}"
            elif "scheduler" in case:
                kind = "scheduler"
                lrs, moms = run_swalr_recipe(case) if "warmup" in case else run_scheduler(case)
                ok = lrs == case["lrs"] and moms == case["momentums"]
            elif "averaged" in case:
                kind = "averaged"
                ok = run_averaged(dict(case, n_updates=len(case["updates"]))) == case["updates"]
            elif "max_norm" in case or "clip_value" in case:
                kind = "clip"
                r = run_clip(case)
                ok = r["grads"] == case["grads"] and r.get("total_norm") == case.get("total_norm")
            print(f"{'OK  ' if ok else 'DIFF'} {fname}: {kind}: {case['name']} {detail}")
            n_ok += ok
            n_bad += not ok
    print(f"check: {n_ok} identical, {n_bad} different")
    return n_bad == 0


# --------------------------------------------------------------------------------------


def write(out_dir, fname, text):
    with open(os.path.join(out_dir, fname), "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output directory")
    ap.add_argument("--check", metavar="DIR", help="re-run the cases of the fixture files in DIR")
    ap.add_argument("--only", choices=["subnormal", "muon", "swalr", "averaged", "sparse_adam", "bf16"],
                    help="write only this file (elementwise_subnormal.json, muon.json, "
                         "swalr.json, averaged.json, sparse_adam.json, bf16.json)")
    args = ap.parse_args()
    check_hashed()
    if args.check:
        sys.exit(0 if check_dir(args.check) else 1)

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch_version": torch.__version__, "hash": "splitmix64; see hashed()"}
    summary, skipped, notes = [], [], []
    if args.only is None:
        gen_elementwise(args.out, meta, skipped, summary)
    if args.only in (None, "subnormal"):
        gen_subnormal(args.out, meta, summary)
    if args.only in (None, "muon"):
        gen_muon(args.out, meta, summary)
    if args.only is None:
        gen_lbfgs(args.out, meta, summary, notes)
        gen_schedulers(args.out, meta, summary)
        gen_clip(args.out, meta, summary, notes)
    if args.only in (None, "swalr"):
        gen_swalr(args.out, meta, summary)
    if args.only in (None, "averaged"):
        gen_averaged(args.out, meta, summary)
    if args.only in (None, "sparse_adam"):
        gen_sparse_adam(args.out, meta, summary)
    if args.only in (None, "bf16"):
        gen_bf16(args.out, meta, summary)

    print(f"torch {torch.__version__}; wrote {args.out} in {time.time() - t0:.1f} s")
    for fname, n, size, extra in summary:
        print(f"  {fname:28s} {n:4d} cases {size / 1e6:7.3f} MB  {extra}")
    print(f"skipped torch configs ({len(skipped)}):")
    for opt, desc, why in skipped:
        print(f"  {opt}/{desc}: {why}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
