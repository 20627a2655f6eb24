//! The subnormal modes of a step (`Subnormals::Flush`, the default, and `Subnormals::Preserve`):
//! fused and reference kernels agree bit for bit in each, results do not depend on the thread
//! count or on whether the step ran inline, the caller's floating-point environment is left as
//! it was, and torch's subnormal-range fixture passes in both modes.

mod common;

use std::sync::Arc;

use common::*;
use optarena::optim::*;
use optarena::{
    Algorithm, Arena, ArenaBuilder, Float, HyperValue, Hyperparams, Optimizer, Parallelism,
    ParamGroup, Subnormals,
};

/// `x * y` at run time (kept from constant folding).
fn product(x: f32, y: f32) -> f32 {
    std::hint::black_box(x) * std::hint::black_box(y)
}

/// Tiny values: a mix of normal numbers near 2^-66 (whose squares are subnormal), subnormal
/// numbers, zeros and a few of ordinary size, as a trained model's gradients can be.
fn tiny_values<T: Float>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let x = rng.next_f64();
            T::from_f64(match i % 5 {
                0 => x * 2f64.powi(-66),
                1 => x * 1e-39,
                2 => 0.0,
                3 => x * 2f64.powi(-60),
                _ => x * 1e-3,
            })
        })
        .collect()
}

fn arena<T: Float>(n: usize) -> Arena<T> {
    let mut b = ArenaBuilder::<T>::new();
    b.param("w", &[n / 2, 2], &tiny_values::<T>(n, 1)).unwrap();
    b.param("b", &[7], &tiny_values::<T>(7, 2)).unwrap();
    b.build()
}

fn set_grads<T: Float>(arena: &mut Arena<T>, t: u64) {
    let n = arena.grads_mut().len();
    let g = tiny_values::<T>(n, 100 + t);
    arena.grads_mut().copy_from_slice(&g);
}

/// Bits of every parameter and state buffer, for bitwise comparisons.
fn snapshot<T: Float, A: Algorithm>(opt: &Optimizer<T, A>, arena: &Arena<T>) -> Vec<u64> {
    let mut bits: Vec<u64> = arena
        .params()
        .iter()
        .map(|x| x.to_f64().to_bits())
        .collect();
    let json = opt.state_dict_json().unwrap();
    bits.extend(json.bytes().map(u64::from));
    bits
}

/// Runs 6 steps; `how` picks fused on a given parallelism (with a threshold) or reference.
fn run<T: Float, A: Algorithm>(
    config: &A::Config,
    subnormals: Subnormals,
    how: Option<(Parallelism, usize)>,
) -> Vec<u64> {
    let mut arena = arena::<T>(2 * 40_000);
    let mut opt = Optimizer::<T, A>::new(&arena, [ParamGroup::all()], config.clone())
        .unwrap()
        .with_subnormals(subnormals);
    for t in 1..=6 {
        set_grads(&mut arena, t);
        match &how {
            Some((parallelism, threshold)) => {
                opt.set_parallelism(parallelism.clone());
                opt.set_parallel_threshold(*threshold);
                opt.step(&mut arena).unwrap();
            }
            None => opt.step_reference(&mut arena).unwrap(),
        }
        // The caller's environment is untouched after every step: gradual underflow works.
        assert!(
            product(1e-20, 1e-20) > 0.0,
            "{} left the thread flushing",
            A::NAME
        );
    }
    snapshot(&opt, &arena)
}

fn pool(threads: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap(),
    ))
}

fn check<T: Float, A: Algorithm>(variants: &[&[(&str, HyperValue)]]) {
    let mut configs = vec![A::Config::default()];
    for v in variants {
        let mut c = A::Config::default();
        for (k, x) in *v {
            c.set(k, x).unwrap();
        }
        configs.push(c);
    }
    for config in &configs {
        let mut by_mode = Vec::new();
        for mode in [Subnormals::Flush, Subnormals::Preserve] {
            let reference = run::<T, A>(config, mode, None);
            let inline = run::<T, A>(config, mode, Some((Parallelism::Sequential, 0)));
            let pooled = run::<T, A>(config, mode, Some((pool(2), 0)));
            let pooled3 = run::<T, A>(config, mode, Some((pool(3), 0)));
            let default = run::<T, A>(config, mode, Some((Parallelism::Global, usize::MAX)));
            let what = format!("{} {config:?} {mode:?} {}", A::NAME, T::DTYPE);
            assert!(inline == reference, "{what}: fused differs from reference");
            assert!(
                pooled == inline,
                "{what}: 2 pool threads differ from inline"
            );
            assert!(
                pooled3 == inline,
                "{what}: 3 pool threads differ from inline"
            );
            assert!(default == inline, "{what}: threshold path differs");
            by_mode.push(inline);
        }
        // Not a test of the modes' difference in general, only that the flag reaches the
        // kernels for the Adam family (whose squares of these gradients are subnormal).
        if A::NAME == "Adam" && T::DTYPE == "float32" {
            assert_ne!(
                by_mode[0], by_mode[1],
                "Flush and Preserve gave the same bits"
            );
        }
    }
}

