//! Times optarena optimizer steps and prints one JSON line per measurement. Used by
//! `scripts/bench_vs_torch.py`, which runs it interleaved with PyTorch on the same machine.
//!
//! ```sh
//! cargo run --release --example bench_step -- adam flat 33554432 2 20
//! cargo run --release --example bench_step -- adamw gpt2 0 2 10
//! cargo run --release --example bench_step -- adamw adapter 0 1 5000
//! cargo run --release --example bench_step -- muon gpt2_hidden 0 2 3
//! cargo run --release --example bench_step -- roofline4 flat 33554432 2 20
//! cargo run --release --example bench_step -- adamw gpt2 0 2 10 --groups decay
//! cargo run --release --example bench_step -- adamw gpt2_grouped 0 2 10 --groups decay
//! cargo run --release --example bench_step -- adam flat 85002 2 500 --grads realistic --idle-us 1000
//! cargo run --release --example bench_step -- adamw_mixed flat 33554432 2 20
//! cargo run --release --example bench_step -- adamw_sr flat 33554432 2 20
//! cargo run --release --example bench_step -- roofline_bf16 flat 33554432 2 20
//! ```
//! Arguments: optimizer (`sgd`, `sgd_momentum`, `adam`, `adamw`, `radam`, `nadam`, `adamax`,
//! `adagrad`, `adadelta`, `rmsprop`, `rprop`, `asgd`, `adafactor`, `muon`, the mixed-precision steps `adam_mixed` / `adamw_mixed` (f32
//! master weights and state, bf16 gradients in, bf16 parameter copy out, one pass) and
//! `adam_mixed_bf16state` / `adamw_mixed_bf16state` (the same with bf16 moments), the bf16
//! steps without master weights `adam_bf16` / `adamw_bf16` (mode 1: bf16 parameters,
//! gradients and moments, rounded to nearest, as torch's `fused=True` on bf16) and `adamw_sr`
//! / `adamw_sr_f32state` (mode 3: stochastic rounding of the bf16 parameters, bf16 or f32
//! moments), `roofline2`
//! ... `roofline5` (the roofline kernel reading that many arrays), `roofline_bf16` /
//! `roofline_mixed_bf16state` / `roofline_mixed` (the mixed-precision roofline moving the
//! traffic of modes 1 and 3, of mode 2 with bf16 moments, of mode 2: 14, 20, 28 bytes per
//! element), or `clip_adamw` for clip_grad_norm fused into an AdamW step), layout (`flat`,
//! `gpt2`, `gpt2_grouped`, `adapter`, `gpt2_hidden`), elements (for `flat`; for `gpt2_hidden`
//! the model width, `0` for GPT-2 small's 768), threads, timed steps.
//!
//! `gpt2` is GPT-2 small's 148 tensors in torch's registration order; `gpt2_grouped` is the
//! same tensors with every 2-D one first (the embeddings and the 48 hidden matrices), then the
//! biases and LayerNorm weights, each kind in registration order.
//!
//! `gpt2_hidden` is what Muon takes of GPT-2 small in torch's recipe: the 48 hidden matrices
//! of the 12 blocks (`attn.c_attn` `[d, 3d]`, `attn.c_proj` `[d, d]`, `mlp.c_fc` `[d, 4d]`,
//! `mlp.c_proj` `[4d, d]`, 84.9M elements at `d = 768`); the embeddings (and the tied output
//! head), norms and biases are left to AdamW.
//!
//! Options, anywhere on the line, to time a step as a training loop sees it:
//! - `--grads random|realistic`: `random` (the default) fills the gradients with smooth
//!   synthetic values of magnitude up to 1e-2; `realistic` draws them from a distribution with
//!   a tail of tiny values like a real model's, which drives Adam's `exp_avg_sq` into subnormal
//!   numbers (`realistic::gradients` in `benches/benchmarks/realistic.rs` has the exact
//!   distribution; seeded, so every run gets the same gradients).
//! - `--groups all|decay`: `all` (the default) is one group of every parameter; `decay` is
//!   torch's weight-decay recipe, `[{"params": [p for p in params if p.dim() >= 2]},
//!   {"params": the rest, "weight_decay": 0.0}]`. On `gpt2` the two groups interleave (49 runs
//!   each, 97 alternations between them); on `gpt2_grouped` each is one run.
//! - `--idle-us N`: before each step (warm-up and timed), about N µs of busy work on the
//!   calling thread (a spin, not a sleep), as forward and backward between two steps; the
//!   pool's threads fall asleep meanwhile. Only the step is timed.
//!
//! `thread_cpu_median_s` in the output is the median CPU time of the calling thread per step:
//! with one thread, the step's time without the periods other processes held the core (the
//! stable measure on a shared machine). `OPTARENA_STREAM_COPY=0` makes the mixed steps store
//! their bf16 copy ordinarily instead of streaming it (`Optimizer::set_stream_copy_threshold`).
//!
//! The environment variable `OPTARENA_SIMD` (`portable`, `avx2`, `avx512`, `avx512bf16`) caps the optimizers'
//! instruction set; the roofline kernels always take the fastest strategy they measure (and
//! print it to stderr).

