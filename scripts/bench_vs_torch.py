#!/usr/bin/env python3
"""optarena vs PyTorch's CPU optimizers, on the same machine, in the same run.

Runs torch's fused, foreach and for-loop Adam, AdamW, SGD (momentum) and RAdam, and optarena's
`bench_step` example, interleaved round by round so that machine drift hits both alike, and
writes BENCHMARKS.md (ratios, medians, machine, date, thread count, exact command).

Setup (outside the repository, next to it):
    python3 -m venv ../venv && ../venv/bin/pip install torch numpy
Run from the repository root:
    ../venv/bin/python scripts/bench_vs_torch.py --threads 2 --rounds 5 --out BENCHMARKS.md

Besides back-to-back steps on synthetic gradients, two sections time steps as a training loop
sees them:
- "Realistic gradients and an idle pool": Adam and AdamW at 85K and 1M elements, on gradients
  with a tail of tiny values (which drive `exp_avg_sq` into subnormal numbers) and with 1 ms of
  busy work on the calling thread before every step (so thread pools fall asleep), only the
  step timed.
- "Optimizer steps in a training loop": the digits MLP of `examples/train`, trained by the
  example itself and by the same loop in torch; only clip + step is timed on both sides.

A section against DeepSpeed's `DeepSpeedCPUAdam` (`--deepspeed-only` runs just it) needs
`../venv/bin/pip install deepspeed ninja`; DeepSpeed builds its CPU Adam on first use with the
venv's `ninja` and the system's C++ compiler (see `deepspeed_cpu_adam`). Without it the section
says why and times the rest.

`--quick` measures fewer, smaller cases and shorter runs (for checking the script itself).
A "Muon" section times torch.optim.Muon against optarena's on GPT-2 small's hidden matrices.

`--train-loop-only`, `--realistic-only` and `--muon-only` run just that section and write it into `--out`,
replacing the section of the same name there and keeping the rest of the file (`--main-only`: the
f32 table at the top and its fraction of the roofline). `--focus N` runs only the 32M
SGD-momentum, Adam and AdamW cases against torch fused and the roofline kernel for N rounds and
prints per-round ratio medians (for ratios too close to call in the full table).

optarena advises its large buffers onto transparent huge pages; torch's allocator does so only
with `THP_MEM_ALLOC_ENABLE=1` in the environment. Every section says which was the case, and a
`--*-only` run with it set writes its sections under headings of their own, beside the default's:
    THP_MEM_ALLOC_ENABLE=1 ../venv/bin/python scripts/bench_vs_torch.py --mixed-only --rounds 3
"""

import argparse
import datetime
import functools
import gzip
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_32M = 32 * 1024 * 1024
GPT2_ELEMENTS = 124_439_808

# torch's CPU allocator puts allocations of 2 MiB and more on transparent huge pages only when
# this is set (c10's `THP_MEM_ALLOC_ENABLE`); optarena advises its large buffers onto them always.
TORCH_THP = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def heading(text):
    """A section heading; runs with torch on huge pages get their own sections."""
    return text + (" (torch with THP_MEM_ALLOC_ENABLE=1)" if TORCH_THP else "")


