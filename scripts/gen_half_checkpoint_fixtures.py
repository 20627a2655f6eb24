#!/usr/bin/env python3
"""Half-precision checkpoints between torch and optarena: fixtures and the torch-side check.

    ../venv/bin/python scripts/gen_half_checkpoint_fixtures.py gen --out tests/fixtures/checkpoints
    cargo test --release --test checkpoint_half          # also writes target/tmp/half/*.safetensors
    ../venv/bin/python scripts/gen_half_checkpoint_fixtures.py check \\
        tests/fixtures/checkpoints/half.json target/tmp/half

``gen`` writes (through scripts/torch_checkpoint.py, so the files are what torch users get):

* ``half_adamw_bf16.safetensors``: a bfloat16 model trained ``k`` steps by torch's AdamW
  (``foreach=False``), its state bf16 as torch keeps it: BF16 tensors throughout.
* ``half_sgd_f16.safetensors``: a float16 model, SGD with momentum: F16 tensors.
* ``half_casts.safetensors``: one parameter ``w`` of edge and random values; ``exp_avg`` stored
  as F32, ``exp_avg_sq`` as F64 and ``param.w`` as F64 (an AdamW checkpoint as torch would
  convert a mixed state), to load across dtypes.

and ``half.json``: the bits torch holds (``uint16`` for bf16/f16, ``uint32`` for f32, as
base64 of little-endian bytes) for every tensor of the first two files, and for the third
the inputs and torch's casts ``x.to(torch.bfloat16)``, ``.to(torch.float16)`` and
``.to(torch.float32)`` of each: what a load into bf16 state, an f16 ``HalfBuffer`` or an f32
optimizer must give. tests/checkpoint_half.rs compares with them (NaN by NaN-ness: torch's
vectorised casts write ``0xFFFF``, its scalar ones and optarena ``0x7FC0``).

``check`` reads the checkpoints the Rust test re-saved with bf16 optimizer state (and a bf16
``HalfBuffer`` in a training checkpoint) with ``safetensors.torch``, checks their dtypes and
bits against torch's own, loads them into a fresh torch bf16 model and AdamW, and continues:
it must step exactly as the run that never left torch.
"""

import argparse
import base64
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import hashed  # noqa: E402
from torch_checkpoint import (  # noqa: E402
    _write, load_optarena_for_torch, read_optarena, save_torch_as_optarena,
)

torch.set_num_threads(1)

PARAMS = [("enc.weight", [6, 5]), ("enc.bias", [6]), ("head.weight", [3, 6])]
ADAMW = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-6)
SGD = dict(lr=0.1, momentum=0.9, dampening=0.1)


def bits(t):
    """base64 of a tensor's little-endian bits (uint16 for bf16/f16, uint32/uint64 else)."""
    t = t.detach().contiguous().reshape(-1)
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype]
    return base64.b64encode(t.view(view).numpy().tobytes()).decode("ascii")


class Model(torch.nn.Module):
    def __init__(self, dtype, seed):
        super().__init__()
        n = sum(int(np.prod(s)) for _, s in PARAMS)
        init = hashed(seed, 0, n)
        at = 0
        for name, shape in PARAMS:
            k = int(np.prod(shape))
            owner = self
            for part in name.split(".")[:-1]:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            v = torch.tensor(init[at:at + k], dtype=torch.float32).reshape(shape).to(dtype)
            owner.register_parameter(name.split(".")[-1], torch.nn.Parameter(v))
            at += k


def train(dtype, make_opt, seed, k):
    """A model of ``dtype`` and its optimizer after ``k`` steps of hashed gradients (cast to
    the model's dtype, as a half-precision backward would give them)."""
    model = Model(dtype, seed)
    params = [p for _, p in model.named_parameters()]
    opt = make_opt(params)
    n = sum(p.numel() for p in params)

    def step(t):
        g = hashed(seed, t, n)
        at = 0
        for p in params:
            p.grad = torch.tensor(g[at:at + p.numel()], dtype=torch.float32).reshape(
                p.shape).to(dtype)
            at += p.numel()
        opt.step()

    for t in range(1, k + 1):
        step(t)
    return model, opt, step