use std::time::{Duration, Instant};

use half::bf16;
use optarena::mixed::{narrow, HalfBuffer, ParamRounding, StatePrecision};
use optarena::optim::*;
use optarena::roofline::{HalfRoofline, HalfTraffic, Roofline};
use optarena::{Arena, ArenaBuilder, ClipNorm, Parallelism, ParamGroup, SimdLevel, StepOptions};

#[path = "../benches/benchmarks/cpu_time.rs"]
mod cpu_time;
#[path = "../benches/benchmarks/gpt2_layout.rs"]
mod gpt2_layout;
#[path = "../benches/benchmarks/realistic.rs"]
mod realistic;
use cpu_time::thread_cpu_seconds;

fn shapes(layout: &str, n: usize) -> Vec<(String, Vec<usize>)> {
    match layout {
        "flat" => vec![("w".into(), vec![n])],
        "adapter" => vec![
            ("adapter.down".into(), vec![64, 128]),
            ("adapter.up".into(), vec![128, 64]),
            ("adapter.bias".into(), vec![64]),
        ],
        "gpt2" => gpt2_layout::gpt2_small(),
        "gpt2_hidden" => {
            let d = if n == 0 { 768 } else { n };
            let mut v = Vec::new();
            for i in 0..12 {
                for (s, shape) in [
                    ("attn.c_attn.weight", vec![d, 3 * d]),
                    ("attn.c_proj.weight", vec![d, d]),
                    ("mlp.c_fc.weight", vec![d, 4 * d]),
                    ("mlp.c_proj.weight", vec![4 * d, d]),
                ] {
                    v.push((format!("h.{i}.{s}"), shape));
                }
            }
            v
        }
        "gpt2_grouped" => {
            let all = shapes("gpt2", 0);
            let (matrices, rest): (Vec<_>, Vec<_>) =
                all.into_iter().partition(|(_, s)| s.len() >= 2);
            matrices.into_iter().chain(rest).collect()
        }
        other => panic!("unknown layout {other}"),
    }
}

/// Where the gradients come from (`--grads`).
#[derive(Clone, Copy)]
enum Grads {
    /// Smooth synthetic values, `cos(...) · 1e-2`.
    Random,
    /// [`realistic::gradients`]: normal values times a log-uniform scale down to 1e-30.
    Realistic,
}

impl Grads {
    fn name(self) -> &'static str {
        match self {
            Grads::Random => "random",
            Grads::Realistic => "realistic",
        }
    }
}

