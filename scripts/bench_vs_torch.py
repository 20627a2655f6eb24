#!/usr/bin/env python3
"""optarena vs PyTorch's CPU optimizers, on the same machine, in the same run.

Runs torch's fused, foreach and for-loop Adam, AdamW, SGD (momentum) and RAdam, and optarena's
`bench_step` example, interleaved round by round so that machine drift hits both alike, and
writes BENCHMARKS.md (ratios, medians, machine, date, thread count, exact command).

Setup (outside the repository):
    python3 -m venv /work/venv && /work/venv/bin/pip install torch numpy
Run from the repository root:
    /work/venv/bin/python scripts/bench_vs_torch.py --threads 2 --rounds 5 --out BENCHMARKS.md

`--quick` measures fewer, smaller cases (for checking the script itself). `--focus N` runs only
the 32M SGD-momentum, Adam and AdamW cases against torch fused and the roofline kernel for N
rounds and prints per-round ratio medians (for ratios too close to call in the full table).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

N_32M = 32 * 1024 * 1024
GPT2_ELEMENTS = 124_439_808


def gpt2_small_shapes():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                   (768, 3072), (3072,), (3072, 768), (768,)]
    shapes += [(768,), (768,)]
    assert len(shapes) == 148
    return shapes


LAYOUTS = {
    "flat": lambda n: [(n,)],
    "gpt2": lambda n: gpt2_small_shapes(),
    "adapter": lambda n: [(64, 128), (128, 64), (64,)],
}

TORCH_OPTIMIZERS = {
    "adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw),
    "adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, **kw),
    "sgd_momentum": lambda ps, **kw: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **kw),
    "radam": lambda ps, **kw: torch.optim.RAdam(ps, lr=1e-3, **kw),
}

IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "forloop": dict(foreach=False)}


class TorchCase:
    def __init__(self, optimizer, impl, layout, n):
        shapes = LAYOUTS[layout](n)
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.randn(s, generator=gen) for s in shapes]
        for p in self.params:
            p.requires_grad_(True)
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        self.clip = optimizer == "clip_adamw"
        name = "adamw" if self.clip else optimizer
        self.opt = TORCH_OPTIMIZERS[name](self.params, **IMPLS[impl])
        self.elements = sum(p.numel() for p in self.params)

    def step(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()

    def time(self, steps):
        with torch.no_grad():
            for _ in range(3):
                self.step()
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                self.step()
                times.append(time.perf_counter() - t)
        times.sort()
        return times[len(times) // 2], times[min(len(times) - 1, len(times) * 99 // 100)]


def optarena_time(binary, optimizer, layout, n, threads, steps):
    out = subprocess.run([binary, optimizer, layout, str(n), str(threads), str(steps)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["median_s"], r["p99_s"]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def focus(rounds, threads):
    """The 32M cases only, many rounds: per-round ratios to torch fused and to the roofline."""
    subprocess.run(["cargo", "build", "--release", "--example", "bench_step"], check=True)
    binary = os.path.join("target", "release", "examples", "bench_step")
    torch.set_num_threads(threads)
    med = statistics.median
    for opt in ["sgd_momentum", "adam", "adamw"]:
        roof = "roofline3" if opt == "sgd_momentum" else "roofline4"
        t, o, r = [], [], []
        for _ in range(rounds):
            case = TorchCase(opt, "fused", "flat", N_32M)
            t.append(case.time(15)[0])
            del case
            o.append(optarena_time(binary, opt, "flat", N_32M, threads, 15)[0])
            r.append(optarena_time(binary, roof, "flat", N_32M, threads, 15)[0])
        speed = [a / b for a, b in zip(t, o)]
        frac = [a / b for a, b in zip(r, o)]
        print(f"{opt} 32M, {threads} threads, {rounds} rounds: torch fused {med(t) * 1e3:.2f} ms, "
              f"optarena {med(o) * 1e3:.2f} ms, roofline {med(r) * 1e3:.2f} ms; per-round "
              f"speed-up median {med(speed):.2f}x (range {min(speed):.2f}-{max(speed):.2f}); "
              f"fraction of roofline median {med(frac):.0%} "
              f"(range {min(frac):.0%}-{max(frac):.0%})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--focus", type=int, metavar="ROUNDS",
                    help="only the 32M SGD-momentum, Adam and AdamW cases against torch fused "
                         "and the roofline, ROUNDS rounds, printing per-round ratio medians")
    args = ap.parse_args()
    if args.focus:
        return focus(args.focus, args.threads)

    subprocess.run(["cargo", "build", "--release", "--example", "bench_step"], check=True)
    binary = os.path.join("target", "release", "examples", "bench_step")
    # The same code built for this CPU (`-C target-cpu=native`), to compare with the default
    # build's run-time dispatch.
    native_env = dict(os.environ, RUSTFLAGS="-C target-cpu=native",
                      CARGO_TARGET_DIR=os.path.join("target", "native"))
    subprocess.run(["cargo", "build", "--release", "--example", "bench_step"], check=True,
                   env=native_env)
    native = os.path.join("target", "native", "release", "examples", "bench_step")
    torch.set_num_threads(args.threads)

    big = 1 << 20 if args.quick else N_32M
    cases = []  # (label, optimizer, layout, n, threads, steps, torch impls)
    for opt in ["adam", "adamw", "sgd_momentum", "radam"]:
        impls = ["foreach", "forloop"] if opt == "radam" else ["fused", "foreach", "forloop"]
        cases.append((f"{opt} {big // (1 << 20)}M", opt, "flat", big, args.threads, 10, impls))
    if not args.quick:
        cases.append(("adamw gpt2-small", "adamw", "gpt2", 0, args.threads, 5,
                      ["fused", "foreach", "forloop"]))
        cases.append(("clip+adamw gpt2-small", "clip_adamw", "gpt2", 0, args.threads, 5,
                      ["fused"]))
    cases.append((f"clip+adamw {big // (1 << 20)}M", "clip_adamw", "flat", big, args.threads, 10,
                  ["fused"]))
    for opt in ["adamw", "sgd_momentum"]:
        cases.append((f"{opt} 16K adapter, 1 thread", opt, "adapter", 0, 1, 2000,
                      ["fused", "foreach", "forloop"]))
    # The roofline kernel (optarena::roofline: the same arrays, lanes, chunks and threads as a
    # step, trivial arithmetic) at each size the optimizers run at.
    rooflines = [(f"roofline (read 4, write 3) {big // (1 << 20)}M", "roofline4", big),
                 (f"roofline (read 3, write 2) {big // (1 << 20)}M", "roofline3", big)]
    if not args.quick:
        rooflines.append(("roofline (read 4, write 3) gpt2-small size", "roofline4",
                          GPT2_ELEMENTS))

    results = {}  # (label, impl) -> list of (median, p99)
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for label, opt, layout, n, threads, steps, impls in cases:
            if threads == 1:
                torch.set_num_threads(1)
            for impl in impls:
                case = TorchCase(opt, impl, layout, n)
                results.setdefault((label, f"torch {impl}"), []).append(case.time(steps))
                del case
                results.setdefault((label, "optarena"), []).append(
                    optarena_time(binary, opt, layout, n, threads, steps))
            results.setdefault((label, "optarena native"), []).append(
                optarena_time(native, opt, layout, n, threads, steps))
            torch.set_num_threads(args.threads)
        for label, name, n in rooflines:
            results.setdefault((label, "optarena"), []).append(
                optarena_time(binary, name, "flat", n, args.threads, 10))

    def med(label, impl, k=0):
        return statistics.median(r[k] for r in results[(label, impl)])

    lines = []
    cmd = "/work/venv/bin/python scripts/bench_vs_torch.py " + " ".join(sys.argv[1:])
    lines += ["# optarena vs PyTorch: CPU optimizer step times", "",
              f"- Date: {datetime.date.today().isoformat()}",
              f"- Machine: {cpu_name()}, {os.cpu_count()} logical cores, "
              f"{platform.system()} {platform.release()}",
              f"- torch {torch.__version__}; optarena built with a plain `cargo build --release` "
              f"(run-time AVX2 dispatch)",
              f"- Threads: {args.threads} (adapter cases: 1); f32; {args.rounds} rounds, each "
              f"case timed by torch then optarena in turn so drift hits both",
              f"- Command: `{cmd}`",
              "- Numbers are medians over rounds of each round's median step time; the machine is "
              "shared and noisy, so read ratios, not absolutes.", "",
              "`optarena` is the default build (`cargo build --release`, SSE2 baseline with AVX2 "
              "chosen at run time); `optarena native` is the same code built with "
              "`RUSTFLAGS=\"-C target-cpu=native\"`. Both give bitwise the same results.", "",
              "| case | impl | median step | p99 step | optarena speed-up |",
              "|---|---|---|---|---|"]
    for label, opt, layout, n, threads, steps, impls in cases:
        ours = med(label, "optarena")
        lines.append(f"| {label} | optarena | {ours * 1e3:.3f} ms | "
                     f"{med(label, 'optarena', 1) * 1e3:.3f} ms | |")
        nat = med(label, "optarena native")
        lines.append(f"| {label} | optarena native | {nat * 1e3:.3f} ms | "
                     f"{med(label, 'optarena native', 1) * 1e3:.3f} ms | "
                     f"default build at {nat / ours:.0%} of native speed |")
        for impl in impls:
            t = med(label, f"torch {impl}")
            lines.append(f"| {label} | torch {impl} | {t * 1e3:.3f} ms | "
                         f"{med(label, f'torch {impl}', 1) * 1e3:.3f} ms | {t / ours:.2f}x |")
    lines += ["", "## Fraction of the roofline", "",
              "The roofline kernel (`optarena::roofline`) moves exactly an optimizer's memory "
              "traffic with trivial arithmetic (Adam/AdamW/RAdam: read 4 arrays, write 3; "
              "SGD-momentum: read 3, write 2), through the same allocation, SIMD lanes, chunks and "
              "threads as a step, timed in the same rounds. A fraction near 100% means the step "
              "is limited by memory bandwidth alone.",
              "", "| case | optarena | torch fused | roofline | optarena, fraction of roofline "
              "throughput | torch fused, fraction |", "|---|---|---|---|---|---|"]
    roof = {(name, n): med(label, "optarena") for label, name, n in rooflines}
    for label, opt, layout, n, threads, steps, impls in cases:
        if layout not in ("flat", "gpt2") or opt == "clip_adamw":
            continue
        size = GPT2_ELEMENTS if layout == "gpt2" else n
        key = ("roofline3" if opt == "sgd_momentum" else "roofline4", size)
        if key not in roof:
            continue
        r = roof[key]
        ours = med(label, "optarena")
        if "fused" in impls:
            tf = med(label, "torch fused")
            torch_cols = f"{tf * 1e3:.2f} ms | {r / tf:.0%}"
        else:
            torch_cols = "(none) | "
        lines.append(f"| {label} | {ours * 1e3:.2f} ms | {torch_cols.split(' | ')[0]} | "
                     f"{r * 1e3:.2f} ms | {r / ours:.0%} | {torch_cols.split(' | ')[1]} |")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks_notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines.append(f.read().rstrip())
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
