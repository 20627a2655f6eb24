//! The cost of one scheduler step (`sched.step(&mut opt)`, all-or-nothing: the scheduler's
//! state is set aside before the step and put back if it fails), for a few schedulers on an
//! SGD optimizer of 8 param groups. `cargo run --release --example scheduler_step`.

use std::time::Instant;

use optarena::schedule::{
    CosineAnnealingLR, CosineAnnealingLRConfig, LinearLR, LinearLRConfig, LrScheduler, OneCycleLR,
    OneCycleLRConfig, SequentialLR, SequentialLRConfig, StepLR, StepLRConfig,
};
use optarena::{ArenaBuilder, ParamGroup, SGDConfig, SGD};

const GROUPS: usize = 8;
const STEPS: usize = 200_000;

fn optimizer() -> SGD<f32> {
    let mut b = ArenaBuilder::<f32>::new();
    let handles: Vec<_> = (0..GROUPS)
        .map(|i| b.zeros(&format!("p{i}"), &[4]).unwrap())
        .collect();
    let arena = b.build();
    let mut config = SGDConfig::default();
    config.lr = 0.1;
    config.momentum = 0.9;
    SGD::new(
        &arena,
        handles.iter().map(|h| ParamGroup::new([*h])),
        config,
    )
    .unwrap()
}

/// Median over 5 rounds of the time per `step`, in nanoseconds.
fn time(name: &str, make: impl Fn(&mut SGD<f32>) -> Box<dyn LrScheduler>) {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let mut opt = optimizer();
        let mut s = make(&mut opt);
        let t = Instant::now();
        for _ in 0..STEPS {
            s.step(&mut opt).unwrap();
        }
        rounds.push(t.elapsed().as_secs_f64() * 1e9 / STEPS as f64);
        std::hint::black_box(s.get_last_lr());
    }
    rounds.sort_by(f64::total_cmp);
    println!("{name:<28} {:>8.1} ns/step", rounds[2]);
}

fn main() {
    println!("{GROUPS} param groups, {STEPS} steps, median of 5 rounds");
    time("StepLR", |o| {
        Box::new(StepLR::new(o, StepLRConfig::new(1000)).unwrap())
    });
    time("CosineAnnealingLR", |o| {
        Box::new(CosineAnnealingLR::new(o, CosineAnnealingLRConfig::new(STEPS as i64)).unwrap())
    });
    time("OneCycleLR (cycles momentum)", |o| {
        Box::new(OneCycleLR::new(o, OneCycleLRConfig::new(1.0, STEPS as i64 + 10)).unwrap())
    });
    time("SequentialLR(Linear, Cosine)", |o| {
        let a = LinearLR::new(o, LinearLRConfig::default()).unwrap();
        let b = CosineAnnealingLR::new(o, CosineAnnealingLRConfig::new(STEPS as i64)).unwrap();
        Box::new(
            SequentialLR::new(
                o,
                vec![Box::new(a), Box::new(b)],
                SequentialLRConfig::new(vec![5]),
            )
            .unwrap(),
        )
    });
}
