#!/usr/bin/env python3
"""Convert between PyTorch optimizer state and optarena's binary checkpoints.

An optarena checkpoint is a safetensors file (see ``src/checkpoint/mod.rs``):

* ``__metadata__["optarena"]``: JSON with ``format`` (``"optarena-checkpoint"``), ``version``,
  ``optimizer`` (torch's class name), ``dtype``, ``param_groups`` (hyperparameters and, per
  parameter, its number, name, offset and shape), ``state`` (per parameter number: ``step``,
  scalar state such as ASGD's ``eta``, and the names of its buffers) and ``params`` (the
  stored parameter values, when included).
* tensor ``optarena.crc32`` (U32, 2), first in the data: zlib's CRC-32 of the length prefix
  and header, then of every data byte after it;
* tensors ``state.<number>.<buffer>`` (torch's state-dict keys) and ``param.<name>``, each in
  its own dtype: F32, F64, BF16 or F16 (optarena casts each into its destination on load, as
  ``tensor.to(dtype)`` does; its bf16 optimizer state is written as BF16).

Use as a library::

    from torch_checkpoint import save_torch_as_optarena, load_optarena_for_torch
    save_torch_as_optarena("run.safetensors", opt, model.named_parameters())
    sd, params = load_optarena_for_torch("run.safetensors")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    opt.load_state_dict(sd)

or from the command line::

    python scripts/torch_checkpoint.py inspect run.safetensors
    python scripts/torch_checkpoint.py selftest      # torch -> optarena -> torch, bitwise

Run with the venv that has torch and safetensors (``pip install safetensors``).
"""

import argparse
import json
import math
import struct
import sys
import zlib

import numpy as np
import torch

FORMAT = "optarena-checkpoint"
VERSION = 1
CRC_TENSOR = "optarena.crc32"
# torch keys that pick an implementation or belong to other objects, never to optarena's
# hyperparameters.
DROPPED_GROUP_KEYS = {
    "params", "param_names", "foreach", "fused", "capturable", "differentiable", "initial_lr",
}
# 0-dim state entries that are per-parameter scalars in optarena (besides "step").
SCALAR_STATE = {"eta", "mu", "mu_product"}
# Hyperparameters torch needs as Python ints (optarena keeps every number as a float).
INT_HYPERPARAMS = {"ns_steps"}
ST_DTYPES = {"float32": ("F32", torch.float32), "float64": ("F64", torch.float64),
             "bfloat16": ("BF16", torch.bfloat16), "float16": ("F16", torch.float16)}
DTYPE_NAMES = {t: name for name, (_, t) in ST_DTYPES.items()}


def tensor_bytes(t):
    """A CPU tensor's little-endian bytes (bf16 has no numpy dtype: viewed as int16)."""
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return _number(v)
    return v


def _unjson(v):
    """Inverse of ``_jsonable`` for hyperparameters: pairs become tuples, and the strings
    optarena writes for NaN and infinities become floats."""
    if isinstance(v, list):
        return tuple(_unjson(x) for x in v)
    if v in ("NaN", "Infinity", "-Infinity"):
        return float(v)
    return v


def _number(x):
    """JSON has no NaN or infinity: optarena writes them as these strings."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def param_names_of(optimizer, named_parameters):
    """Names of the optimizer's parameters in state-dict number order, by tensor identity."""
    by_id = {id(p): n for n, p in named_parameters}
    names = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in by_id:
                raise ValueError("an optimizer parameter is not among named_parameters")
            names.append(by_id[id(p)])
    return names