macro_rules! subnormal_tests {
    ($($name:ident: $alg:ty => [$($variant:expr),* $(,)?];)*) => {$(
        #[test]
        fn $name() {
            let variants: &[&[(&str, HyperValue)]] = &[$($variant),*];
            check::<f32, $alg>(variants);
            check::<f64, $alg>(variants);
        }
    )*};
}

subnormal_tests! {
    sgd: SGDAlgorithm => [
        &[("momentum", 0.9.into()), ("nesterov", true.into()), ("weight_decay", 0.1.into())],
    ];
    adam: AdamAlgorithm => [&[("amsgrad", true.into()), ("weight_decay", 0.1.into())]];
    adamw: AdamWAlgorithm => [];
    radam: RAdamAlgorithm => [];
    nadam: NAdamAlgorithm => [];
    adamax: AdamaxAlgorithm => [];
    adagrad: AdagradAlgorithm => [&[("lr_decay", 0.01.into())]];
    adadelta: AdadeltaAlgorithm => [];
    rmsprop: RMSpropAlgorithm => [&[("centered", true.into()), ("momentum", 0.9.into())]];
    rprop: RpropAlgorithm => [];
    asgd: ASGDAlgorithm => [];
    adafactor: AdafactorAlgorithm => [];
}

#[test]
fn flush_zeroes_the_subnormal_second_moments_that_preserve_keeps() {
    let mut second_moments = Vec::new();
    for mode in [Subnormals::Flush, Subnormals::Preserve] {
        let mut a = arena::<f32>(1000);
        let w = a.find("w").unwrap();
        set_grads(&mut a, 1);
        let mut opt = Adam::new(&a, [ParamGroup::all()], AdamConfig::default())
            .unwrap()
            .with_subnormals(mode);
        opt.step(&mut a).unwrap();
        second_moments.push(opt.buffer(w, "exp_avg_sq").unwrap().to_vec());
    }
    let subnormal = |x: f32| x != 0.0 && x.abs() < f32::MIN_POSITIVE;
    let kept = second_moments[1].iter().filter(|&&x| subnormal(x)).count();
    assert!(kept > 100, "Preserve kept only {kept} subnormal values");
    assert!(
        !second_moments[0].iter().any(|&x| subnormal(x)),
        "Flush left a subnormal value"
    );
}

#[test]
fn torch_subnormal_fixture_reaches_the_range_and_passes_both_modes_at_scaled_tolerance() {
    let path = fixtures_dir().join("elementwise_subnormal.json");
    let cases = load_cases(&path);
    assert!(cases.len() >= 12, "{} cases", cases.len());
    for case in &cases {
        for mode in [Subnormals::Preserve, Subnormals::Flush] {
            // SCHEMA.md's tolerance with its absolute term scaled to each tensor's magnitude:
            // unscaled, it would hide values this small.
            let outcome = run_elementwise_case_in(case, Parallelism::Sequential, mode, true);
            assert!(
                matches!(outcome, Outcome::Pass),
                "{}: {outcome:?}",
                case["name"]
            );
        }
    }
    // The fixture does drive state into the subnormal range: torch's first Adam step keeps
    // (1 - beta2) * g^2, and for these gradients that is below f32's smallest normal number.
    let adam = cases
        .iter()
        .find(|c| c["optimizer"] == "Adam" && c["dtype"] == "float32")
        .unwrap();
    let n: usize = 35 + 5 + 33;
    let g = hashed(adam["seed"].as_u64().unwrap(), 1, n);
    let scale = adam["grad_scale"].as_f64().unwrap();
    let subnormal = g
        .iter()
        .map(|x| (0.001f32 * (x * scale) as f32 * (x * scale) as f32).abs())
        .filter(|&v| v != 0.0 && v < f32::MIN_POSITIVE)
        .count();
    assert!(subnormal > n / 2, "only {subnormal} of {n} subnormal");
}