def pages():
    """Which pages each side's large buffers live on in this run."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        mode = "not available"
    torch_side = ("torch's too (`THP_MEM_ALLOC_ENABLE=1` was set)" if TORCH_THP
                  else "torch's allocator does not by default (`THP_MEM_ALLOC_ENABLE` unset)")
    return (f"- Pages: optarena advises its large buffers onto transparent huge pages (this "
            f"kernel's setting: `{mode}`); {torch_side}")


def gpt2_small_shapes():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                   (768, 3072), (3072,), (3072, 768), (768,)]
    shapes += [(768,), (768,)]
    assert len(shapes) == 148
    return shapes


def gpt2_hidden_shapes(d=768):
    """The 2-D hidden matrices of GPT-2 small's 12 blocks, what Muon takes in torch's recipe
    (embeddings, the tied head, norms and biases go to AdamW); `d` is the model width."""
    shapes = []
    for _ in range(12):
        shapes += [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    return shapes


LAYOUTS = {
    "flat": lambda n: [(n,)],
    "gpt2": lambda n: gpt2_small_shapes(),
    "gpt2_hidden": lambda n: gpt2_hidden_shapes(n or 768),
    "adapter": lambda n: [(64, 128), (128, 64), (64,)],
}

TORCH_OPTIMIZERS = {
    "adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw),
    "adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, **kw),
    "sgd_momentum": lambda ps, **kw: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **kw),
    "radam": lambda ps, **kw: torch.optim.RAdam(ps, lr=1e-3, **kw),
    # Muon has only its single-tensor implementation and takes no foreach/fused keyword.
    "muon": lambda ps, **kw: torch.optim.Muon(ps),
}

IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "forloop": dict(foreach=False)}


@functools.lru_cache(maxsize=4)
def realistic_grads(n, seed=0):
    """`n` float32 gradients with a tail of tiny values, like a real model's: `z * 10**(-1 -
    29 u)`, `z` standard normal, `u` uniform on [0, 1), so the scale is log-uniform from 1e-1
    down to 1e-30 and 12% of the squares are subnormal in float32 (27% round to zero).

    Bit for bit the gradients of optarena's benchmarks (`realistic::gradients` in
    `benches/benchmarks/realistic.rs`, which documents the distribution): the SplitMix64 stream
    seeded with `seed`, three outputs per element, Box-Muller for `z`.
    """
    k = np.arange(1, 3 * n + 1, dtype=np.uint64)
    x = np.uint64(seed) + k * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    v = (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    normal = np.sqrt(-2.0 * np.log(1.0 - v[0::3])) * np.cos(2.0 * np.pi * v[1::3])
    return (normal * 10.0 ** (-1.0 - 29.0 * v[2::3])).astype(np.float32)


def busy_work(us):
    """Keeps this thread busy (spinning, not sleeping) for `us` microseconds, as forward and
    backward do between two optimizer steps; torch's worker threads idle meanwhile."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


class TorchCase:
    """A torch optimizer over parameters of `layout`, with synthetic (`random`) or realistic
    gradients, stepped with `idle_us` of busy work before each step (only the step timed)."""

    def __init__(self, optimizer, impl, layout, n, grads="random", idle_us=0):
        shapes = LAYOUTS[layout](n)
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.randn(s, generator=gen) for s in shapes]
        if grads == "realistic":
            flat = torch.from_numpy(realistic_grads(sum(math.prod(s) for s in shapes)))
            chunks = flat.split([math.prod(s) for s in shapes])
        for i, p in enumerate(self.params):
            p.requires_grad_(True)
            if grads == "realistic":
                p.grad = chunks[i].view(p.shape).clone()
            else:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        self.clip = optimizer == "clip_adamw"
        name = "adamw" if self.clip else optimizer
        self.opt = TORCH_OPTIMIZERS[name](self.params, **IMPLS[impl])
        self.elements = sum(p.numel() for p in self.params)
        self.idle_us = idle_us

    def step(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()

    def time(self, steps):
        with torch.no_grad():
            for _ in range(3):
                busy_work(self.idle_us)
                self.step()
            times = []
            for _ in range(steps):
                busy_work(self.idle_us)
                t = time.perf_counter()
                self.step()
                times.append(time.perf_counter() - t)
        times.sort()
        return times[len(times) // 2], times[min(len(times) - 1, len(times) * 99 // 100)]


def optarena_time(binary, optimizer, layout, n, threads, steps, grads="random", idle_us=0):
    cmd = [binary, optimizer, layout, str(n), str(threads), str(steps)]
    if grads != "random":
        cmd += ["--grads", grads]
    if idle_us:
        cmd += ["--idle-us", str(idle_us)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
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


def vector_isa():
    """The widest x86 vector extension the CPU reports: AVX-512 (F), AVX2, or neither."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return "vector extensions unknown"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2, no AVX-512"
    return "no AVX2"


def machine():
    return (f"{cpu_name()} ({vector_isa()}), {os.cpu_count()} logical cores, "
            f"{platform.system()} {platform.release()}")


def command_line():
    """This run's command, as typed from the repository root: the interpreter relative to the
    root (`../venv/bin/python` for a venv next to it), or just its name when it lives
    elsewhere, so no absolute path of this machine lands in BENCHMARKS.md."""
    python = os.path.relpath(sys.executable, REPO)
    if python.startswith(os.path.join("..", "..")):
        python = os.path.basename(sys.executable)
    return " ".join([python, "scripts/bench_vs_torch.py"] + sys.argv[1:])


def provenance():
    """The date, machine, torch version and command of this run, as list items: each section
    carries its own, since --train-loop-only and --realistic-only rewrite one section alone."""
    return [f"- Run on {datetime.date.today().isoformat()}: {machine()}; torch {torch.__version__}",
            f"- Command: `{command_line()}`", pages()]


def rounds_text(rounds):
    return f"{rounds} round{'s' if rounds != 1 else ''}"


def build_example(name):
    subprocess.run(["cargo", "build", "--release", "--example", name], check=True)
    return os.path.join("target", "release", "examples", name)


MLP_ELEMENTS = 85_002  # the digits MLP of examples/train: 64->256->256->10, weights and biases
REALISTIC_HEADING = heading("## Realistic gradients and an idle pool")
MUON_HEADING = heading("## Muon")
TRAIN_LOOP_HEADING = heading("## Optimizer steps in a training loop")
LATENCY_HEADING = heading("## Fine-tuning latency against the divider floor, and where the pool pays")


def realistic_section(args, binary):
    """Adam and AdamW at 85K and 1M elements, 1 and `--threads` threads, torch fused and
    foreach vs optarena: back to back on synthetic gradients, with 1 ms of busy work before
    every step, and with that busy work on realistic gradients. Returns the section's Markdown
    lines."""
    idle_us = 1000
    # (gradients, µs of busy work before each step): back to back as in the tables above, the
    # idle pool alone, then both.
    conditions = [("random", 0), ("random", idle_us), ("realistic", idle_us)]
    impls = ["torch fused", "torch foreach", "optarena"]
    cases = []  # (label, optimizer, elements, threads, timed steps)
    for opt in ["adam", "adamw"]:
        for n, size, steps in [(MLP_ELEMENTS, "85K", 300), (1 << 20, "1M", 100)]:
            for threads in sorted({1, args.threads}):
                label = f"{opt} {size}, {threads} thread{'s' if threads > 1 else ''}"
                cases.append((label, opt, n, threads, steps // 5 if args.quick else steps))
    results = {}  # (label, condition, impl) -> list of (median, p99)
    for rnd in range(args.rounds):
        print(f"realistic gradients, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for label, opt, n, threads, steps in cases:
            torch.set_num_threads(threads)
            for grads, idle in conditions:
                for impl in impls:
                    if impl == "optarena":
                        r = optarena_time(binary, opt, "flat", n, threads, steps, grads, idle)
                    else:
                        case = TorchCase(opt, impl.split()[1], "flat", n, grads, idle)
                        r = case.time(steps)
                        del case
                    results.setdefault((label, (grads, idle), impl), []).append(r)
    torch.set_num_threads(args.threads)

    def med(label, condition, impl, k=0):
        return statistics.median(r[k] for r in results[(label, condition, impl)])

    lines = [REALISTIC_HEADING, "",
             "Two things a training loop does to a step that back-to-back steps on synthetic "
             "gradients do not: its gradients have a tail of tiny values, whose squares are "
             "subnormal floats in Adam's `exp_avg_sq` (slow on Intel cores unless flushed to "
             "zero), and between two steps the calling thread runs forward and backward while "
             "the optimizer's threads idle and fall asleep. Here the realistic gradients are "
             "`z * 10**(-1 - 29 u)` (`z` standard normal, `u` uniform: a log-uniform scale from "
             "1e-1 to 1e-30; 12% of the squares are subnormal in f32, 27% round to zero; the same "
             "bits for torch and optarena, see `benches/benchmarks/realistic.rs`), and \"idle\" "
             f"means the calling thread spins for {idle_us} µs before every step; only the step "
             "is timed. optarena on 1 thread runs without a pool (`Parallelism::Sequential`), on "
             "more a rayon pool of that many threads; torch uses `torch.set_num_threads`.", "",
             *provenance(),
             f"- {rounds_text(args.rounds)}, each case timed by torch then optarena in turn; "
             "medians over rounds of each round's median step", "",
             "| case | impl | synthetic gradients, back to back | synthetic, idle | realistic, "
             "idle | realistic, idle: p99 | optarena speed-up (realistic, idle) |",
             "|---|---|---|---|---|---|---|"]
    realistic_idle = conditions[2]
    for label, *_ in cases:
        ours = med(label, realistic_idle, "optarena")
        for impl in impls:
            times = " | ".join(f"{med(label, c, impl) * 1e6:.1f} µs" for c in conditions)
            t = med(label, realistic_idle, impl)
            speed_up = "" if impl == "optarena" else f"{t / ours:.2f}x"
            lines.append(f"| {label} | {impl} | {times} | "
                         f"{med(label, realistic_idle, impl, 1) * 1e6:.1f} µs | {speed_up} |")
    return lines


DIGITS = os.path.join(REPO, "examples", "data", "digits.csv.gz")

# The MLP runs of examples/train (examples/train/runner.rs, `runs`): optimizer, peak lr and
# options; weight decay applies to the weights' group only (biases: 0), and their label in the
# example's results table.
TRAIN_RUNS = {
    "sgd_momentum": ("MLP SGD+momentum", 0.05,
                     lambda groups, lr, **kw: torch.optim.SGD(groups, lr=lr, momentum=0.9,
                                                              nesterov=True, weight_decay=5e-4,
                                                              **kw)),
    "adam": ("MLP Adam", 2e-3, lambda groups, lr, **kw: torch.optim.Adam(groups, lr=lr, **kw)),
    "adamw": ("MLP AdamW", 2e-3,
              lambda groups, lr, **kw: torch.optim.AdamW(groups, lr=lr, weight_decay=0.05,
                                                         **kw)),
    "radam": ("MLP RAdam", 2e-3, lambda groups, lr, **kw: torch.optim.RAdam(groups, lr=lr, **kw)),
}


def load_digits():
    """examples/train/data.rs: 64 pixels (0..16, divided by 16) and a label per line."""
    with gzip.open(DIGITS, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
    return torch.from_numpy((rows[:, :64] / 16.0).astype(np.float32)), \
        torch.from_numpy(rows[:, 64].astype(np.int64))


def split_digits(x, y, seed=0, test_fraction=0.2):
    """The example's stratified split: per class, a seeded shuffle puts round(20%) of the
    samples in the test set (the same sizes; numpy's shuffle, not the example's ChaCha8)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    labels = y.numpy()
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = math.floor(len(idx) * test_fraction + 0.5)  # Rust's f64::round, half away
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    train, test = torch.tensor(sorted(train)), torch.tensor(sorted(test))
    return (x[train], y[train]), (x[test], y[test])


def torch_train(name, impl, train, test, epochs, batch_size=32, seed=0):
    """One MLP run of examples/train in torch: 64->256->256->10 with ReLU and mean softmax
    cross-entropy, torch's default nn.Linear initialisation (the example draws the same
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), shuffled mini-batches, clip_grad_norm_(1.0), and the
    example's warmup + cosine schedule stepped per batch. Returns the time of
    clip_grad_norm_ + step in µs per step, and the final test accuracy."""
    _, lr, make = TRAIN_RUNS[name]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    groups = [{"params": [m.weight for m in linears]},
              {"params": [m.bias for m in linears], "weight_decay": 0.0}]
    opt = make(groups, lr, **IMPLS[impl])
    (x, y), (x_test, y_test) = train, test
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(total // 20, 1)
    sched = torch.optim.lr_scheduler
    schedule = sched.SequentialLR(opt, [
        sched.LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup),
        sched.CosineAnnealingLR(opt, T_max=max(total - warmup, 1), eta_min=lr * 0.01),
    ], milestones=[warmup])
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    timed = 0.0
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            t = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            timed += time.perf_counter() - t
            schedule.step()
        with torch.no_grad():
            test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return timed / total * 1e6, test_acc


def optarena_train(binary, threads, epochs):
    """Runs examples/train and reads its results table: per MLP run, the "opt µs/step" column
    (clip + step, forward and backward excluded) and the test accuracy."""
    with tempfile.TemporaryDirectory() as out:
        text = subprocess.run([binary, "--threads", str(threads), "--epochs", str(epochs),
                               "--out", out], check=True, capture_output=True, text=True).stdout
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    header = rows[0]
    us, acc = header.index("opt µs/step"), header.index("test acc")
    by_label = {r[0]: r for r in rows[2:]}
    return {name: (float(by_label[label][us]), float(by_label[label][acc].rstrip("%")) / 100)
            for name, (label, _, _) in TRAIN_RUNS.items()}


def train_loop_section(args, binary):
    """examples/train's four MLP runs against the same training loop in torch, rounds
    interleaved; only clip + step is timed. Returns the section's Markdown lines."""
    epochs = 2 if args.quick else 40
    train, test = split_digits(*load_digits())
    impls = {name: ["foreach", "forloop"] if name == "radam" else ["fused", "foreach", "forloop"]
             for name in TRAIN_RUNS}
    results = {}  # (optimizer, impl) -> list of (µs per step, test accuracy)
    torch.set_num_threads(args.threads)
    for rnd in range(args.rounds):
        print(f"training loop, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for name, r in optarena_train(binary, args.threads, epochs).items():
            results.setdefault((name, "optarena"), []).append(r)
        for name in TRAIN_RUNS:
            for impl in impls[name]:
                results.setdefault((name, f"torch {impl}"), []).append(
                    torch_train(name, impl, train, test, epochs))

    def med(name, impl, k=0):
        return statistics.median(r[k] for r in results[(name, impl)])

    steps = epochs * math.ceil(len(train[1]) / 32)
    lines = [TRAIN_LOOP_HEADING, "",
             "`cargo run --release --example train` (the digits MLP 64→256→256→10, "
             f"{MLP_ELEMENTS:,} parameters; {len(train[1])} training images in batches of 32, "
             f"{epochs} epochs, {steps} steps per run; warmup + cosine schedule; gradients "
             "clipped to norm 1.0) against the same loop in torch: the same model, data, split "
             "sizes, optimizers and hyperparameters, torch's own initialisation and shuffling. "
             "Here forward and backward run between two steps, as in real training. optarena: "
             "the example's \"opt µs/step\" (`step_clipped`: clip folded into the step, "
             "forward and backward excluded). torch: `clip_grad_norm_(params, 1.0)` (its "
             "default, foreach on CPU) + `opt.step()`, timed with `perf_counter` around those "
             "two calls and summed over the run. Target: torch's fastest at least 5x "
             "optarena's time.", "",
             *provenance(),
             f"- Threads: {args.threads} (`--threads` of the example, `torch.set_num_threads`); "
             f"{rounds_text(args.rounds)}, each running the example then every torch run; "
             "medians over rounds", "",
             "| optimizer | optarena | torch fused | torch foreach | torch forloop | torch's "
             "fastest / optarena | test accuracy, optarena / torch |",
             "|---|---|---|---|---|---|---|"]
    for name, (label, lr, _) in TRAIN_RUNS.items():
        ours = med(name, "optarena")
        cells = [f"{med(name, f'torch {impl}'):.1f} µs" if impl in impls[name] else "(none)"
                 for impl in ["fused", "foreach", "forloop"]]
        fastest = min(med(name, f"torch {impl}") for impl in impls[name])
        accs = [f"{a:.1%}" for a in sorted({med(name, f"torch {impl}", 1) for impl in impls[name]})]
        lines.append(f"| {label.removeprefix('MLP ')} (lr {lr}) | {ours:.1f} µs | {' | '.join(cells)} | "
                     f"{fastest / ours:.2f}x | {med(name, 'optarena', 1):.1%} / "
                     f"{', '.join(accs)} |")
    return lines


def latency_section(args):
    """examples/finetune_latency's step p50/p99 beside examples/divider_floor's bare AVX loops
    over the same number of f32, interleaved round by round (target: p50 at most 1.3x the
    "sqrt + 1 division" floor, p99 at most 2x p50), then examples/grain_size's table (inline
    against a hot and an idle pool). Returns the section's Markdown lines."""
    latency, floor, grain = (build_example(name) for name in
                             ("finetune_latency", "divider_floor", "grain_size"))
    requests = "1000" if args.quick else "5000"
    rows = {"p50": [], "p99": [], "sqrt": [], "sqrt + 1 division": [], "sqrt + 2 divisions": []}
    for rnd in range(args.rounds):
        print(f"latency, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        text = subprocess.run([latency, "--requests", requests], check=True,
                              capture_output=True, text=True).stdout
        m = re.search(r"optimizer step.*?p50\s+([\d.]+) µs\s+p99\s+([\d.]+) µs", text)
        rows["p50"].append(float(m.group(1)))
        rows["p99"].append(float(m.group(2)))
        text = subprocess.run([floor], check=True, capture_output=True, text=True).stdout
        for label, key in [("sqrt only", "sqrt"), ("sqrt + 1 division", "sqrt + 1 division"),
                           ("sqrt + 2 divisions", "sqrt + 2 divisions")]:
            m = re.search(re.escape(label) + r": median ([\d.]+) µs", text)
            rows[key].append(float(m.group(1)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    grain_args = ["--threads", str(args.threads), "--steps", "50" if args.quick else "200"]
    grain_text = subprocess.run([grain, *grain_args], check=True, capture_output=True,
                                text=True).stdout.strip().split("\n")
    return [LATENCY_HEADING, "",
            "`cargo run --release --example finetune_latency` (a 16,030-parameter AdamW adapter "
            "stepped on the request's own thread, `Parallelism::Sequential`) and `cargo run "
            "--release --example divider_floor` (bare AVX loops over the same 16K f32: the "
            "square root and divisions an exact Adam step cannot avoid), interleaved. Targets: "
            "step p50 at most 1.3x the \"sqrt + 1 division\" floor, p99 at most 2x p50.", "",
            *provenance(),
            f"- {rounds_text(args.rounds)}, each running both examples; medians over rounds", "",
            "| measure | µs |", "|---|---|",
            f"| adapter step p50 | {med['p50']:.2f} |",
            f"| adapter step p99 | {med['p99']:.2f} |",
            f"| floor: sqrt only | {med['sqrt']:.2f} |",
            f"| floor: sqrt + 1 division | {med['sqrt + 1 division']:.2f} |",
            f"| floor: sqrt + 2 divisions | {med['sqrt + 2 divisions']:.2f} |",
            f"| p50 / (sqrt + 1 division) | {med['p50'] / med['sqrt + 1 division']:.2f}x |",
            f"| p99 / p50 | {med['p99'] / med['p50']:.2f}x |", "",
            f"`cargo run --release --example grain_size -- {' '.join(grain_args)}`: a clipped "
            "step inline, on a hot pool, on a pool idled by 1 ms of busy work on the caller, and "
            "on that pool with its workers spinning 2 ms after each step before they may sleep "
            "(the last column: the whole iteration, busy work plus step, inline against "
            "spinning). The library runs steps below `PARALLEL_THRESHOLD` inline.", "",
            *grain_text[1:]]