def torch_to_optarena_bytes(state_dict, optimizer_name, named_parameters, names=None,
                            include_params=True):
    """An optarena checkpoint (bytes) from a torch optimizer ``state_dict()``.

    ``named_parameters``: the model's ``(name, tensor)`` pairs (all of them, in order).
    ``names``: the parameter names in state-dict number order; by default the groups'
    ``param_names`` (torch >= 2.6 with named parameters) or, failing that, the
    ``named_parameters`` order (right when the groups list the parameters in model order).
    """
    named = [(n, p.detach()) for n, p in named_parameters]
    by_name = dict(named)
    numbers = [i for g in state_dict["param_groups"] for i in g["params"]]
    if names is None:
        if all("param_names" in g for g in state_dict["param_groups"]):
            names = [n for g in state_dict["param_groups"] for n in g["param_names"]]
        else:
            names = [n for n, _ in named][: len(numbers)]
    if len(names) != len(numbers):
        raise ValueError(f"{len(numbers)} optimizer parameters but {len(names)} names")
    name_of = dict(zip(numbers, names))
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) != 1:
        raise ValueError(f"parameters of several dtypes: {dtypes}")
    dtype = DTYPE_NAMES[dtypes.pop()]
    st_dtype, t_dtype = ST_DTYPES[dtype]

    offsets, at = {}, 0
    for i in numbers:
        offsets[i] = at
        at += by_name[name_of[i]].numel()
    groups = []
    for g in state_dict["param_groups"]:
        hyper = {k: _jsonable(v) for k, v in g.items() if k not in DROPPED_GROUP_KEYS}
        params = [{"index": i, "name": name_of[i], "offset": offsets[i],
                   "shape": list(by_name[name_of[i]].shape)} for i in g["params"]]
        groups.append({"hyperparams": hyper, "params": params})

    tensors = []  # (name, st dtype, shape, bytes), in file order after the checksum tensor
    state = []
    for i in sorted(state_dict["state"], key=int):
        s = state_dict["state"][i]
        entry = {"index": int(i), "buffers": []}
        for k, v in s.items():
            if k == "step":
                entry["step"] = int(v.item() if isinstance(v, torch.Tensor) else v)
            elif k in SCALAR_STATE:
                entry.setdefault("scalars", {})[k] = _jsonable(float(v.item() if isinstance(v, torch.Tensor) else v))
            elif v is None:
                continue  # SGD without momentum keeps momentum_buffer = None
            else:
                t = v.detach().to(t_dtype).contiguous().cpu()
                entry["buffers"].append(k)
                tensors.append((f"state.{int(i)}.{k}", st_dtype, list(t.shape), tensor_bytes(t)))
        if "step" not in entry and not entry["buffers"] and "scalars" not in entry:
            continue  # optarena lists no state for a momentum-free SGD parameter
        state.append(entry)
    meta = {"format": FORMAT, "version": VERSION, "optimizer": optimizer_name,
            "dtype": dtype, "param_groups": groups, "state": state}
    if include_params:
        infos, at = [], 0
        for n, p in named:
            infos.append({"name": n, "shape": list(p.shape), "offset": at, "len": p.numel()})
            at += p.numel()
            t = p.to(t_dtype).contiguous().cpu()
            tensors.append((f"param.{n}", st_dtype, list(t.shape), tensor_bytes(t)))
        meta["params"] = infos
    return _write(meta, tensors)


def _write(meta, tensors):
    header = {"__metadata__": {"optarena": json.dumps(meta, separators=(",", ":"),
                                                      allow_nan=False)}}
    header[CRC_TENSOR] = {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}
    at = 8
    for name, dt, shape, data in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [at, at + len(data)]}
        at += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    prefix = struct.pack("<Q", len(h)) + h
    data = b"".join(t[3] for t in tensors)
    sums = struct.pack("<II", zlib.crc32(prefix), zlib.crc32(data))
    return prefix + sums + data


