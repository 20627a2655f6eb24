//! How close an optimizer step comes to the roofline (the fastest loop moving the same bytes;
//! see `optarena::roofline`), measured so that a shared, noisy machine does not skew the
//! answer: each timed step is paired with a roofline pass right before it, and the median of
//! the per-pair ratios is printed (one JSON line).
//!
//! ```sh
//! cargo run --release --example roofline_ratio -- adam 33554432 2 30
//! OPTARENA_SIMD=avx2 cargo run --release --example roofline_ratio -- adam 33554432 2 30
//! ```
//! With one thread, pairs are timed in CPU time of the calling thread (which runs the whole
//! step and pass), so other processes on a shared machine do not enter the ratio.
//!
//! Arguments: optimizer (`adam`, `adamw`, `radam`, `nadam`, `sgd_momentum`, `adagrad`),
//! elements, threads, timed pairs. `OPTARENA_SIMD` (`portable`, `avx2`, `avx512`) caps the
//! optimizer's instruction set; the roofline always uses its fastest strategy.

use std::time::Instant;

use optarena::optim::*;
use optarena::roofline::Roofline;
use optarena::{ArenaBuilder, Parallelism, ParamGroup, SimdLevel};

#[path = "../benches/benchmarks/cpu_time.rs"]
mod cpu_time;
use cpu_time::thread_cpu_seconds;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        eprintln!("usage: roofline_ratio <optimizer> <elements> <threads> <pairs>");
        std::process::exit(2);
    }
    let name = args[0].as_str();
    let n: usize = args[1].parse().expect("elements");
    let threads: usize = args[2].parse().expect("threads");
    let pairs: usize = args[3].parse().expect("pairs");
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
        Ok(other) => panic!("unknown OPTARENA_SIMD {other}"),
        Err(_) => SimdLevel::Best,
    };
    let mut b = ArenaBuilder::<f32>::new();
    b.param_with("w", &[n], |i| ((i % 1000) as f32 * 1e-3).sin())
        .unwrap();
    let mut a = b.build();
    a.grads_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, g)| *g = ((i % 777) as f32 * 3e-3).cos() * 1e-2);
    let g = || [ParamGroup::all()];
    macro_rules! opt {
        ($o:expr) => {{
            let mut o = $o
                .unwrap()
                .with_parallelism(par.clone())
                .with_simd_level(simd);
            let f: Box<dyn FnMut(&mut optarena::Arena<f32>)> =
                Box::new(move |a| o.step(a).unwrap());
            f
        }};
    }
    let (reads, mut step) = match name {
        "adam" => (4, opt!(Adam::new(&a, g(), AdamConfig::default()))),
        "adamw" => (4, opt!(AdamW::new(&a, g(), AdamWConfig::default()))),
        "radam" => (4, opt!(RAdam::new(&a, g(), RAdamConfig::default()))),
        "nadam" => (4, opt!(NAdam::new(&a, g(), NAdamConfig::default()))),
        "adagrad" => (3, opt!(Adagrad::new(&a, g(), AdagradConfig::default()))),
        "sgd_momentum" => (
            3,
            opt!(SGD::new(&a, g(), SGDConfig::default().with_momentum(0.9))),
        ),
        other => panic!("unknown optimizer {other}"),
    };
    let mut roof = Roofline::<f32>::new(n, reads).unwrap();
    let strategy = roof.calibrate(&par, 5);
    for (s, t) in roof.timings() {
        eprintln!(
            "roofline {:?} piece {:?} prefetch {}: {:.2} ms",
            s.simd,
            s.piece,
            s.prefetch,
            t * 1e3
        );
    }
    for _ in 0..3 {
        step(&mut a);
        roof.run(&par);
    }
    let (mut ts, mut tr, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    // With one thread everything runs on this one, and its CPU time leaves out the periods
    // other processes held the core: the stable measure on a shared machine.
    let clock = |f: &mut dyn FnMut()| {
        if threads <= 1 {
            let c = thread_cpu_seconds();
            f();
            thread_cpu_seconds() - c
        } else {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        }
    };
    for _ in 0..pairs {
        let r = clock(&mut || roof.run(&par));
        let s = clock(&mut || step(&mut a));
        tr.push(r);
        ts.push(s);
        ratio.push(r / s);
    }
    println!(
        "{{\"optimizer\": \"{name}\", \"simd\": \"{simd:?}\", \"elements\": {n}, \"threads\": {threads}, \"pairs\": {pairs}, \"step_median_s\": {:e}, \"roofline_median_s\": {:e}, \"roofline_over_step\": {:.4}, \"strategy\": \"{strategy:?}\"}}",
        median(&mut ts),
        median(&mut tr),
        median(&mut ratio)
    );
}