def muon_section(args, binary):
    """torch.optim.Muon (its only, single-tensor implementation; Newton–Schulz in bf16) against
    optarena's Muon (bf16 emulated, the default) on GPT-2 small's 48 hidden matrices, default
    options, 1 and `--threads` threads. Returns the section's Markdown lines."""
    d = 64 if args.quick else 768
    steps = 2 if args.quick else 3
    elements = sum(math.prod(s) for s in gpt2_hidden_shapes(d))
    results = {}  # (threads, impl) -> list of (median, p99)
    for rnd in range(args.rounds):
        print(f"muon, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for threads in sorted({1, args.threads}):
            torch.set_num_threads(threads)
            case = TorchCase("muon", "forloop", "gpt2_hidden", d)
            results.setdefault((threads, "torch"), []).append(case.time(steps))
            del case
            r = optarena_time(binary, "muon", "gpt2_hidden", d, threads, steps)
            results.setdefault((threads, "optarena"), []).append(r)
    torch.set_num_threads(args.threads)
    med = lambda threads, impl: statistics.median(r[0] for r in results[(threads, impl)])
    lines = [MUON_HEADING, "",
             f"One Muon step (default options: momentum 0.95, nesterov, 5 Newton–Schulz "
             f"iterations in bf16) over the 48 hidden matrices of GPT-2 small's blocks "
             f"(width {d}, {elements / 1e6:.1f}M elements; embeddings, norms and biases are "
             f"AdamW's in torch's recipe), median of {steps} timed steps per round, "
             f"{rounds_text(args.rounds)}. torch's Muon has one implementation (a loop over "
             f"parameters, bf16 matrix products); optarena's emulates its bf16 rounding over "
             f"f32 matrixmultiply products, each parameter on one thread.", "",
             *provenance(), "",
             "| case | torch Muon (ms) | optarena Muon (ms) | speed-up |",
             "|---|---|---|---|"]
    for threads in sorted({1, args.threads}):
        t, o = med(threads, "torch"), med(threads, "optarena")
        lines.append(f"| gpt2-small hidden, {threads} thread{'s' if threads > 1 else ''} | "
                     f"{t * 1e3:.1f} | {o * 1e3:.1f} | {t / o:.2f}x |")
    return lines


SPARSE_HEADING = heading("## SparseAdam on an embedding table")


def torch_sparse_adam_time(rows, cols, touched, steps, seed=42):
    """torch.optim.SparseAdam on a [rows, cols] f32 table, `touched` distinct sorted rows per
    step (coalesced sparse gradients built in advance, not timed). Median and p99 seconds."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter((torch.arange(rows * cols) % 1000 - 500).float().mul_(1e-3).view(rows, cols))
    opt = torch.optim.SparseAdam([weight])
    warmup = 3
    grads = []
    for _ in range(warmup + steps):
        idx = torch.randperm(rows, generator=g)[:touched].sort().values
        vals = torch.rand(touched, cols, generator=g) * 2e-2 - 1e-2
        grads.append(torch.sparse_coo_tensor(idx[None], vals, (rows, cols)).coalesce())
    times = []
    for k, grad in enumerate(grads):
        weight.grad = grad
        t = time.perf_counter()
        opt.step()
        if k >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, len(times) * 99 // 100)]


def sparse_section(args, binary):
    """SparseAdam on a 1M x 64 f32 embedding table with 1% of the rows touched per step, torch
    against optarena (`examples/sparse_adam_bench`). Returns the section's Markdown lines."""
    rows, cols, touched = (100_000, 64, 1_000) if args.quick else (1_000_000, 64, 10_000)
    steps = 10 if args.quick else 50
    results = {"torch": [], "optarena": []}
    for rnd in range(args.rounds):
        print(f"sparse adam, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        results["torch"].append(torch_sparse_adam_time(rows, cols, touched, steps))
        out = subprocess.run([binary, str(rows), str(cols), str(touched), str(steps)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results["optarena"].append((r["median_s"], r["p99_s"]))

    def med(impl, k=0):
        return statistics.median(r[k] for r in results[impl])

    lines = [SPARSE_HEADING, "",
             f"`SparseAdam` steps on a [{rows}, {cols}] f32 embedding table, {touched} distinct "
             f"rows ({touched / rows:.0%}) touched per step (a coalesced sparse gradient, built "
             "before the timing), default options. torch: `torch.optim.SparseAdam` (its only "
             "implementation), `torch.set_num_threads` threads; optarena: "
             "`examples/sparse_adam_bench` (the step runs on the calling thread).", "",
             *provenance(),
             f"- {rounds_text(args.rounds)}, {steps} timed steps each; medians over rounds of each "
             "round's median step", "",
             "| impl | median step | p99 step | optarena speed-up |", "|---|---|---|---|"]
    ours = med("optarena")
    for impl in ["torch", "optarena"]:
        speed_up = "" if impl == "optarena" else f"{med(impl) / ours:.2f}x"
        lines.append(f"| {impl} | {med(impl) * 1e3:.2f} ms | {med(impl, 1) * 1e3:.2f} ms | {speed_up} |")
    return lines


MIXED_HEADING = heading("## Mixed precision: f32 master weights, bf16 gradients in, bf16 copy out")


class TorchCopyCase(TorchCase):
    """torch's fused f32 step followed by `bf16_params.copy_(params)`: what a mixed-precision
    loop without a fused copy does to refresh the bf16 weights of the next forward pass."""

    def __init__(self, optimizer, layout, n):
        super().__init__(optimizer, "fused", layout, n)
        self.half = [p.detach().to(torch.bfloat16) for p in self.params]

    def step(self):
        self.opt.step()
        for h, p in zip(self.half, self.params):
            h.copy_(p)


def mixed_section(args, binary):
    """Mode 2 of issue 15 at 32M elements: optarena's f32 Adam/AdamW step, its mixed step (bf16
    gradients in, bf16 parameter copy out, f32 state) and the same with bf16 moments, against
    torch's fused f32 step alone and followed by a separate bf16 copy, interleaved per round.
    Returns the section's Markdown lines."""
    n = 1 << 20 if args.quick else N_32M
    steps = 10
    threads = args.threads
    torch.set_num_threads(threads)
    results = {}  # (opt, impl) -> list of medians
    for rnd in range(args.rounds):
        print(f"mixed precision, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for opt in ["adam", "adamw"]:
            case = TorchCase(opt, "fused", "flat", n)
            results.setdefault((opt, "torch fused f32"), []).append(case.time(steps)[0])
            del case
            case = TorchCopyCase(opt, "flat", n)
            results.setdefault((opt, "torch fused f32 + bf16 copy_"), []).append(
                case.time(steps)[0])
            del case
            for name, label in [(opt, "optarena f32"),
                                (f"{opt}_mixed", "optarena mode 2 (bf16 grads, bf16 copy)"),
                                (f"{opt}_mixed_bf16state",
                                 "optarena mode 2 + bf16 moments"),
                                ("roofline4", "roofline (f32 traffic)"),
                                ("roofline_mixed", "roofline (mode 2 traffic)"),
                                ("roofline_mixed_bf16state",
                                 "roofline (mode 2 + bf16 moments traffic)")]:
                results.setdefault((opt, label), []).append(
                    optarena_time(binary, name, "flat", n, threads, steps)[0])
    # Bytes moved per element by the algorithm (reads + writes; a write-only array costs its
    # cache-line read for ownership too on x86, noted separately).
    traffic = {
        "torch fused f32": "28 (read p g m v, write p m v)",
        "torch fused f32 + bf16 copy_": "34 (+ read p 4, write copy 2; + 2 RFO)",
        "optarena f32": "28",
        "optarena mode 2 (bf16 grads, bf16 copy)": "28 (g 2 instead of 4; + write copy 2; + 2 RFO)",
        "optarena mode 2 + bf16 moments": "20 (m, v 2 + 2 each way; + 2 RFO)",
        "roofline (f32 traffic)": "28",
        "roofline (mode 2 traffic)": "28 (copy streamed)",
        "roofline (mode 2 + bf16 moments traffic)": "20 (copy streamed)",
    }
    # Each optarena row's own roofline (the same bytes with trivial arithmetic).
    roof_of = {"optarena f32": "roofline (f32 traffic)",
               "optarena mode 2 (bf16 grads, bf16 copy)": "roofline (mode 2 traffic)",
               "optarena mode 2 + bf16 moments": "roofline (mode 2 + bf16 moments traffic)"}
    med = statistics.median
    lines = [MIXED_HEADING, "",
             f"One Adam / AdamW step (default hyperparameters) over {n / 1e6:.1f}M elements, "
             f"{threads} threads, median of {steps} timed steps per round, "
             f"{rounds_text(args.rounds)} interleaved. Mode 2 keeps f32 parameters and state, "
             f"reads bf16 gradients and writes the updated parameters' bf16 copy in the same "
             f"pass; its f32 results are bitwise those of the f32 step on the widened gradients. "
             f"The torch peer of mode 2 is its fused f32 step plus a separate "
             f"`bf16_params.copy_(params)`; of mode 2 with bf16 moments, its fused f32 step "
             f"(issue 15's targets: 1.3x and 1.6x). The roofline rows move each row's bytes with "
             f"trivial arithmetic (`optarena::roofline`: `Roofline` for f32, `HalfRoofline` "
             f"through the mixed steps' own lane loop, bf16 conversions included); the last "
             f"column is the roofline's time over the row's.", "",
             *provenance(), "",
             "| optimizer | implementation | bytes / element | median step (ms) | "
             "vs torch fused f32 | vs torch fused f32 + copy | fraction of its roofline |",
             "|---|---|---|---|---|---|---|"]
    for opt in ["adam", "adamw"]:
        tf = med(results[(opt, "torch fused f32")])
        tc = med(results[(opt, "torch fused f32 + bf16 copy_")])
        for label in traffic:
            t = med(results[(opt, label)])
            frac = (f"{med(results[(opt, roof_of[label])]) / t:.0%}" if label in roof_of
                    else "")
            lines.append(f"| {opt} | {label} | {traffic[label]} | {t * 1e3:.2f} | "
                         f"{tf / t:.2f}x | {tc / t:.2f}x | {frac} |")
    return lines


HALF_HEADING = heading("## bf16 parameters without master weights: modes 1 and 3")


class TorchBf16Case(TorchCase):
    """torch's `fused=True` step on bf16 parameters and gradients (its state is bf16 too):
    the peer of optarena's mode 1."""

    def __init__(self, optimizer, layout, n):
        super().__init__(optimizer, "fused", layout, n)
        with torch.no_grad():
            params = [p.detach().to(torch.bfloat16).requires_grad_(True) for p in self.params]
            for p, q in zip(params, self.params):
                p.grad = q.grad.to(torch.bfloat16)
        self.params = params
        self.opt = TORCH_OPTIMIZERS[optimizer](self.params, **IMPLS["fused"])


def torch_time_isolated(kind, optimizer, layout, n, threads, steps):
    """`TorchCase(optimizer, "fused", ...)` (`kind` "f32") or `TorchBf16Case` (`kind` "bf16")
    timed in a fresh interpreter, as optarena's `bench_step` runs in a fresh process: in one
    long-lived process torch's step on 32M elements measured up to 50% slower after a GPT-2
    case than before it (15.2 vs 23.3 ms for bf16 AdamW, reproducibly), which would flatter
    optarena. Returns the median step in seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--time-torch-case", kind, optimizer,
           layout, str(n), str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]


def time_torch_case(args):
    """`--time-torch-case KIND OPTIMIZER LAYOUT N STEPS`: one case of `torch_time_isolated`,
    printed as JSON."""
    kind, optimizer, layout, n, steps = args.time_torch_case
    torch.set_num_threads(args.threads)
    case = (TorchCase(optimizer, "fused", layout, int(n)) if kind == "f32"
            else TorchBf16Case(optimizer, layout, int(n)))
    print(json.dumps({"median_s": case.time(int(steps))[0]}))


def half_section(args, binary):
    """Modes 1 and 3 of issue 15 at 32M elements and on GPT-2 small's layout
    (`Optimizer::step_half`, bf16 parameters and gradients, no f32 copy of the parameters):
    mode 1 (bf16 moments, round to nearest) against torch's `fused=True` on bf16 parameters,
    mode 3 (stochastic rounding; bf16 or f32 moments) against torch's fused f32 AdamW,
    interleaved per round, each case in a fresh process. Returns the section's Markdown
    lines."""
    threads = args.threads
    big = 1 << 20 if args.quick else N_32M
    layouts = [(f"{big / (1 << 20):.0f}M", "flat", big, 10)]
    if not args.quick and not args.skip_gpt2:
        layouts.append(("GPT-2 small", "gpt2", 0, 5))
    results = {}  # (layout label, opt, label) -> list of medians
    rows = {  # label -> (optarena bench_step name, or torch's kind; bytes / element)
        "adam": [("torch fused f32", "f32", "28 (read p g m v 16, write p m v 12)"),
                 ("torch fused bf16", "bf16", "14 (read 8, write 6)"),
                 ("optarena mode 1 (bf16, nearest)", "adam_bf16", "14"),
                 ("roofline (bf16 traffic)", "roofline_bf16", "14")],
        "adamw": [("torch fused f32", "f32", "28 (read p g m v 16, write p m v 12)"),
                  ("torch fused bf16", "bf16", "14 (read 8, write 6)"),
                  ("optarena mode 1 (bf16, nearest)", "adamw_bf16", "14"),
                  ("optarena mode 3 (stochastic, bf16 moments)", "adamw_sr", "14"),
                  ("optarena mode 3 (stochastic, f32 moments)", "adamw_sr_f32state",
                   "22 (m, v 4 + 4 each way)"),
                  ("roofline (bf16 traffic)", "roofline_bf16", "14")],
    }
    for rnd in range(args.rounds):
        print(f"bf16 modes 1 and 3, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for layout_label, layout, n, steps in layouts:
            for opt, cases in rows.items():
                for label, name, _ in cases:
                    if label.startswith("torch"):
                        t = torch_time_isolated(name, opt, layout, n, threads, steps)
                    else:
                        t = optarena_time(binary, name, layout, n, threads, steps)[0]
                    results.setdefault((layout_label, opt, label), []).append(t)
    med = statistics.median
    lines = [HALF_HEADING, "",
             f"One Adam / AdamW step (default hyperparameters) over {big / 1e6:.1f}M elements "
             f"and over GPT-2 small's 148 tensors (124.4M elements), {threads} threads, median "
             f"of 10 (GPT-2: 5) timed steps per round, {rounds_text(args.rounds)} interleaved; "
             f"every case runs in a fresh process (torch's as optarena's: in one long-lived "
             f"process torch's 32M step measured up to 50% slower after a GPT-2 case). "
             f"Parameters and gradients are bf16 and no "
             f"f32 copy of the parameters exists (`Optimizer::step_half`). Mode 1 keeps the "
             f"moments in bf16 and rounds to nearest: torch's `fused=True` step on bf16 "
             f"parameters, bit for bit (tests/bf16_fused.rs); its peer is that torch step "
             f"(issue 15's target: 1.8x). Mode 3 rounds the parameters stochastically "
             f"(torchao's `bf16_stochastic_round`, counter-based bits); its peer is torch's "
             f"fused f32 AdamW (target: 1.9x with bf16 moments). The roofline row moves the "
             f"14 bytes per element of modes 1 and 3 with trivial arithmetic through the same "
             f"lane loop (`optarena::roofline::HalfRoofline`, bf16 conversions included); the "
             f"last column is its time over the row's.", "",
             *provenance(), "",
             "| layout | optimizer | implementation | bytes / element | median step (ms) | "
             "vs torch fused f32 | vs torch fused bf16 | fraction of the bf16 roofline |",
             "|---|---|---|---|---|---|---|---|"]
    for layout_label, _, _, _ in layouts:
        for opt, cases in rows.items():
            def m(label):
                return med(results[(layout_label, opt, label)])
            tf, tb = m("torch fused f32"), m("torch fused bf16")
            roof = m("roofline (bf16 traffic)")
            for label, _, traffic in cases:
                t = m(label)
                frac = (f"{roof / t:.0%}" if label.startswith("optarena") and traffic == "14"
                        else "")
                lines.append(f"| {layout_label} | {opt} | {label} | {traffic} | {t * 1e3:.2f} | "
                             f"{tf / t:.2f}x | {tb / t:.2f}x | {frac} |")
    return lines


DEEPSPEED_HEADING = heading("## Against DeepSpeed's CPU Adam: f32 and modes 1-3")


@functools.lru_cache(maxsize=1)
def deepspeed_cpu_adam():
    """DeepSpeed's `DeepSpeedCPUAdam` class, or `(None, why)` when it cannot be used.

    DeepSpeed builds its CPU Adam (`cpu_adam`, C++ with `-march=native -fopenmp` and its own
    AVX-512/AVX2 lanes) just in time on first use, with `ninja` and a C++ compiler found on
    `PATH`. Install it into the benchmark virtualenv (`../venv/bin/pip install deepspeed
    ninja`); this function then puts the directory of the running interpreter (the venv's
    `bin`, where pip put `ninja`) in front of `PATH`, so the JIT build finds it without the
    caller activating the venv, and checks that `ninja` and `c++`/`g++` are there before
    trying. The build (a few minutes on 2 cores) is cached under `~/.cache/torch_extensions`.
    The extension's OpenMP calls resolve to torch's OpenMP runtime, so `torch.set_num_threads`
    sets its thread count too.
    """
    import shutil
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path
    missing = [tool for tool in ("ninja",) if shutil.which(tool) is None]
    if shutil.which("c++") is None and shutil.which("g++") is None:
        missing.append("c++/g++")
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # not installed, or its import fails
        return None, f"`import deepspeed` failed: {type(e).__name__}: {e}"
    if missing:
        return None, (f"deepspeed {deepspeed.__version__} is installed but its JIT build needs "
                      f"{' and '.join(missing)} on PATH (pip install ninja into the venv)")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        p = torch.nn.Parameter(torch.zeros(64))
        p.grad = torch.ones(64)
        DeepSpeedCPUAdam([p], lr=1e-3).step()  # builds (or loads) the extension
        # Adam's first step moves every parameter by -lr (times 1 / (1 + eps)).
        if not torch.allclose(p.detach(), torch.full((64,), -1e-3), rtol=1e-5, atol=0):
            return None, f"DeepSpeedCPUAdam's first step gave {p.detach()[:4]}, not -1e-3"
    except Exception as e:
        return None, (f"deepspeed {deepspeed.__version__}: building or loading its `cpu_adam` "
                      f"op failed: {type(e).__name__}: {e}")
    return DeepSpeedCPUAdam, None


class DeepSpeedCase:
    """`DeepSpeedCPUAdam` over parameters of `layout` (torch's Adam defaults; AdamW with
    torch's default `weight_decay=0.01`, `adamw_mode=True`), at one of DeepSpeed's precision
    settings:

    - `f32`: parameters, gradients and state f32;
    - `f32 + bf16 copy_`: the same step, then `bf16_params.copy_(params)` for the next bf16
      forward (the peer of optarena's mode 2: DeepSpeed 0.19's `adam_update` has no fused
      half-precision copy-out any more, and takes gradients in the parameters' dtype only);
    - `bf16 params, f32 state`: bf16 parameters and gradients, f32 moments;
    - `bf16 params and state`: `fp32_optimizer_states=False` on bf16 parameters: everything
      bf16, no f32 master copy.
    """

    PRECISIONS = ("f32", "f32 + bf16 copy_", "bf16 params, f32 state", "bf16 params and state")

    def __init__(self, optimizer, precision, layout, n):
        cls, why = deepspeed_cpu_adam()
        if cls is None:
            raise RuntimeError(why)
        shapes = LAYOUTS[layout](n)
        gen = torch.Generator().manual_seed(0)
        dtype = torch.float32 if precision.startswith("f32") else torch.bfloat16
        self.params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for p in self.params:
            p.requires_grad_(True)
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
        kw = dict(weight_decay=0.01, adamw_mode=True) if optimizer == "adamw" else \
            dict(weight_decay=0.0, adamw_mode=False)
        self.opt = cls(self.params, lr=1e-3,
                       fp32_optimizer_states=precision != "bf16 params and state", **kw)
        self.half = ([p.detach().to(torch.bfloat16) for p in self.params]
                     if precision == "f32 + bf16 copy_" else [])
        self.idle_us = 0

    def step(self):
        self.opt.step()
        for h, p in zip(self.half, self.params):
            h.copy_(p)

    time = TorchCase.time


def deepspeed_section(args, binary):
    """Adam and AdamW at 32M elements and on GPT-2 small's layout: torch fused f32 (alone and
    with a bf16 `copy_`), DeepSpeed's CPU Adam at each of its precision settings, optarena's f32
    step, its mode 2 (with f32 and with bf16 moments), mode 1 and (AdamW) mode 3, each beside
    DeepSpeed at the same precision, and the roofline of the f32 step's traffic, every case
    once per round, rounds interleaved. Returns the section's Markdown
    lines (or a note saying why DeepSpeed could not run)."""
    cls, why = deepspeed_cpu_adam()
    threads = args.threads
    torch.set_num_threads(threads)
    big = 1 << 20 if args.quick else N_32M
    layouts = [(f"{big // (1 << 20)}M", "flat", big, 10)]
    if not args.quick and not args.skip_gpt2:
        layouts.append(("GPT-2 small", "gpt2", 0, 5))
    opts = ["adam", "adamw"]
    ds = list(DeepSpeedCase.PRECISIONS) if cls is not None else []
    # Bytes per element each implementation moves (reads + writes of the algorithm; "+ RFO":
    # a store to a line the loop never read first reads it on x86, unless streamed).
    traffic = {
        "torch fused f32": "28 (read p g m v, write p m v)",
        "torch fused f32 + bf16 copy_": "34 + 2 RFO (+ read p, write copy)",
        "DeepSpeed f32": "28",
        "DeepSpeed f32 + bf16 copy_": "34 + 2 RFO",
        "DeepSpeed bf16 params, f32 state": "20 (p, g 2; m, v 4)",
        "DeepSpeed bf16 params and state": "14 (read 8, write 6)",
        "optarena f32": "28",
        "optarena mode 2 (bf16 grads, bf16 copy)": "28 (g 2; copy 2, streamed: no RFO)",
        "optarena mode 2 + bf16 moments": "20 (g, m, v 2; copy 2, streamed)",
        "optarena mode 1 (bf16, nearest)": "14",
        "optarena mode 3 (stochastic, bf16 moments)": "14",
        "optarena mode 3 (stochastic, f32 moments)": "22 (p, g 2; m, v 4)",
        "roofline (f32 traffic)": "28",
    }
    # optarena's rows and bench_step names, and the DeepSpeed setting at the same precision
    # (for mode 2 + bf16 moments, which DeepSpeed cannot do, its nearest: all bf16).
    ours = [("optarena f32", "{opt}", "DeepSpeed f32"),
            ("optarena mode 2 (bf16 grads, bf16 copy)", "{opt}_mixed",
             "DeepSpeed f32 + bf16 copy_"),
            ("optarena mode 2 + bf16 moments", "{opt}_mixed_bf16state",
             "DeepSpeed bf16 params and state"),
            ("optarena mode 1 (bf16, nearest)", "{opt}_bf16", "DeepSpeed bf16 params and state"),
            ("optarena mode 3 (stochastic, bf16 moments)", "adamw_sr",
             "DeepSpeed bf16 params and state"),
            ("optarena mode 3 (stochastic, f32 moments)", "adamw_sr_f32state",
             "DeepSpeed bf16 params, f32 state")]
    peer = {impl: ds_impl for impl, _, ds_impl in ours}
    results = {}  # (layout label, opt, impl) -> list of medians
    for rnd in range(args.rounds):
        print(f"deepspeed, round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for label, layout, n, steps in layouts:
            for opt in opts:
                def put(impl, t):
                    results.setdefault((label, opt, impl), []).append(t)
                case = TorchCase(opt, "fused", layout, n)
                put("torch fused f32", case.time(steps)[0])
                del case
                case = TorchCopyCase(opt, layout, n)
                put("torch fused f32 + bf16 copy_", case.time(steps)[0])
                del case
                for precision in ds:
                    case = DeepSpeedCase(opt, precision, layout, n)
                    put(f"DeepSpeed {precision}", case.time(steps)[0])
                    del case
                for impl, name, _ in ours:
                    if name.startswith("adamw_sr") and opt != "adamw":
                        continue  # mode 3 is timed for AdamW only
                    put(impl, optarena_time(binary, name.format(opt=opt), layout, n, threads,
                                            steps)[0])
            results.setdefault((label, None, "roofline"), []).append(
                optarena_time(binary, "roofline4", layout, n, threads, steps)[0])
    med = statistics.median
    lines = [DEEPSPEED_HEADING, "",
             "Adam and AdamW (torch's defaults; AdamW `weight_decay=0.01`) against DeepSpeed's "
             "`DeepSpeedCPUAdam` (ZeRO-Offload's CPU optimizer: C++ built on this machine with "
             "`-march=native`, AVX-512 lanes, OpenMP threads) at each of its precision settings, "
             "torch's fused step, and optarena's f32 step and mode 2 (f32 master weights and "
             "state, bf16 gradients in, bf16 parameter copy out in the same pass; optionally "
             "bf16 moments). DeepSpeed 0.19's `adam_update` takes gradients in the parameters' "
             "dtype and has no fused copy-out, so its peer of mode 2 is its f32 step plus a "
             "`copy_` to bf16; it cannot keep bf16 moments beside f32 master weights "
             "(`fp32_optimizer_states=False` means the parameters' dtype), so its lowest-traffic "
             "setting, bf16 parameters and state with no master copy, is listed as the nearest. "
             "That setting is also the peer of optarena's modes 1 and 3 (bf16 parameters and "
             "moments, no master copy), and its bf16 parameters with f32 state the peer of mode "
             "3 with f32 moments: the column \"vs DeepSpeed, same precision\" pairs each "
             "optarena row with its DeepSpeed setting. "
             "The roofline is `optarena::roofline` moving the f32 step's traffic.", "",
             *provenance(),
             f"- {threads} threads; {rounds_text(args.rounds)}, every case of a layout once per "
             "round, in the order of the table; medians over rounds of each round's median step",
             ""]
    if cls is None:
        lines += [f"DeepSpeed could not run here: {why}", ""]
    lines += ["| layout | optimizer | implementation | bytes / element | median step (ms) | "
              "vs torch fused f32 | vs DeepSpeed f32 | vs DeepSpeed, same precision | "
              "fraction of the roofline |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, layout, n, steps in layouts:
        roof = med(results[(label, None, "roofline")])
        for opt in opts:
            tf = med(results[(label, opt, "torch fused f32")])
            tds = results.get((label, opt, "DeepSpeed f32"))
            for impl in traffic:
                key = (label, opt, impl) if impl != "roofline (f32 traffic)" else None
                if key is not None and key not in results:
                    continue
                t = roof if key is None else med(results[key])
                vs_ds = f"{med(tds) / t:.2f}x" if tds else "(none)"
                f32_traffic = impl in ("torch fused f32", "DeepSpeed f32", "optarena f32",
                                       "roofline (f32 traffic)")
                frac = f"{roof / t:.0%}" if f32_traffic else ""
                same = results.get((label, opt, peer.get(impl)))
                vs_same = f"{med(same) / t:.2f}x" if same else ""
                lines.append(f"| {label} | {opt} | {impl} | {traffic[impl]} | {t * 1e3:.2f} | "
                             f"{tf / t:.2f}x | {vs_ds} | {vs_same} | {frac} |")
    return lines


def write_section(path, lines):
    """Puts a section into the Markdown file `path`: in place of the section with the same
    heading (up to the next `## ` heading), else before the analysis appended from
    benchmarks_notes.md, else at the end."""
    heading = lines[0]
    old = open(path).read().rstrip("\n").split("\n") if os.path.exists(path) else []
    if heading in old:
        start = old.index(heading)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = old[:start] + lines + ([""] if end < len(old) else []) + old[end:]
    else:
        notes = notes_lines()
        at = old.index(notes[0]) if notes and notes[0] in old else len(old)
        gap = [""] if at > 0 and old[at - 1] else []
        new = old[:at] + gap + lines + ([""] if at < len(old) else []) + old[at:]
    with open(path, "w") as f:
        f.write("\n".join(new).rstrip("\n") + "\n")


def notes_lines():
    """The lead's analysis, appended to BENCHMARKS.md after the tables."""
    notes = os.path.join(REPO, "scripts", "benchmarks_notes.md")
    if not os.path.exists(notes):
        return []
    with open(notes) as f:
        return f.read().strip("\n").split("\n")


def focus(rounds, threads):
    """The 32M cases only, many rounds: per-round ratios to torch fused and to the roofline."""
    binary = build_example("bench_step")
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
    ap.add_argument("--quick", action="store_true",
                    help="fewer, smaller cases and shorter training runs (checks the script)")
    ap.add_argument("--focus", type=int, metavar="ROUNDS",
                    help="only the 32M SGD-momentum, Adam and AdamW cases against torch fused "
                         "and the roofline, ROUNDS rounds, printing per-round ratio medians")
    ap.add_argument("--train-loop-only", action="store_true",
                    help="only the training-loop section (examples/train against the same loop "
                         "in torch), written into --out in place of its old version")
    ap.add_argument("--latency-only", action="store_true",
                    help="only the adapter-latency and pool-threshold section, written into "
                         "--out in place of its old version")
    ap.add_argument("--muon-only", action="store_true",
                    help="only the Muon section (GPT-2 small's hidden matrices), written into "
                         "--out in place of its old version")
    ap.add_argument("--realistic-only", action="store_true",
                    help="only the realistic-gradients-and-idle-pool section, written into "
                         "--out in place of its old version")
    ap.add_argument("--skip-muon", action="store_true",
                    help="leave the Muon section (about 8 minutes on 2 cores) out of a full run")
    ap.add_argument("--mixed-only", action="store_true",
                    help="only the mixed-precision sections (mode 2 at 32M against torch fused "
                         "f32 with and without a bf16 copy; modes 1 and 3, bf16 parameters, "
                         "against torch fused on bf16 and fused f32), written into --out in place "
                         "of their old versions")
    ap.add_argument("--deepspeed-only", action="store_true",
                    help="only the section against DeepSpeed's CPU Adam (f32 and mode 2 at 32M "
                         "and GPT-2 small, with torch fused and the roofline), written into "
                         "--out in place of its old version")
    ap.add_argument("--skip-gpt2", action="store_true",
                    help="leave GPT-2 small's layout out of the bf16 and DeepSpeed sections "
                         "(its cases take about 4x the 32M ones)")
    ap.add_argument("--main-only", action="store_true",
                    help="only the f32 step table at the top of --out and its fraction of the "
                         "roofline, written in place of their old versions")
    ap.add_argument("--sparse-only", action="store_true",
                    help="only the SparseAdam embedding-table section, written into --out in "
                         "place of its old version")
    ap.add_argument("--time-torch-case", nargs=5,
                    metavar=("KIND", "OPTIMIZER", "LAYOUT", "N", "STEPS"),
                    help=argparse.SUPPRESS)  # one torch case in this process, for the others
    args = ap.parse_args()
    os.chdir(REPO)
    if args.time_torch_case:
        return time_torch_case(args)
    if args.sparse_only:
        torch.set_num_threads(args.threads)
        lines = sparse_section(args, build_example("sparse_adam_bench"))
        write_section(args.out, lines)
        print("\n".join(lines))
        return
    if args.focus:
        return focus(args.focus, args.threads)
    if args.deepspeed_only:
        lines = deepspeed_section(args, build_example("bench_step"))
        write_section(args.out, lines)
        print("\n".join(lines))
        return
    if args.mixed_only:
        binary = build_example("bench_step")
        for lines in (mixed_section(args, binary), half_section(args, binary)):
            write_section(args.out, lines)
            print("\n".join(lines))
        return
    if args.train_loop_only or args.realistic_only or args.latency_only or args.muon_only:
        sections = []
        if args.latency_only:
            sections.append(latency_section(args))
        if args.muon_only:
            sections.append(muon_section(args, build_example("bench_step")))
        if args.realistic_only:
            sections.append(realistic_section(args, build_example("bench_step")))
        if args.train_loop_only:
            sections.append(train_loop_section(args, build_example("train")))
        for lines in sections:
            write_section(args.out, lines)
            print("\n".join(lines))
        return

    binary = build_example("bench_step")
    if args.main_only:
        if TORCH_THP:
            sys.exit("--main-only rewrites the title table of --out; run it without "
                     "THP_MEM_ALLOC_ENABLE (the other --*-only sections take it)")
        lines = step_tables(args, binary)
        at = lines.index(FRACTION_HEADING)
        head, fraction = lines[:at - 1], lines[at:]
        old = open(args.out).read().rstrip("\n").split("\n") if os.path.exists(args.out) else []
        first = next((i for i, line in enumerate(old) if line.startswith("## ")), len(old))
        with open(args.out, "w") as f:
            f.write("\n".join(head + [""] + old[first:]).rstrip("\n") + "\n")
        write_section(args.out, fraction)
        print("\n".join(lines))
        return
    train_binary = build_example("train")
    lines = step_tables(args, binary)
    lines += [""] + realistic_section(args, binary)
    lines += [""] + train_loop_section(args, train_binary)
    lines += [""] + latency_section(args)
    if not args.skip_muon:
        lines += [""] + muon_section(args, binary)
    lines += [""] + sparse_section(args, build_example("sparse_adam_bench"))
    lines += [""] + mixed_section(args, binary)
    lines += [""] + half_section(args, binary)
    lines += [""] + deepspeed_section(args, binary)
    notes = notes_lines()
    if notes:
        lines += [""] + notes
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


FRACTION_HEADING = heading("## Fraction of the roofline")


def step_tables(args, binary):
    """The f32 step times against torch's fused, foreach and for-loop steps (the file's title
    section) and their fraction of the roofline. Returns the Markdown lines of both."""
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
    lines += ["# optarena vs PyTorch: CPU optimizer step times", "",
              f"- Date: {datetime.date.today().isoformat()}",
              f"- Machine: {machine()}",
              f"- torch {torch.__version__}; optarena built with a plain `cargo build --release` "
              f"(run-time AVX2 / AVX-512 dispatch)",
              f"- Threads: {args.threads} (adapter cases: 1); f32; {args.rounds} rounds, each "
              f"case timed by torch then optarena in turn so drift hits both",
              f"- Command: `{command_line()}`", pages(),
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
    lines += ["", FRACTION_HEADING, "",
              "The roofline kernel (`optarena::roofline`) moves exactly an optimizer's memory "
              "traffic with trivial arithmetic (Adam/AdamW/RAdam: read 4 arrays, write 3; "
              "SGD-momentum: read 3, write 2) in arrays allocated as a step's, on the same "
              "threads, walked the fastest of its ways (lane widths, piece sizes, prefetch on or "
              "off; `Roofline::calibrate`), timed in the same rounds. A fraction near 100% means "
              "the step is limited by memory bandwidth alone.",
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
    return lines


if __name__ == "__main__":
    main()