fn arena(shapes: &[(String, Vec<usize>)], grads: Grads) -> Arena<f32> {
    let mut b = ArenaBuilder::<f32>::new();
    for (name, shape) in shapes {
        b.param_with(name, shape, |i| ((i % 1000) as f32 * 1e-3).sin())
            .unwrap();
    }
    let mut a = b.build();
    match grads {
        Grads::Random => a
            .grads_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, g)| *g = ((i % 777) as f32 * 3e-3).cos() * 1e-2),
        Grads::Realistic => {
            let n = a.len();
            a.grads_mut()
                .iter_mut()
                .zip(realistic::gradients(n, realistic::GRADIENT_SEED))
                .for_each(|(g, v)| *g = v as f32);
        }
    }
    a
}

/// The command line: five positional arguments and the `--grads` / `--groups` / `--idle-us`
/// options.
struct Args {
    positional: Vec<String>,
    grads: Grads,
    /// torch's decay / no-decay recipe instead of one group (`--groups decay`).
    decay_groups: bool,
    idle: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        positional: Vec::new(),
        grads: Grads::Random,
        decay_groups: false,
        idle: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--grads" => {
                args.grads = match value()?.as_str() {
                    "random" => Grads::Random,
                    "realistic" => Grads::Realistic,
                    other => return Err(format!("--grads {other}: expected random or realistic")),
                }
            }
            "--groups" => {
                args.decay_groups = match value()?.as_str() {
                    "all" => false,
                    "decay" => true,
                    other => return Err(format!("--groups {other}: expected all or decay")),
                }
            }
            "--idle-us" => {
                let us: u64 = value()?.parse().map_err(|e| format!("--idle-us: {e}"))?;
                args.idle = Duration::from_micros(us);
            }
            _ => args.positional.push(arg),
        }
    }
    if args.positional.len() != 5 {
        return Err("expected 5 positional arguments".into());
    }
    Ok(args)
}

/// Modes 1 and 3 of `optarena::mixed` (`Optimizer::step_half`): bf16 parameters and bf16
/// gradients with no f32 copy of the parameters. `adam_bf16` / `adamw_bf16`: bf16 state and
/// rounding to nearest (torch's `fused=True` on bf16 parameters); `adamw_sr`: bf16 state and
/// stochastic rounding of the parameters (torchao's `bf16_stochastic_round` with moments in
/// bf16); `adamw_sr_f32state`: the same with f32 moments. The f32 arena `a` only lays the
/// buffers out and is dropped before the first step.
fn half_step(
    name: &str,
    a: Arena<f32>,
    groups: Vec<ParamGroup<f32>>,
    par: &Parallelism,
    simd: SimdLevel,
) -> Box<dyn FnMut()> {
    let mut grads = HalfBuffer::<bf16>::gradients(&a);
    narrow(SimdLevel::Best, a.grads(), grads.as_mut_slice()).unwrap();
    let mut params = HalfBuffer::<bf16>::copy_of(&a);
    let precision = if name.ends_with("f32state") {
        StatePrecision::Full
    } else {
        StatePrecision::Bf16
    };
    let stochastic = name.contains("_sr");
    macro_rules! half {
        ($opt:expr) => {{
            let mut o = $opt
                .unwrap()
                .with_parallelism(par.clone())
                .with_simd_level(simd);
            o.set_state_precision(precision).unwrap();
            drop(a);
            let mut step = 0u64;
            Box::new(move || {
                step += 1;
                let rounding = if stochastic {
                    ParamRounding::Stochastic { seed: 1, step }
                } else {
                    ParamRounding::Nearest
                };
                o.step_half(&mut params, &grads, rounding, StepOptions::default())
                    .unwrap();
            })
        }};
    }
    if name.starts_with("adamw") {
        half!(AdamW::new(&a, groups, AdamWConfig::default()))
    } else {
        half!(Adam::new(&a, groups, AdamConfig::default()))
    }
}

