//! Every fused SIMD kernel against its scalar reference, bit for bit, at every length from 0
//! to 67 and at unaligned offsets, in f32 and f64.

mod common;

use common::Rng;
use optarena::optim::*;
use optarena::{Algorithm, Float, Hyperparams, KernelArgs, ParamScalars, SimdLevel};

/// The instruction-set levels this CPU has (each test runs every one of them; the level is a
/// value in the kernel arguments, so parallel tests cannot interfere).
fn levels() -> Vec<SimdLevel> {
    let levels: Vec<SimdLevel> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .collect();
    // Every level the CPU has is really run at: a cap resolves to itself.
    for &l in &levels {
        assert_eq!(l.resolve(), l);
    }
    levels
}

/// Checks every instruction-set level this CPU has: each must equal the reference bit for bit.
fn check<T: Float, A: Algorithm>(configs: &[A::Config]) {
    for level in levels() {
        check_level::<T, A>(configs, level);
    }
}

fn check_level<T: Float, A: Algorithm>(configs: &[A::Config], level: SimdLevel) {
    let n_buf_max = 4;
    let mut rng = Rng(7);
    for config in configs {
        for step in [1u64, 2, 7, 40] {
            let mut scalars = A::init_scalars(config);
            for earlier in 1..step {
                A::prepare(config, earlier, &mut scalars);
            }
            let coeffs = A::prepare(config, step, &mut scalars);
            let n_bufs = A::buffers(config).len();
            assert!(n_bufs <= n_buf_max);
            for fresh in [false, true] {
                for grad_scale in [1.0, 0.37] {
                    let args = KernelArgs {
                        coeffs,
                        fresh,
                        grad_scale,
                        simd: level,
                    };
                    for len in 0..=67usize {
                        for offset in [0usize, 1, 3] {
                            let total = len + offset;
                            let p0: Vec<T> = rng.vec(total, 2.0);
                            let g: Vec<T> = rng.vec(total, 2.0);
                            // State buffers start non-negative: valid for every algorithm
                            // (second moments, step sizes, accumulators).
                            let b0: Vec<Vec<T>> = (0..n_bufs)
                                .map(|_| {
                                    rng.vec::<T>(total, 1.0)
                                        .into_iter()
                                        .map(|x| if x < T::ZERO { -x } else { x })
                                        .collect()
                                })
                                .collect();
                            let (mut p1, mut p2) = (p0.clone(), p0.clone());
                            let (mut b1, mut b2) = (b0.clone(), b0.clone());
                            {
                                let mut s1: Vec<&mut [T]> =
                                    b1.iter_mut().map(|b| &mut b[offset..]).collect();
                                A::fused(&args, &mut p1[offset..], &g[offset..], &mut s1);
                                let mut s2: Vec<&mut [T]> =
                                    b2.iter_mut().map(|b| &mut b[offset..]).collect();
                                A::reference(&args, &mut p2[offset..], &g[offset..], &mut s2);
                            }
                            let same = |a: &[T], b: &[T]| {
                                a.iter().zip(b).all(|(x, y)| {
                                    x.to_f64().to_bits() == y.to_f64().to_bits()
                                        || (x.to_f64().is_nan() && y.to_f64().is_nan())
                                })
                            };
                            assert!(
                                same(&p1, &p2),
                                "{} {:?} {level:?} step {step} fresh {fresh} len {len} offset {offset}: params differ\nfused {p1:?}\nref   {p2:?}",
                                A::NAME, config
                            );
                            for k in 0..n_bufs {
                                assert!(
                                    same(&b1[k], &b2[k]),
                                    "{} {:?} {level:?}: buffer {} differs at len {len} offset {offset}",
                                    A::NAME,
                                    config,
                                    A::buffers(config)[k]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = <A::Scalars as ParamScalars>::NAMES;
}

fn configs<C: Hyperparams>(variants: &[&[(&str, optarena::HyperValue)]]) -> Vec<C> {
    variants
        .iter()
        .map(|v| {
            let mut c = C::default();
            for (k, val) in v.iter() {
                c.set(k, val).unwrap();
            }
            c.validate().unwrap();
            c
        })
        .collect()
}

macro_rules! kernel_test {
    ($name:ident, $alg:ty, $cfg:ty, [$($variant:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            use optarena::HyperValue::*;
            let cs = configs::<$cfg>(&[$($variant),*]);
            check::<f32, $alg>(&cs);
            check::<f64, $alg>(&cs);
        }
    };
}

kernel_test!(
    sgd,
    SGDAlgorithm,
    SGDConfig,
    [
        &[],
        &[("momentum", Number(0.9)), ("weight_decay", Number(0.01))],
        &[
            ("momentum", Number(0.9)),
            ("dampening", Number(0.3)),
            ("maximize", Bool(true))
        ],
        &[
            ("momentum", Number(0.8)),
            ("nesterov", Bool(true)),
            ("weight_decay", Number(0.1))
        ],
    ]
);

kernel_test!(
    adam,
    AdamAlgorithm,
    AdamConfig,
    [
        &[],
        &[("weight_decay", Number(0.1)), ("maximize", Bool(true))],
        &[
            ("amsgrad", Bool(true)),
            ("weight_decay", Number(0.1)),
            ("decoupled_weight_decay", Bool(true))
        ],
        &[("betas", Pair(0.3, 0.6)), ("eps", Number(1e-3))],
    ]
);

kernel_test!(
    adamw,
    AdamWAlgorithm,
    AdamWConfig,
    [&[], &[("amsgrad", Bool(true)), ("maximize", Bool(true))],]
);

kernel_test!(
    radam,
    RAdamAlgorithm,
    RAdamConfig,
    [
        &[],
        &[("weight_decay", Number(0.1))],
        &[
            ("weight_decay", Number(0.1)),
            ("decoupled_weight_decay", Bool(true)),
            ("maximize", Bool(true))
        ],
        &[("betas", Pair(0.5, 0.7))],
    ]
);

kernel_test!(
    nadam,
    NAdamAlgorithm,
    NAdamConfig,
    [
        &[],
        &[("weight_decay", Number(0.1)), ("maximize", Bool(true))],
        &[
            ("weight_decay", Number(0.1)),
            ("decoupled_weight_decay", Bool(true)),
            ("momentum_decay", Number(0.006))
        ],
        &[("betas", Pair(0.5, 0.7)), ("eps", Number(1e-3))],
    ]
);

kernel_test!(
    adamax,
    AdamaxAlgorithm,
    AdamaxConfig,
    [
        &[],
        &[("weight_decay", Number(0.1)), ("maximize", Bool(true))],
        &[("betas", Pair(0.8, 0.95)), ("eps", Number(1e-4))],
    ]
);

kernel_test!(
    adagrad,
    AdagradAlgorithm,
    AdagradConfig,
    [
        &[],
        &[("lr_decay", Number(0.5)), ("weight_decay", Number(0.1))],
        &[
            ("initial_accumulator_value", Number(0.5)),
            ("eps", Number(1e-6)),
            ("maximize", Bool(true))
        ],
    ]
);

kernel_test!(
    adadelta,
    AdadeltaAlgorithm,
    AdadeltaConfig,
    [
        &[],
        &[("weight_decay", Number(0.1)), ("maximize", Bool(true))],
        &[
            ("rho", Number(0.8)),
            ("eps", Number(1e-4)),
            ("lr", Number(0.5))
        ],
    ]
);

kernel_test!(
    rmsprop,
    RMSpropAlgorithm,
    RMSpropConfig,
    [
        &[],
        &[("weight_decay", Number(0.1)), ("maximize", Bool(true))],
        &[("momentum", Number(0.9))],
        &[("centered", Bool(true)), ("alpha", Number(0.9))],
        // 1 - alpha > 0.5: lerp's other formula.
        &[
            ("centered", Bool(true)),
            ("momentum", Number(0.5)),
            ("alpha", Number(0.3)),
            ("eps", Number(1e-3)),
            ("weight_decay", Number(0.01))
        ],
    ]
);

kernel_test!(
    rprop,
    RpropAlgorithm,
    RpropConfig,
    [
        &[],
        &[("maximize", Bool(true)), ("etas", Pair(0.3, 1.5))],
        &[("step_sizes", Pair(0.05, 0.5)), ("lr", Number(0.1))],
        // etaminus rounds to 1.0 in f32: torch then also zeroes the gradient where the
        // product's sign was 0.
        &[("etas", Pair(0.999_999_99, 1.2))],
    ]
);

kernel_test!(
    asgd,
    ASGDAlgorithm,
    ASGDConfig,
    [
        &[],
        &[("t0", Number(3.0)), ("lambd", Number(0.01))],
        &[
            ("t0", Number(0.0)),
            ("weight_decay", Number(0.1)),
            ("maximize", Bool(true)),
            ("alpha", Number(0.5)),
            ("lr", Number(0.1))
        ],
    ]
);

// ---- Adafactor: per-parameter kernels, which take a whole parameter and its shape ----

/// Shapes that reach every path: scalars and vectors (unfactored), rows shorter and longer
/// than a vector (gathered factors across row ends, the norm's remainder), one row or one
/// column, batches, many column blocks, long columns (the cascade sum's levels), and empty
/// parameters.
const ADAFACTOR_SHAPES: &[&[usize]] = &[
    &[],
    &[1],
    &[5],
    &[8],
    &[17],
    &[67],
    &[1, 1],
    &[6, 1],
    &[1, 6],
    &[7, 5],
    &[3, 4, 2],
    &[2, 1, 3],
    &[4, 3, 5],
    &[2, 3, 4, 5],
    &[9, 8],
    &[3, 16],
    &[5, 300],
    &[2, 3, 129],
    &[300, 3],
    &[40, 9],
    &[33, 1],
    &[0, 3],
    &[4, 0],
    &[0],
];

fn check_adafactor<T: Float>(configs: &[AdafactorConfig], level: SimdLevel) {
    let mut rng = Rng(11);
    for config in configs {
        for step in [1u64, 2, 7, 40] {
            let coeffs = AdafactorAlgorithm::prepare(config, step, &mut ());
            for grad_scale in [1.0, 0.37] {
                let args = KernelArgs {
                    coeffs,
                    fresh: step == 1,
                    grad_scale,
                    simd: level,
                };
                for shape in ADAFACTOR_SHAPES {
                    let n: usize = shape.iter().product();
                    let p0: Vec<T> = rng.vec(n, 2.0);
                    let mut g: Vec<T> = rng.vec(n, 2.0);
                    // Exact zeros happen (ReLU layers): a zero row or column factor.
                    for x in g.iter_mut().skip(3).step_by(7) {
                        *x = T::ZERO;
                    }
                    let names = AdafactorAlgorithm::aux_buffers(shape);
                    let aux0: Vec<Vec<T>> = (0..names.len())
                        .map(|k| {
                            let len = AdafactorAlgorithm::aux_len(shape, k);
                            if step == 1 {
                                vec![T::ZERO; len]
                            } else {
                                rng.vec::<T>(len, 1.0)
                                    .into_iter()
                                    .map(|x| if x < T::ZERO { -x } else { x })
                                    .collect()
                            }
                        })
                        .collect();
                    let (mut p1, mut p2) = (p0.clone(), p0.clone());
                    let (mut a1, mut a2) = (aux0.clone(), aux0.clone());
                    {
                        let mut s1: Vec<&mut [T]> = a1.iter_mut().map(|b| &mut b[..]).collect();
                        AdafactorAlgorithm::fused_param(
                            &args,
                            shape,
                            &mut p1,
                            &g,
                            &mut [],
                            &mut s1,
                        );
                        let mut s2: Vec<&mut [T]> = a2.iter_mut().map(|b| &mut b[..]).collect();
                        AdafactorAlgorithm::reference_param(
                            &args,
                            shape,
                            &mut p2,
                            &g,
                            &mut [],
                            &mut s2,
                        );
                    }
                    let bits =
                        |v: &[T]| -> Vec<u64> { v.iter().map(|x| x.to_f64().to_bits()).collect() };
                    let what = format!(
                        "{config:?} {level:?} step {step} scale {grad_scale} shape {shape:?}"
                    );
                    assert_eq!(bits(&p1), bits(&p2), "{what}: params differ");
                    for k in 0..names.len() {
                        assert_eq!(bits(&a1[k]), bits(&a2[k]), "{what}: {} differs", names[k]);
                    }
                    if n > 0 {
                        assert_ne!(bits(&p1), bits(&p0), "{what}: nothing changed");
                        assert!(p1.iter().all(|x| x.to_f64().is_finite()), "{what}: {p1:?}");
                    }
                    // The elementwise entry points update a whole vector with `[variance]`.
                    if shape.len() <= 1 {
                        let (mut p3, mut p4) = (p0.clone(), p0.clone());
                        let (mut v3, mut v4) = (aux0[0].clone(), aux0[0].clone());
                        AdafactorAlgorithm::fused(&args, &mut p3, &g, &mut [&mut v3[..]]);
                        AdafactorAlgorithm::reference(&args, &mut p4, &g, &mut [&mut v4[..]]);
                        assert_eq!(bits(&p3), bits(&p1), "{what}: fused entry");
                        assert_eq!(bits(&p4), bits(&p1), "{what}: reference entry");
                        assert_eq!(bits(&v3), bits(&a1[0]), "{what}: fused entry variance");
                        assert_eq!(bits(&v4), bits(&a1[0]), "{what}: reference entry variance");
                    }
                }
            }
        }
    }
}

#[test]
fn adafactor() {
    use optarena::HyperValue::*;
    let cs = configs::<AdafactorConfig>(&[
        &[],
        &[("weight_decay", Number(0.1)), ("maximize", Bool(true))],
        &[("eps", OptPair(Some(1e-15), 1e-3)), ("d", Number(1.5))],
        &[
            ("eps", OptPair(Option::None, 0.01)),
            ("beta2_decay", Number(-0.5)),
            ("lr", Number(0.05)),
        ],
        // A large eps1 clamps most of the variance estimate; d = inf never clips.
        &[
            ("eps", OptPair(Some(0.3), 1e-3)),
            ("d", Number(f64::INFINITY)),
        ],
    ]);
    for level in levels() {
        check_adafactor::<f32>(&cs, level);
        check_adafactor::<f64>(&cs, level);
    }
}