def save_torch_as_optarena(path, optimizer, named_parameters, include_params=True):
    """Writes ``optimizer``'s state (and the parameters, by default) as an optarena checkpoint.
    Names come from tensor identity, so any group layout converts correctly."""
    named = list(named_parameters)
    names = param_names_of(optimizer, named)
    data = torch_to_optarena_bytes(optimizer.state_dict(), type(optimizer).__name__, named,
                                   names=names, include_params=include_params)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def read_optarena(data):
    """Checks an optarena checkpoint (bytes) and returns (metadata dict, {name: tensor}), each
    tensor in the dtype the file stores (bf16 state stays bf16)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("the header length runs past the end of the file (truncated?)")
    header = json.loads(data[8:8 + n])
    info = header.get(CRC_TENSOR)
    if info != {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}:
        raise ValueError("no optarena.crc32 tensor at the start: not an optarena checkpoint")
    body = data[8 + n:]
    want_header, want_data = struct.unpack("<II", body[:8])
    if zlib.crc32(data[:8 + n]) != want_header:
        raise ValueError("header checksum mismatch: the header is corrupt")
    if zlib.crc32(body[8:]) != want_data:
        raise ValueError("data checksum mismatch: the tensor data is corrupt")
    meta = json.loads(header["__metadata__"]["optarena"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"version {meta.get('version')} is not supported ({VERSION})")
    # The tensors, through the safetensors library itself (also proves the file is valid);
    # its torch loader, since numpy has no bfloat16.
    from safetensors.torch import load as st_load
    arrays = st_load(bytes(data))
    arrays.pop(CRC_TENSOR)
    return meta, arrays


def _scalar_dtype():
    # torch keeps step and scalar state in float32 unless the default dtype is float64.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def optarena_to_torch(data):
    """(torch optimizer state_dict, {param name: tensor}) from an optarena checkpoint's bytes.
    The state dict is what ``optimizer.load_state_dict`` accepts for an optimizer with the same
    groups; the second dict is empty when the parameters were not stored."""
    meta, arrays = read_optarena(data)
    groups = []
    for g in meta["param_groups"]:
        group = {k: _unjson(v) for k, v in g["hyperparams"].items()}
        for k in INT_HYPERPARAMS & group.keys():
            if isinstance(group[k], float) and group[k].is_integer():
                group[k] = int(group[k])  # Muon's range(ns_steps)
        group["params"] = [p["index"] for p in g["params"]]
        groups.append(group)
    state = {}
    for s in meta["state"]:
        i = s["index"]
        entry = {}
        if "step" in s:
            entry["step"] = torch.tensor(float(s["step"]), dtype=_scalar_dtype())
        for k, v in s.get("scalars", {}).items():
            entry[k] = torch.tensor(float(v), dtype=_scalar_dtype())  # float("Infinity") too
        for b in s["buffers"]:
            entry[b] = arrays[f"state.{i}.{b}"].clone()
        state[i] = entry
    params = {p["name"]: arrays[f"param.{p['name']}"].clone() for p in meta.get("params") or []}
    return {"state": state, "param_groups": groups}, params


def load_optarena_for_torch(path):
    """``optarena_to_torch`` on a file."""
    with open(path, "rb") as f:
        return optarena_to_torch(f.read())


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def _selftest():
    """torch -> optarena -> torch: the reloaded optimizer continues bit for bit."""
    torch.manual_seed(0)
    for name, make, dtype in [
        ("Adam", lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, foreach=False), torch.float32),
        ("SGD", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False), torch.float64),
        ("SGD0", lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False), torch.float32),
        ("ASGD", lambda ps: torch.optim.ASGD(ps, lr=0.01, t0=2, foreach=False), torch.float32),
        ("NAdam", lambda ps: torch.optim.NAdam(ps, foreach=False), torch.float64),
        # bf16 parameters and state: BF16 tensors both ways.
        ("AdamW-bf16", lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False), torch.bfloat16),
        ("SGD-f16", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
         torch.float16),
        # Muon takes matrices only: a model without biases. Its group carries a tuple
        # (ns_coefficients) and a None (adjust_lr_fn); its state has no step.
        ("Muon", lambda ps: torch.optim.Muon(ps, lr=0.02, ns_coefficients=(3.0, -4.0, 1.9)),
         torch.float32),
    ]:
        bias = name != "Muon"

        def new_model():
            return torch.nn.Sequential(torch.nn.Linear(4, 3, bias=bias),
                                       torch.nn.Linear(3, 2, bias=bias)).to(dtype)

        model = new_model()
        groups = [{"params": list(model[1].parameters()), "lr": 0.05},
                  {"params": list(model[0].parameters())}]
        opt = make(groups)
        x = torch.randn(16, 4, dtype=dtype)

        def step(m, o):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

        for _ in range(3):
            step(model, opt)
        data = torch_to_optarena_bytes(opt.state_dict(), type(opt).__name__,
                                       model.named_parameters(),
                                       names=param_names_of(opt, model.named_parameters()))
        sd, params = optarena_to_torch(data)

        def reload(state_dict, values):
            m = new_model()
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(values[n])
            o = make([{"params": list(m[1].parameters()), "lr": 0.05},
                      {"params": list(m[0].parameters())}])
            o.load_state_dict(state_dict)
            return m, o

        # Through optarena, and torch's own state_dict -> load_state_dict (which is not always
        # the uninterrupted run: it casts NAdam's float32 mu_product to a float64 parameter's
        # dtype).
        model2, opt2 = reload(sd, params)
        model3, opt3 = reload(opt.state_dict(), dict(model.named_parameters()))
        for _ in range(3):
            step(model2, opt2)
            step(model3, opt3)
        for (n, a), (_, b) in zip(model3.named_parameters(), model2.named_parameters()):
            assert torch.equal(a, b), (name, n)
        # Corruption is found.
        bad = bytearray(data)
        bad[-1] ^= 1
        try:
            read_optarena(bytes(bad))
            raise AssertionError("a flipped byte went unnoticed")
        except ValueError:
            pass
        print(f"selftest {name}: torch -> optarena ({len(data)} bytes) -> torch continues bit for bit as after torch's own load_state_dict")


def _resume_check(fixture, rust_dir):
    """Loads the checkpoints optarena re-saved from tests/fixtures/checkpoints (the Rust test
    writes them to target/tmp) into torch, continues, and compares with the recorded steps."""
    import base64
    import os

    with open(fixture) as f:
        cases = json.load(f)["cases"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gen_checkpoint_fixtures import CASES, Model, torch_optimizer
    from gen_fixtures import hashed

    for case, spec in zip(cases, CASES):
        assert case["name"] == spec["name"]
        path = os.path.join(rust_dir, case["name"] + ".rust.safetensors")
        sd, params = load_optarena_for_torch(path)
        dtype = {"float32": torch.float32, "float64": torch.float64}[case["dtype"]]
        np_dtype = {"float32": "<f4", "float64": "<f8"}[case["dtype"]]
        model = Model([(n, s, torch.zeros(s, dtype=dtype)) for n, s in case["params"]])
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(params[n])
        groups = [dict(params=[named[n] for n, _ in g["params"]]) for g in spec["groups"]]
        opt = torch_optimizer(case["optimizer"], groups)
        opt.load_state_dict(sd)
        ps = [named[n] for n, _ in case["params"]]
        n_total = sum(p.numel() for p in ps)
        worst = 0.0
        for rec in case["steps"]:
            g = hashed(case["seed"], rec["step"], n_total)
            at = 0
            for p in ps:
                p.grad = torch.tensor(g[at:at + p.numel()], dtype=dtype).reshape(p.shape)
                at += p.numel()
            opt.step()
            for p, want in zip(ps, rec["params"]):
                w = np.frombuffer(base64.b64decode(want), dtype=np_dtype)
                worst = max(worst, float(np.max(np.abs(p.detach().numpy().reshape(-1) - w))))
        print(f"resume-check {case['name']}: optarena-saved checkpoint resumed in torch, "
              f"max |diff| to the recorded trajectory {worst:.3g}")
        assert worst == 0.0, "torch from an optarena-made checkpoint left its own trajectory"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="check a checkpoint and print its metadata")
    p.add_argument("path")
    sub.add_parser("selftest", help="torch -> optarena -> torch round trips")
    p = sub.add_parser("resume-check", help="torch resumes optarena-made checkpoints")
    p.add_argument("fixture", help="tests/fixtures/checkpoints/torch_resume.json")
    p.add_argument("dir", help="where tests/checkpoint_torch.rs saved them (target/tmp)")
    args = ap.parse_args()
    if args.cmd == "inspect":
        with open(args.path, "rb") as f:
            meta, arrays = read_optarena(f.read())
        print(json.dumps({k: v for k, v in meta.items() if k != "state"}, indent=1))
        print(f"{len(meta['state'])} parameter states; tensors:")
        for k, v in arrays.items():
            print(f"  {k}: {v.dtype} {list(v.shape)}")
    elif args.cmd == "selftest":
        _selftest()
    elif args.cmd == "resume-check":
        _resume_check(args.fixture, args.dir)


if __name__ == "__main__":
    sys.exit(main())