def record(model, opt):
    state = {}
    for i, p in enumerate(model.parameters()):
        s = opt.state[p]
        state[str(i)] = {k: bits(v) for k, v in s.items() if k != "step" and v is not None}
        if "step" in s:
            state[str(i)]["step"] = int(s["step"].item())
    return {"params": {n: bits(p) for n, p in model.named_parameters()}, "state": state,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def edge_f32():
    """f32 values around every rounding boundary of bf16 and f16, then random ones."""
    specials = np.array([
        0x00000000, 0x80000000, 0x3F800000, 0xBF800000,
        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF818000,  # bf16 ties and near
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF,  # overflow to inf in bf16, or not
        0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,  # inf, NaNs
        0x00000001, 0x00008000, 0x00018000, 0x80010000, 0x007FFFFF, 0x00800000,  # subnormals
        0x477FF000, 0x477FEFFF, 0x477FE000, 0xC77FF000,  # 65520 -> inf in f16; 65519; 65504
        0x33000000, 0x33000001, 0x33400000, 0x387FC000, 0x38800000,  # f16 subnormal ties
        0x3F801000, 0x3F803000, 0x3F800FFF,  # f16 ties at 1
    ], dtype=np.uint32).view(np.float32)
    rng = np.random.default_rng(20261130)
    rand = (rng.standard_normal(400) * np.exp2(rng.integers(-30, 30, 400))).astype(np.float32)
    return np.concatenate([specials, rand])


def edge_f64():
    """f64 values where rounding once and rounding through f32 differ, then random ones."""
    specials = np.array([
        1 + 2**-8 + 2**-30, 1 + 2**-8 - 2**-40, -(1 + 2**-8 + 2**-30),
        1 + 2**-11 + 2**-40, 1 + 2**-11 - 2**-50,
        3.4028235677973366e38, 3.4028235e38 * 1.0000001, 1e300, -1e300, 1e-300, 2**-149 * 0.75,
        2**-149 * 0.5, 2**-149 * 0.5000001, float("inf"), float("-inf"), float("nan"), 0.0, -0.0,
        0.1, 1 / 3, 65519.99, 65520.0,
    ], dtype=np.float64)
    rng = np.random.default_rng(11302026)
    rand = rng.standard_normal(500) * np.exp2(rng.integers(-40, 40, 500))
    return np.concatenate([specials, rand])


def gen(out):
    os.makedirs(out, exist_ok=True)
    cases = {}
    # 1. bf16 AdamW.
    k = 3
    model, opt, _ = train(torch.bfloat16,
                          lambda ps: torch.optim.AdamW(ps, foreach=False, **ADAMW), 8101, k)
    save_torch_as_optarena(os.path.join(out, "half_adamw_bf16.safetensors"), opt,
                           model.named_parameters())
    cases["adamw_bf16"] = dict(record(model, opt), file="half_adamw_bf16.safetensors",
                               optimizer="AdamW", seed=8101, k=k,
                               shapes=[[n, s] for n, s in PARAMS])
    # 2. f16 SGD with momentum; the bf16 cast of its buffers (a load into bf16 state).
    model, opt, _ = train(torch.float16,
                          lambda ps: torch.optim.SGD(ps, foreach=False, **SGD), 8202, k)
    save_torch_as_optarena(os.path.join(out, "half_sgd_f16.safetensors"), opt,
                           model.named_parameters())
    rec = record(model, opt)
    rec["state_as_bf16"] = {
        str(i): {"momentum_buffer": bits(opt.state[p]["momentum_buffer"].to(torch.bfloat16))}
        for i, p in enumerate(model.parameters())}
    cases["sgd_f16"] = dict(rec, file="half_sgd_f16.safetensors", optimizer="SGD", seed=8202,
                            k=k, shapes=[[n, s] for n, s in PARAMS])
    # 3. Casts: exp_avg F32, exp_avg_sq and the parameter F64.
    a32 = torch.from_numpy(edge_f32())
    a64 = torch.from_numpy(edge_f64())
    n = a32.numel()
    assert a64.numel() >= n
    a64 = a64[:n].clone()
    w64 = torch.from_numpy(np.random.default_rng(5).standard_normal(n) * 1e3)
    w64[:a64.numel()] = a64  # the same edge values again, as a parameter
    w64[0] = 0.1
    from torch_checkpoint import tensor_bytes
    meta = {"format": "optarena-checkpoint", "version": 1, "optimizer": "AdamW",
            "dtype": "float32",
            "param_groups": [{"hyperparams": {"lr": 0.001}, "params": [
                {"index": 0, "name": "w", "offset": 0, "shape": [n]}]}],
            "state": [{"index": 0, "step": 1, "buffers": ["exp_avg", "exp_avg_sq"]}],
            "params": [{"name": "w", "shape": [n], "offset": 0, "len": n}]}
    tensors = [("state.0.exp_avg", "F32", [n], tensor_bytes(a32)),
               ("state.0.exp_avg_sq", "F64", [n], tensor_bytes(a64)),
               ("param.w", "F64", [n], tensor_bytes(w64))]
    data = _write(meta, tensors)
    with open(os.path.join(out, "half_casts.safetensors"), "wb") as f:
        f.write(data)
    read_optarena(data)

    def casts(x):
        return {"input": bits(x), "bfloat16": bits(x.to(torch.bfloat16)),
                "float16": bits(x.to(torch.float16)), "float32": bits(x.to(torch.float32))}

    cases["casts"] = {"file": "half_casts.safetensors", "n": n, "exp_avg": casts(a32),
                      "exp_avg_sq": casts(a64), "w": casts(w64)}
    doc = {"meta": {"torch": torch.__version__,
                    "generator": "scripts/gen_half_checkpoint_fixtures.py"},
           "adamw": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ADAMW.items()},
           "sgd": SGD, "cases": cases}
    with open(os.path.join(out, "half.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {out}/half.json and three checkpoints (torch {torch.__version__})")


def check(fixture, rust_dir):
    """torch reads optarena's bf16 checkpoints and continues as if it had never left."""
    with open(fixture) as f:
        doc = json.load(f)
    case = doc["cases"]["adamw_bf16"]
    k = case["k"]
    # The run that never left torch: k steps, then two more.
    adamw = dict(doc["adamw"], betas=tuple(doc["adamw"]["betas"]))
    model, opt, step = train(torch.bfloat16,
                             lambda ps: torch.optim.AdamW(ps, foreach=False, **adamw),
                             case["seed"], k)
    path = os.path.join(rust_dir, "adamw_bf16.rust.safetensors")
    with open(path, "rb") as f:
        meta, tensors = read_optarena(f.read())
    for name, t in tensors.items():
        if name.startswith("state."):
            assert t.dtype == torch.bfloat16, (name, t.dtype)
    # Bits: optarena's BF16 state is torch's, unchanged.
    for i, p in enumerate(model.parameters()):
        for b in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(tensors[f"state.{i}.{b}"].view(torch.int16).reshape(-1),
                               opt.state[p][b].view(torch.int16).reshape(-1)), (i, b)
    at_k = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd, params = load_optarena_for_torch(path)
    model2 = Model(torch.bfloat16, 0)
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.copy_(params[n])  # f32 master values of bf16 numbers: exact
    opt2 = torch.optim.AdamW(list(model2.parameters()), foreach=False, **adamw)
    opt2.load_state_dict(sd)
    n = sum(p.numel() for p in model2.parameters())
    ps2 = list(model2.parameters())
    for t in range(k + 1, k + 3):
        step(t)
        g = hashed(case["seed"], t, n)
        at = 0
        for p in ps2:
            p.grad = torch.tensor(g[at:at + p.numel()], dtype=torch.float32).reshape(
                p.shape).to(torch.bfloat16)
            at += p.numel()
        opt2.step()
    for (name, a), b in zip(model.named_parameters(), ps2):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
    print(f"check: {path} read by safetensors.torch (BF16 state), loaded into torch's AdamW on "
          "a bf16 model, continued 2 steps bit for bit with the run that never left torch")
    # A bf16 HalfBuffer inside a training checkpoint: plain BF16 tensors for torch.
    from safetensors.torch import load_file
    path = os.path.join(rust_dir, "training_copy.rust.safetensors")
    t = load_file(path)
    halves = {k: v for k, v in t.items() if k.startswith("half.copy.")}
    assert halves and all(v.dtype == torch.bfloat16 for v in halves.values()), halves.keys()
    for n, p in at_k.items():
        assert torch.equal(halves[f"half.copy.{n}"].view(torch.int16), p.view(torch.int16)), n
    print(f"check: {path}: {len(halves)} BF16 tensors half.copy.<param> "
          f"({', '.join(sorted(halves))}) read by safetensors.torch: torch's parameters, bit "
          "for bit")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("gen")
    p.add_argument("--out", default="tests/fixtures/checkpoints")
    p = sub.add_parser("check")
    p.add_argument("fixture")
    p.add_argument("dir")
    args = ap.parse_args()
    if args.cmd == "gen":
        gen(args.out)
    else:
        check(args.fixture, args.dir)


if __name__ == "__main__":
    main()
