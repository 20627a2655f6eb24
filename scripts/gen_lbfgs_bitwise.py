"""Records torch.optim.LBFGS runs small enough to compare bit for bit with optarena.

Writes tests/data/lbfgs_torch_bitwise.json, read by `torch_lbfgs_bit_for_bit` in
tests/lbfgs.rs. Run it with torch's non-vectorised kernels, so that `add_(x, alpha=t)` rounds
twice like optarena instead of using FMA:

    ATEN_CPU_CAPABILITY=default python scripts/gen_lbfgs_bitwise.py

The problems have 1 to 3 elements, where MKL's `sdot` (n <= 3) and `ddot` (n <= 2) and every
`sum` add in plain left-to-right order, so the only freedom left is torch's own arithmetic:
which scalars are Python floats and which are 0-dim tensors, `float / tensor` as
`reciprocal() * float`, comparisons in the tensor dtype, and the line search's fixed
`tolerance_change = 1e-9`. That is exactly what these cases pin down.

One more thing is not torch's arithmetic but MKL's: `Tensor.sqrt` goes through MKL VML in
`VML_HA` mode, which is not correctly rounded (about 1 ulp off for ~20% of f32 and ~1% of f64
inputs). `_cubic_interpolate`'s single `sqrt` is therefore replaced by a correctly rounded one
(numpy's) for the recording; optarena uses the IEEE square root.

The closures compute loss and gradient with explicit scalar-tensor operations (no autograd)
that optarena's tests repeat operation for operation:
  * poly:       f = ((x*x - 3)*x + 1)*x,   g = (4*x*x - 6)*x + 1          (n = 1)
  * rosenbrock: the loop of `LBFGSProblem::Rosenbrock::eval` in tests/common/mod.rs
"""

import inspect
import json
import os
import sys

import numpy as np
import torch
import torch.optim.lbfgs as L

if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
    sys.exit("run with ATEN_CPU_CAPABILITY=default (see the docstring)")

torch.set_num_threads(1)
_src = inspect.getsource(L._cubic_interpolate).replace(
    "d2 = d2_square.sqrt()", "d2 = torch.tensor(np.sqrt(d2_square.numpy()))"
)
assert "np.sqrt" in _src
_ns = dict(L.__dict__)
_ns["np"] = np
exec(_src, _ns)
L._cubic_interpolate = _ns["_cubic_interpolate"]

CONFIGS = [
    {},
    {"line_search_fn": "strong_wolfe"},
    {"lr": 0.3, "line_search_fn": "strong_wolfe"},
    {"history_size": 2, "max_iter": 5, "line_search_fn": "strong_wolfe"},
    {"lr": 0.05, "max_iter": 3, "history_size": 2},
    {"max_iter": 4, "max_eval": 6, "line_search_fn": "strong_wolfe"},
    {"lr": 2.0, "line_search_fn": "strong_wolfe", "tolerance_change": 1e-14},
    {"maximize": True, "line_search_fn": "strong_wolfe"},
    {"maximize": True, "lr": 0.1},
    {"tolerance_grad": 1e-3, "tolerance_change": 1e-5, "history_size": 1},
]
POLY_X0 = [[2.3], [-1.7], [0.05], [1.2], [-0.3], [3.1], [0.9]]
ROSEN_X0 = [[-1.2, 1.0, 0.7], [0.5, -0.4, 1.9], [2.0, 2.0, -1.0], [0.1, 0.2, 0.3]]
STEPS = 8


def make_closure(x, opt, function, dtype, maximize):
    n = x.numel()

    def closure():
        with torch.no_grad():
            xs = [x[i].detach().clone() for i in range(n)]
            if function == "poly":
                xx = xs[0]
                f = ((xx * xx - 3.0) * xx + 1.0) * xx
                g = [(4.0 * xx * xx - 6.0) * xx + 1.0]
            else:
                f = torch.tensor(0.0, dtype=dtype)
                g = [torch.tensor(0.0, dtype=dtype) for _ in range(n)]
                for i in range(n - 1):
                    a = xs[i + 1] - xs[i] * xs[i]
                    b = 1.0 - xs[i]
                    f = f + (100.0 * (a * a) + b * b)
                    ga = 100.0 * (2.0 * a)
                    g[i + 1] = g[i + 1] + ga
                    g[i] = g[i] - ga * (2.0 * xs[i]) - 2.0 * b
            g = torch.stack(g)
            if maximize:
                f, g = -f, -g
            x.grad = g
        return f

    return closure


def run(function, dtype_name, config, x0):
    dtype = getattr(torch, dtype_name)
    x = torch.tensor(x0, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([x], **config)
    closure = make_closure(x, opt, function, dtype, config.get("maximize", False))
    recs = []
    for _ in range(STEPS):
        loss = opt.step(closure)
        st = opt.state[x]
        recs.append({"loss": float(loss), "x": [float(v) for v in x.detach()],
                     "evals": st["func_evals"], "n_iter": st["n_iter"]})
    return {"function": function, "dtype": dtype_name, "config": config, "x0": x0, "recs": recs}


def main():
    cases = []
    for dtype in ("float32", "float64"):
        for config in CONFIGS:
            for x0 in POLY_X0:
                cases.append(run("poly", dtype, config, x0))
            # ddot of 3 doubles is not left to right in MKL; sdot of 3 floats is.
            for n in ((2, 3) if dtype == "float32" else (2,)):
                for x0 in ROSEN_X0:
                    cases.append(run("rosenbrock", dtype, config, x0[:n]))
    meta = {"torch_version": torch.__version__, "generator": "scripts/gen_lbfgs_bitwise.py"}
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "lbfgs_torch_bitwise.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))
    print(f"{len(cases)} cases -> {out}")


if __name__ == "__main__":
    main()