fn main() {
    let Args {
        positional: args,
        grads,
        decay_groups,
        idle,
    } = parse_args().unwrap_or_else(|e| {
        eprintln!(
            "bench_step: {e}\nusage: bench_step <optimizer> <flat|gpt2|adapter|gpt2_hidden> <elements> \
             <threads> <steps> [--grads random|realistic] [--groups all|decay] [--idle-us N]"
        );
        std::process::exit(2);
    });
    let (name, layout) = (args[0].as_str(), args[1].as_str());
    let n: usize = args[2].parse().expect("elements");
    let threads: usize = args[3].parse().expect("threads");
    let steps: usize = args[4].parse().expect("steps");
    let par = if threads <= 1 {
        Parallelism::Sequential
    } else {
        Parallelism::Pool(std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        ))
    };
    let simd = match std::env::var("OPTARENA_SIMD").as_deref() {
        Ok("portable") => SimdLevel::Portable,
        Ok("avx2") => SimdLevel::Avx2,
        Ok("avx512") => SimdLevel::Avx512,
        Ok("avx512bf16") => SimdLevel::Avx512Bf16,
        Ok(other) => panic!("unknown OPTARENA_SIMD {other}"),
        Err(_) => SimdLevel::Best,
    };
    let shapes = shapes(layout, n);
    let total: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut a = arena(&shapes, grads);
    let g = || {
        if decay_groups {
            let (decay, rest): (Vec<_>, Vec<_>) = shapes.iter().partition(|(_, s)| s.len() >= 2);
            vec![
                ParamGroup::named(decay.into_iter().map(|(n, _)| n.clone())),
                ParamGroup::named(rest.into_iter().map(|(n, _)| n.clone()))
                    .with("weight_decay", 0.0),
            ]
        } else {
            vec![ParamGroup::all()]
        }
    };
    // Runs over all groups: how fragmented the groups are.
    let mut runs = 0;
    let mut step: Box<dyn FnMut()> = match name {
        "roofline_bf16" | "roofline_mixed_bf16state" | "roofline_mixed" => {
            let traffic = match name {
                "roofline_bf16" => HalfTraffic::Bf16,
                "roofline_mixed_bf16state" => HalfTraffic::MasterBf16Moments,
                _ => HalfTraffic::Master,
            };
            let mut roof = HalfRoofline::new(total, traffic);
            Box::new(move || roof.run(&par))
        }
        "roofline2" | "roofline3" | "roofline4" | "roofline5" => {
            let reads = name["roofline".len()..].parse().unwrap();
            let mut roof = Roofline::<f32>::new(total, reads).unwrap();
            eprintln!("roofline strategy: {:?}", roof.calibrate(&par, 5));
            Box::new(move || roof.run(&par))
        }
        _ => {
            macro_rules! run {
                ($opt:expr) => {{
                    let mut o = $opt
                        .unwrap()
                        .with_parallelism(par.clone())
                        .with_simd_level(simd);
                    runs = (0..o.num_groups())
                        .map(|i| o.group_params(i).unwrap().len())
                        .sum();
                    Box::new(move || o.step(&mut a).unwrap())
                }};
            }
            match name {
                "sgd_momentum" => run!(SGD::new(&a, g(), SGDConfig::default().with_momentum(0.9))),
                "adam" => run!(Adam::new(&a, g(), AdamConfig::default())),
                "adamw" => run!(AdamW::new(&a, g(), AdamWConfig::default())),
                "radam" => run!(RAdam::new(&a, g(), RAdamConfig::default())),
                "nadam" => run!(NAdam::new(&a, g(), NAdamConfig::default())),
                "adamax" => run!(Adamax::new(&a, g(), AdamaxConfig::default())),
                "adagrad" => run!(Adagrad::new(&a, g(), AdagradConfig::default())),
                "adadelta" => run!(Adadelta::new(&a, g(), AdadeltaConfig::default())),
                "rmsprop" => run!(RMSprop::new(&a, g(), RMSpropConfig::default())),
                "rprop" => run!(Rprop::new(&a, g(), RpropConfig::default())),
                "asgd" => run!(ASGD::new(&a, g(), ASGDConfig::default())),
                "sgd" => run!(SGD::new(&a, g(), SGDConfig::default().with_lr(1e-3))),
                "adafactor" => run!(Adafactor::new(&a, g(), AdafactorConfig::default())),
                "muon" => run!(Muon::new(&a, g(), MuonConfig::default())),
                "adam_mixed" | "adamw_mixed" | "adam_mixed_bf16state" | "adamw_mixed_bf16state" => {
                    // The gradients as a bf16 backward would leave them, and the bf16 copy.
                    let mut hg = HalfBuffer::<bf16>::gradients(&a);
                    narrow(SimdLevel::Best, a.grads(), hg.as_mut_slice()).unwrap();
                    let mut copy = HalfBuffer::<bf16>::copy_of(&a);
                    let precision = if name.ends_with("bf16state") {
                        StatePrecision::Bf16
                    } else {
                        StatePrecision::Full
                    };
                    macro_rules! mixed {
                        ($opt:expr) => {{
                            let mut o = $opt
                                .unwrap()
                                .with_parallelism(par.clone())
                                .with_simd_level(simd);
                            o.set_state_precision(precision).unwrap();
                            // OPTARENA_STREAM_COPY=0 turns the streamed copy off (A/B runs).
                            if std::env::var("OPTARENA_STREAM_COPY").as_deref() == Ok("0") {
                                o.set_stream_copy_threshold(usize::MAX);
                            }
                            Box::new(move || {
                                o.step_mixed(&mut a, &hg, &mut copy, StepOptions::default())
                                    .unwrap();
                            })
                        }};
                    }
                    if name.starts_with("adamw") {
                        mixed!(AdamW::new(&a, g(), AdamWConfig::default()))
                    } else {
                        mixed!(Adam::new(&a, g(), AdamConfig::default()))
                    }
                }
                "adam_bf16" | "adamw_bf16" | "adamw_sr" | "adamw_sr_f32state" => {
                    half_step(name, a, g(), &par, simd)
                }
                "clip_adamw" => {
                    let mut o = AdamW::new(&a, g(), AdamWConfig::default())
                        .unwrap()
                        .with_parallelism(par.clone())
                        .with_simd_level(simd);
                    runs = (0..o.num_groups())
                        .map(|i| o.group_params(i).unwrap().len())
                        .sum();
                    Box::new(move || {
                        o.step_with_options(
                            &mut a,
                            optarena::StepOptions::new().clipped(ClipNorm::l2(1.0)),
                        )
                        .unwrap();
                    })
                }
                other => panic!("unknown optimizer {other}"),
            }
        }
    };
    // Warm-up: creates state and touches every page.
    for _ in 0..3.min(steps) {
        realistic::busy_work(idle);
        step();
    }
    let mut cpu = Vec::with_capacity(steps);
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            realistic::busy_work(idle);
            let c = thread_cpu_seconds();
            let t = Instant::now();
            step();
            let wall = t.elapsed().as_secs_f64();
            cpu.push(thread_cpu_seconds() - c);
            wall
        })
        .collect();
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "{{\"impl\": \"optarena\", \"optimizer\": \"{name}\", \"layout\": \"{layout}\", \"elements\": {total}, \"threads\": {threads}, \"steps\": {steps}, \"groups\": \"{}\", \"runs\": {runs}, \"grads\": \"{}\", \"idle_us\": {}, \"median_s\": {median:e}, \"p99_s\": {p99:e}, \"min_s\": {:e}, \"thread_cpu_median_s\": {:e}}}",
        if decay_groups { "decay" } else { "all" },
        grads.name(),
        idle.as_micros(),
        times[0],
        cpu[cpu.len() / 2]
    );
}
