//! Mixed precision (issue 15, mode 2): the half-precision conversions at every SIMD level
//! against `half` and torch, and `Optimizer::step_mixed` against the f32 step fed the widened
//! gradients, bit for bit, for every elementwise algorithm, level and thread count; bf16 state
//! against a reference that rounds the state after each update; f16 gradients with a scaler.

mod common;

use std::sync::Arc;

use common::Rng;
use half::{bf16, f16};
use optarena::mixed::{bf16_bits_from_f32, narrow_in, widen_in, HalfBuffer, Storage};
use optarena::optim::*;
use optarena::{
    Algorithm, Arena, ArenaBuilder, ClipNorm, Error, GradScaler, Hyperparams, KernelArgs, NormType,
    Optimizer, Parallelism, Param, ParamGroup, SimdLevel, StatePrecision, StepOptions, StepOutcome,
    Subnormals,
};

/// The instruction-set levels this CPU has.
fn levels() -> Vec<SimdLevel> {
    let levels: Vec<SimdLevel> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .collect();
    for &l in &levels {
        assert_eq!(l.resolve(), l);
    }
    levels
}

fn both_modes() -> [Subnormals; 2] {
    [Subnormals::Preserve, Subnormals::Flush]
}

/// bf16 rounding of `x` to nearest even as a step under `mode` stores it: torch's
/// `round_to_nearest_even` (NaN as `0x7FC0`), except that on x86-64 a flushed step reads a
/// subnormal `x` as a zero of its sign, as its arithmetic does.
fn bf16_bits_in(mode: Subnormals, x: f32) -> u16 {
    let flushes = cfg!(target_arch = "x86_64") && mode == Subnormals::Flush;
    if flushes && x.is_subnormal() {
        (x.to_bits() >> 16) as u16 & 0x8000
    } else if x.is_nan() {
        0x7FC0
    } else {
        bf16::from_f32(x).to_bits()
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// Every bf16 and f16 value widens exactly at every level and in both subnormal modes (the
/// length 65536 + 5 also exercises the scalar tail): f16 as `half` widens it, bf16 as torch
/// does (a shift).
#[test]
fn widening_is_exact_for_all_half_values() {
    let all: Vec<u16> = (0..=u16::MAX).chain(0..5).collect();
    let bf: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
    let hf: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
    for level in levels() {
        for mode in both_modes() {
            let mut out = vec![0.0f32; all.len()];
            widen_in(level, mode, &bf, &mut out).unwrap();
            for (x, y) in bf.iter().zip(&out) {
                // torch's `c10::BFloat16` -> float: a shift, signalling NaNs included (`half`
                // quietens those; every other value it widens the same).
                let want = (x.to_bits() as u32) << 16;
                if !x.is_nan() {
                    assert_eq!(x.to_f32().to_bits(), want);
                }
                assert_eq!(
                    y.to_bits(),
                    want,
                    "bf16 {:#06x} {level:?} {mode:?}",
                    x.to_bits()
                );
            }
            widen_in(level, mode, &hf, &mut out).unwrap();
            for (x, y) in hf.iter().zip(&out) {
                assert_eq!(
                    x.to_f32().to_bits(),
                    y.to_bits(),
                    "f16 {:#06x} {level:?} {mode:?}",
                    x.to_bits()
                );
            }
        }
    }
}

/// Edge-case f32 bit patterns (zeros, subnormals, ties, overflow, infinities, NaNs) plus
/// random ones.
fn f32_cases() -> Vec<f32> {
    let mut bits: Vec<u32> = Vec::new();
    for sign in [0u32, 0x8000_0000] {
        for b in [
            0u32,
            1,
            0x7FFF,
            0x8000,
            0x8001,
            0x1_8000,
            0x7F_7FFF,
            0x7F_8000,
            0x7F_FFFF,
            0x80_0000,
            0x80_8000,
            0x81_8000,
            0x3F80_0000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_7FFF,
            0x3F81_7FFF,
            0x477F_F000,
            0x477F_EFFF,
            0x3380_0000,
            0x3380_0001,
            0x3300_0001,
            0x7F7F_7FFF,
            0x7F7F_8000,
            0x7F7F_FFFF,
            0x7F80_0000,
            0x7F80_0001,
            0x7FA0_0000,
            0x7FBF_FFFF,
            0x7FC0_0000,
            0x7FFF_FFFF,
        ] {
            bits.push(sign | b);
        }
    }
    let mut s = 0x1234_5678_u64;
    for _ in 0..200_000 {
        s = common::splitmix64(s);
        bits.push(s as u32);
        // Many values near each tie: random high part, low 16 bits around 0x8000.
        bits.push((s >> 32) as u32 & 0xFFFF_0000 | (0x7FFE + (s & 3) as u32));
    }
    bits.into_iter().map(f32::from_bits).collect()
}

/// Rounding to bf16 equals `half::bf16::from_f32` (torch's `round_to_nearest_even`) on every
/// non-NaN value and gives torch's `0x7FC0` for NaN, at every level (including the AVX-512 BF16
/// instruction), in both subnormal modes, except that a flushed step reads subnormals as zero
/// at every level (`bf16_bits_in`); f16 equals `half::f16::from_f32` everywhere.
#[test]
fn rounding_matches_half_at_every_level() {
    let xs = f32_cases();
    assert!(xs.iter().filter(|x| x.is_subnormal()).count() > 100);
    for level in levels() {
        for mode in both_modes() {
            let mut bf = vec![bf16::ZERO; xs.len()];
            narrow_in(level, mode, &xs, &mut bf).unwrap();
            for (x, y) in xs.iter().zip(&bf) {
                let want = bf16_bits_in(mode, *x);
                assert_eq!(
                    y.to_bits(),
                    want,
                    "bf16 of {:#010x} at {level:?} {mode:?}",
                    x.to_bits()
                );
                if mode == Subnormals::Preserve {
                    assert_eq!(bf16_bits_from_f32(*x), want);
                }
            }
            let mut hf = vec![f16::ZERO; xs.len()];
            narrow_in(level, mode, &xs, &mut hf).unwrap();
            for (x, y) in xs.iter().zip(&hf) {
                assert_eq!(
                    y.to_bits(),
                    f16::from_f32(*x).to_bits(),
                    "f16 of {:#010x} at {level:?} {mode:?}",
                    x.to_bits()
                );
            }
        }
    }
}

/// Rounding two lane groups at once (one `vcvtne2ps2bf16` on AVX-512 BF16, unless either group
/// holds a subnormal or NaN lane) gives each element its own bits: runs of 32 values (two
/// AVX-512 groups, four AVX2 ones) with no special lane, one in the first or second group,
/// or one in each, at every level and in both subnormal modes.
#[test]
fn rounding_two_groups_at_once_keeps_each_elements_bits() {
    let normal = |k: usize| (k as f32 * 0.731).sin() * 3.0e2 + 0.125;
    let specials = [f32::NAN, 1.0e-40, -3.0e-39, f32::from_bits(0x7F80_0001)];
    let mut xs = Vec::new();
    // Every special value in every placement.
    for run in 0..16 {
        let special = specials[run / 4];
        let mut block: Vec<f32> = (0..32).map(|k| normal(run * 32 + k)).collect();
        match run % 4 {
            0 => {}
            1 => block[5] = special,
            2 => block[16 + 9] = special,
            _ => {
                block[0] = special;
                block[31] = special;
            }
        }
        xs.extend(block);
    }
    for level in levels() {
        for mode in both_modes() {
            let mut bf = vec![bf16::ZERO; xs.len()];
            narrow_in(level, mode, &xs, &mut bf).unwrap();
            for (k, (x, y)) in xs.iter().zip(&bf).enumerate() {
                let want = bf16_bits_in(mode, *x);
                assert_eq!(
                    y.to_bits(),
                    want,
                    "element {k} ({x:e}) at {level:?} {mode:?}"
                );
            }
        }
    }
}

/// torch's own rounding (recorded by `scripts/gen_half_rounding.py`): the same bits on every
/// non-NaN value, and NaN where torch gives NaN.
#[test]
fn torch_rounding_matches() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/half_rounding_torch.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let read = |k: &str| -> Vec<u64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let xs: Vec<f32> = read("f32")
        .into_iter()
        .map(|b| f32::from_bits(b as u32))
        .collect();
    let (tb, th) = (read("bf16"), read("f16"));
    assert!(xs.len() > 4000);
    for level in levels() {
        let mut bf = vec![bf16::ZERO; xs.len()];
        narrow_in(level, Subnormals::Preserve, &xs, &mut bf).unwrap();
        let mut hf = vec![f16::ZERO; xs.len()];
        narrow_in(level, Subnormals::Preserve, &xs, &mut hf).unwrap();
        for i in 0..xs.len() {
            let x = xs[i];
            if x.is_nan() {
                assert!(bf16::from_bits(tb[i] as u16).is_nan() && bf[i].is_nan());
                assert!(f16::from_bits(th[i] as u16).is_nan() && hf[i].is_nan());
                continue;
            }
            assert_eq!(
                bf[i].to_bits() as u64,
                tb[i],
                "bf16 of {:#010x} {level:?}",
                x.to_bits()
            );
            assert_eq!(
                hf[i].to_bits() as u64,
                th[i],
                "f16 of {:#010x} {level:?}",
                x.to_bits()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mode 2
// ---------------------------------------------------------------------------------------------

/// Parameter shapes: odd sizes, one longer than two 16K chunks so three threads split it.
fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![37],
        vec![5, 13],
        vec![1000],
        vec![2 * 16 * 1024 + 77],
        vec![3],
    ]
}

fn build(seed: u64) -> (Arena<f32>, Vec<Param<f32>>) {
    let mut rng = Rng(seed);
    let mut b = ArenaBuilder::<f32>::new();
    let mut handles = Vec::new();
    for (i, s) in shapes().iter().enumerate() {
        let n: usize = s.iter().product();
        let init: Vec<f32> = rng.vec(n, 1.0);
        handles.push(b.param(&format!("p{i}"), s, &init).unwrap());
    }
    (b.build(), handles)
}

fn pool(threads: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap(),
    ))
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Half gradients for one step: random values of scale `scale`, rounded; parameter `skip` (if
/// any) has none.
fn half_grads<G: Storage>(
    arena: &Arena<f32>,
    handles: &[Param<f32>],
    rng: &mut Rng,
    scale: f64,
    skip: Option<usize>,
) -> HalfBuffer<G> {
    let mut g = HalfBuffer::<G>::gradients(arena);
    for (i, &p) in handles.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let v: Vec<f32> = rng.vec(arena.value(p).len(), scale);
        g.set_from_f32(p, &v).unwrap();
    }
    g
}

/// Runs three mixed steps on one optimizer and the same three f32 steps, on the widened
/// gradients, on another, and checks parameters, state and the copy bit for bit.
fn check_mode2<A: Algorithm, G: Storage, H: Storage>(
    config: &A::Config,
    level: SimdLevel,
    threads: usize,
    options: StepOptions,
) {
    let (mut a1, h1) = build(11);
    let (mut a2, h2) = build(11);
    let mut o1 = Optimizer::<f32, A>::new(&a1, [ParamGroup::all()], config.clone()).unwrap();
    let mut o2 = Optimizer::<f32, A>::new(&a2, [ParamGroup::all()], config.clone()).unwrap();
    for o in [&mut o1, &mut o2] {
        o.set_simd_level(level);
        o.set_parallelism(pool(threads));
        o.set_parallel_threshold(0);
    }
    let mut copy = HalfBuffer::<H>::copy_of(&a1);
    let mut rng = Rng(5);
    for step in 0..3 {
        let skip = (step == 1).then_some(2);
        let g: HalfBuffer<G> = half_grads(&a1, &h1, &mut rng, 2.0, skip);
        let before = copy.clone();
        let r1 = o1.step_mixed(&mut a1, &g, &mut copy, options).unwrap();
        // The reference: the f32 step on the widened gradients.
        for (i, &p) in h2.iter().enumerate() {
            if g.is_present(h1[i]) {
                let wide: Vec<f32> = g.value(h1[i]).iter().map(|x| x.to_f32()).collect();
                a2.set_grad(p, &wide).unwrap();
            } else {
                a2.clear_grad(p);
            }
        }
        let r2 = o2.step_with_options(&mut a2, options).unwrap();
        let what = format!(
            "{} {config:?} {level:?} threads {threads} step {step}",
            A::NAME
        );
        assert_eq!(r1, r2, "{what}: reports");
        assert_eq!(bits(a1.params()), bits(a2.params()), "{what}: params");
        for (i, (&p1, &p2)) in h1.iter().zip(&h2).enumerate() {
            for name in A::buffers(config) {
                assert_eq!(
                    o1.buffer(p1, name).map(bits),
                    o2.buffer(p2, name).map(bits),
                    "{what}: buffer {name} of p{i}"
                );
            }
            assert_eq!(o1.step_count(p1), o2.step_count(p2));
            // The copy: the rounded parameters where they stepped, the old copy elsewhere.
            let want: Vec<H> = if g.is_present(p1) {
                a1.value(p1).iter().map(|&x| H::from_f32(x)).collect()
            } else {
                before.value(p1).to_vec()
            };
            assert_eq!(copy.value(p1), &want[..], "{what}: copy of p{i}");
        }
    }
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

/// Every level, 1/2/3 threads, bf16 and f16 gradients and copies, plain, scaled and clipped.
fn check_all<A: Algorithm>(cs: &[A::Config]) {
    let plain = StepOptions::default();
    let scaled = StepOptions {
        grad_scale: 0.37,
        ..StepOptions::default()
    };
    let clipped = StepOptions {
        clip: Some(ClipNorm::l2(0.5)),
        ..StepOptions::default()
    };
    let clipped_inf = StepOptions {
        clip: Some(ClipNorm {
            max_norm: 0.3,
            norm_type: NormType::Inf,
            error_if_nonfinite: false,
        }),
        grad_scale: 0.5,
        ..StepOptions::default()
    };
    for c in cs {
        for level in levels() {
            for threads in [1, 2, 3] {
                check_mode2::<A, bf16, bf16>(c, level, threads, plain);
            }
            check_mode2::<A, f16, f16>(c, level, 2, scaled);
            check_mode2::<A, bf16, f16>(c, level, 3, clipped);
        }
        check_mode2::<A, f16, bf16>(c, SimdLevel::Best, 2, clipped_inf);
        let clipped_l1 = StepOptions {
            clip: Some(ClipNorm {
                max_norm: 2.0,
                norm_type: NormType::P(1.0),
                error_if_nonfinite: false,
            }),
            ..StepOptions::default()
        };
        check_mode2::<A, bf16, bf16>(c, SimdLevel::Best, 3, clipped_l1);
        let clipped_p3 = StepOptions {
            clip: Some(ClipNorm {
                max_norm: 1.0,
                norm_type: NormType::P(3.0),
                error_if_nonfinite: false,
            }),
            ..StepOptions::default()
        };
        check_mode2::<A, bf16, bf16>(c, SimdLevel::Best, 2, clipped_p3);
    }
}

macro_rules! mode2_test {
    ($name:ident, $alg:ty, $cfg:ty, [$($variant:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            #[allow(unused_imports)]
            use optarena::HyperValue::*;
            check_all::<$alg>(&configs::<$cfg>(&[$($variant),*]));
        }
    };
}

mode2_test!(
    mode2_sgd,
    SGDAlgorithm,
    SGDConfig,
    [
        &[],
        &[("momentum", Number(0.9)), ("weight_decay", Number(0.01))],
        &[("momentum", Number(0.8)), ("nesterov", Bool(true))],
    ]
);
mode2_test!(
    mode2_adam,
    AdamAlgorithm,
    AdamConfig,
    [
        &[],
        &[("amsgrad", Bool(true)), ("weight_decay", Number(0.1))],
    ]
);
mode2_test!(
    mode2_adamw,
    AdamWAlgorithm,
    AdamWConfig,
    [&[], &[("amsgrad", Bool(true)), ("maximize", Bool(true))]]
);
mode2_test!(
    mode2_radam,
    RAdamAlgorithm,
    RAdamConfig,
    [
        &[],
        &[
            ("decoupled_weight_decay", Bool(true)),
            ("weight_decay", Number(0.1))
        ]
    ]
);
mode2_test!(
    mode2_nadam,
    NAdamAlgorithm,
    NAdamConfig,
    [
        &[],
        &[
            ("decoupled_weight_decay", Bool(true)),
            ("weight_decay", Number(0.1))
        ]
    ]
);
mode2_test!(
    mode2_adamax,
    AdamaxAlgorithm,
    AdamaxConfig,
    [&[("weight_decay", Number(0.1))]]
);
mode2_test!(
    mode2_adagrad,
    AdagradAlgorithm,
    AdagradConfig,
    [&[
        ("initial_accumulator_value", Number(0.5)),
        ("lr_decay", Number(0.1))
    ]]
);
mode2_test!(
    mode2_adadelta,
    AdadeltaAlgorithm,
    AdadeltaConfig,
    [&[("weight_decay", Number(0.1))]]
);
mode2_test!(
    mode2_rmsprop,
    RMSpropAlgorithm,
    RMSpropConfig,
    [&[], &[("momentum", Number(0.9)), ("centered", Bool(true))],]
);
mode2_test!(
    mode2_rprop,
    RpropAlgorithm,
    RpropConfig,
    [&[("etas", Pair(0.3, 1.5))]]
);
mode2_test!(
    mode2_asgd,
    ASGDAlgorithm,
    ASGDConfig,
    [&[("t0", Number(1.0)), ("weight_decay", Number(0.01))]]
);

// ---------------------------------------------------------------------------------------------
// bf16 state
// ---------------------------------------------------------------------------------------------

/// bf16 moments: after every step the state equals the f32 scalar reference kernel's state
/// rounded to bf16, and the parameters equal the reference's (which used the unrounded state
/// of that step), at every level and thread count.
fn check_bf16_state<A: Algorithm>(config: &A::Config) {
    for level in levels() {
        for threads in [1, 3] {
            let (mut arena, handles) = build(21);
            let mut opt =
                Optimizer::<f32, A>::new(&arena, [ParamGroup::all()], config.clone()).unwrap();
            opt.set_simd_level(level);
            opt.set_parallelism(pool(threads));
            opt.set_parallel_threshold(0);
            opt.set_subnormals(Subnormals::Preserve);
            opt.set_state_precision(StatePrecision::Bf16).unwrap();
            let n_bufs = A::buffers(config).len();
            // The reference: the whole arena as one run (every parameter steps every time).
            let mut p_ref = arena.params().to_vec();
            let mut s_ref: Vec<Vec<f32>> = (0..n_bufs)
                .map(|k| {
                    let init = A::buffer_init(config, k) as f32;
                    vec![bf16::from_f32(init).to_f32(); p_ref.len()]
                })
                .collect();
            let mut scalars = A::init_scalars(config);
            let mut copy = HalfBuffer::<bf16>::copy_of(&arena);
            let mut rng = Rng(9);
            for step in 1..=4u64 {
                let g: HalfBuffer<bf16> = half_grads(&arena, &handles, &mut rng, 1.0, None);
                opt.step_mixed(&mut arena, &g, &mut copy, StepOptions::default())
                    .unwrap();
                let coeffs = A::prepare(config, step, &mut scalars);
                let args = KernelArgs {
                    coeffs,
                    fresh: step == 1,
                    grad_scale: 1.0,
                    simd: level,
                };
                let wide = g.to_f32_vec();
                {
                    let mut bufs: Vec<&mut [f32]> = s_ref.iter_mut().map(|b| &mut b[..]).collect();
                    // The optimizer preserves subnormals, as this reference does.
                    A::reference(&args, &mut p_ref, &wide, &mut bufs);
                }
                for b in &mut s_ref {
                    for x in b.iter_mut() {
                        *x = bf16::from_f32(*x).to_f32();
                    }
                }
                let what = format!(
                    "{} {config:?} {level:?} threads {threads} step {step}",
                    A::NAME
                );
                assert_eq!(bits(arena.params()), bits(&p_ref), "{what}: params");
                for &p in &handles {
                    let r = arena.info(p).range();
                    for (k, name) in A::buffers(config).iter().enumerate() {
                        let got: Vec<u32> = opt
                            .buffer_bf16(p, name)
                            .unwrap()
                            .iter()
                            .map(|x| x.to_f32().to_bits())
                            .collect();
                        assert_eq!(got, bits(&s_ref[k][r.clone()]), "{what}: {name}");
                        assert!(opt.buffer(p, name).is_none());
                    }
                }
                let want: Vec<bf16> = arena.params().iter().map(|&x| bf16::from_f32(x)).collect();
                assert_eq!(copy.as_slice(), &want[..], "{what}: copy");
            }
            // The state dict widens the bf16 state exactly.
            let sd = opt.state_dict();
            assert_eq!(sd.state.len(), handles.len());
        }
    }
}

#[test]
fn bf16_state_adam_adamw_sgd_adagrad_rmsprop() {
    use optarena::HyperValue::*;
    check_bf16_state::<AdamAlgorithm>(&configs::<AdamConfig>(&[&[]])[0]);
    check_bf16_state::<AdamWAlgorithm>(&configs::<AdamWConfig>(&[&[("amsgrad", Bool(true))]])[0]);
    check_bf16_state::<SGDAlgorithm>(&configs::<SGDConfig>(&[&[("momentum", Number(0.9))]])[0]);
    check_bf16_state::<AdagradAlgorithm>(
        &configs::<AdagradConfig>(&[&[("initial_accumulator_value", Number(0.1))]])[0],
    );
    check_bf16_state::<RMSpropAlgorithm>(
        &configs::<RMSpropConfig>(&[&[("centered", Bool(true)), ("momentum", Number(0.5))]])[0],
    );
}

// ---------------------------------------------------------------------------------------------
// f16 with a loss scaler, skipping, errors
// ---------------------------------------------------------------------------------------------

/// f16 gradients scaled by a GradScaler: the mixed step unscales inside the pass and equals
/// the f32 scaler step on the widened gradients; an infinite f16 gradient skips the step and
/// changes nothing (parameters, copy, state, step counts), and the scale backs off as torch's.
#[test]
fn f16_grad_scaler_unscales_and_skips_non_finite() {
    let (mut a1, h1) = build(3);
    let (mut a2, h2) = build(3);
    let cfg = AdamWConfig::default();
    let mut o1 = AdamW::new(&a1, [ParamGroup::all()], cfg.clone()).unwrap();
    let mut o2 = AdamW::new(&a2, [ParamGroup::all()], cfg).unwrap();
    let (mut s1, mut s2) = (GradScaler::default(), GradScaler::default());
    let mut copy = HalfBuffer::<f16>::copy_of(&a1);
    let mut rng = Rng(1);
    for step in 0..4 {
        // Gradients of the scaled loss: small values times the scale, as f16 holds them.
        let mut g: HalfBuffer<f16> = half_grads(&a1, &h1, &mut rng, 1e-3 * s1.scale(), None);
        if step == 2 {
            g.value_mut(h1[1])[4] = f16::INFINITY;
        }
        let before = (
            bits(a1.params()),
            copy.clone(),
            o1.state_dict_json().unwrap(),
        );
        let r1 = s1
            .step_mixed(&mut o1, &mut a1, &g, &mut copy, None)
            .unwrap();
        for (i, &p) in h2.iter().enumerate() {
            let wide: Vec<f32> = g.value(h1[i]).iter().map(|x| x.to_f32()).collect();
            a2.set_grad(p, &wide).unwrap();
        }
        let r2 = s2.step(&mut o2, &mut a2).unwrap();
        assert_eq!(r1.outcome, r2, "step {step}");
        assert_eq!(bits(a1.params()), bits(a2.params()), "step {step}");
        if step == 2 {
            assert_eq!(r1.outcome, StepOutcome::SkippedNonFinite);
            assert_eq!(before.0, bits(a1.params()));
            assert_eq!(before.1.as_slice(), copy.as_slice());
            assert_eq!(before.2, o1.state_dict_json().unwrap());
        } else {
            assert_eq!(r1.outcome, StepOutcome::Applied);
            let want: Vec<f16> = a1.params().iter().map(|&x| f16::from_f32(x)).collect();
            assert_eq!(copy.as_slice(), &want[..]);
        }
        s1.update();
        s2.update();
        assert_eq!(s1.scale(), s2.scale());
    }
    assert_eq!(s1.scale(), 32768.0);
}

#[test]
fn misuse_is_refused_and_changes_nothing() {
    let (mut arena, handles) = build(4);
    let (other, _) = build(4);
    let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
    let g = HalfBuffer::<bf16>::gradients(&arena);
    let mut copy = HalfBuffer::<bf16>::copy_of(&arena);
    let mut foreign = HalfBuffer::<bf16>::copy_of(&other);
    let before = bits(arena.params());
    assert!(matches!(
        opt.step_mixed(&mut arena, &g, &mut foreign, StepOptions::default()),
        Err(Error::ArenaMismatch(_))
    ));
    assert_eq!(before, bits(arena.params()));
    // bf16 state: plain steps and switching back are refused (loads and checkpoints work:
    // tests/checkpoint_half.rs).
    opt.set_state_precision(StatePrecision::Bf16).unwrap();
    let mut g = g;
    g.set_from_f32(handles[0], &vec![0.5; arena.value(handles[0]).len()])
        .unwrap();
    opt.step_mixed(&mut arena, &g, &mut copy, StepOptions::default())
        .unwrap();
    let after = bits(arena.params());
    assert!(matches!(
        opt.step(&mut arena),
        Err(Error::MixedPrecision(_))
    ));
    assert!(matches!(
        opt.set_state_precision(StatePrecision::Full),
        Err(Error::MixedPrecision(_))
    ));
    let sd = opt.state_dict();
    let state_before = opt.buffer_bf16(handles[0], "exp_avg").unwrap().to_vec();
    // Its own widened state dict loads back into bf16 state bit for bit.
    opt.load_state_dict(&sd, optarena::MatchBy::Name).unwrap();
    assert_eq!(
        opt.buffer_bf16(handles[0], "exp_avg").unwrap(),
        &state_before[..]
    );
    assert_eq!(opt.state_dict(), sd);
    assert_eq!(after, bits(arena.params()));
    // The widened state dict loads into an f32 optimizer and holds the bf16 values exactly.
    let mut full = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
    full.load_state_dict(&sd, optarena::MatchBy::Name).unwrap();
    let want: Vec<u32> = opt
        .buffer_bf16(handles[0], "exp_avg")
        .unwrap()
        .iter()
        .map(|x| x.to_f32().to_bits())
        .collect();
    assert_eq!(full.buffer(handles[0], "exp_avg").map(bits), Some(want));
    // Per-parameter algorithms have no mixed kernel.
    let mut ada = Adafactor::new(&arena, [ParamGroup::all()], AdafactorConfig::default()).unwrap();
    assert!(matches!(
        ada.step_mixed(&mut arena, &g, &mut copy, StepOptions::default()),
        Err(Error::MixedPrecision(_))
    ));
    assert!(matches!(
        ada.set_state_precision(StatePrecision::Bf16),
        Err(Error::MixedPrecision(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Streamed copy
// ---------------------------------------------------------------------------------------------

/// Two AdamW mixed steps (amsgrad, weight decay) over a parameter of `len` elements that
/// starts `offset` elements into the arena, so its copy starts `offset` elements past a
/// vector boundary, with the copy stored and streamed
/// (`Optimizer::set_stream_copy_threshold(0)`): parameters, state and copy agree bit for bit,
/// and the copy is the rounded parameters.
fn stream_case<H: Storage>(level: SimdLevel, offset: usize, len: usize, bf16_state: bool) {
    let config = AdamWConfig::default()
        .with_weight_decay(0.01)
        .with_amsgrad(true);
    let mut results = Vec::new();
    for threshold in [usize::MAX, 0] {
        let mut rng = Rng(31 * offset as u64 + len as u64);
        let mut b = ArenaBuilder::<f32>::new();
        let mut handles = Vec::new();
        if offset > 0 {
            handles.push(b.param("lead", &[offset], &rng.vec(offset, 1.0)).unwrap());
        }
        let init = Rng(5 + len as u64).vec(len, 1.0);
        handles.push(b.param("p", &[len], &init).unwrap());
        let mut arena = b.build();
        let mut opt = AdamW::new(&arena, [ParamGroup::all()], config.clone())
            .unwrap()
            .with_simd_level(level);
        if bf16_state {
            opt.set_state_precision(StatePrecision::Bf16).unwrap();
        }
        opt.set_stream_copy_threshold(threshold);
        let mut copy = HalfBuffer::<H>::copy_of(&arena);
        let mut grads_rng = Rng(99 + len as u64);
        for _ in 0..2 {
            let g: HalfBuffer<bf16> = half_grads(&arena, &handles, &mut grads_rng, 1.0, None);
            opt.step_mixed(&mut arena, &g, &mut copy, StepOptions::default())
                .unwrap();
        }
        let want: Vec<H> = arena.params().iter().map(|&x| H::from_f32(x)).collect();
        let what = format!("{level:?} offset {offset} len {len} threshold {threshold}");
        assert!(copy.as_slice() == &want[..], "{what}: copy");
        let p = *handles.last().unwrap();
        let state: Vec<Vec<u32>> = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
            .iter()
            .map(|name| match opt.buffer(p, name) {
                Some(b) => bits(b),
                None => opt
                    .buffer_bf16(p, name)
                    .expect("the buffer exists in f32 or bf16")
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
            })
            .collect();
        results.push((bits(arena.params()), state));
    }
    assert!(
        results[0] == results[1],
        "{level:?} offset {offset} len {len}"
    );
}

/// Streaming the copy (non-temporal stores, used by steps of at least `STREAM_COPY_MIN_ELEMS`
/// elements) changes no bit, whatever the copy's alignment (every offset within a vector, so
/// every length of the scalar head) and length (empty, shorter than the head, a vector, with
/// a tail), at every level, with f32 and bf16 state and bf16 and f16 copies.
#[test]
fn streamed_copy_gives_the_same_bits() {
    for level in levels() {
        for offset in 0..=17 {
            for len in [1, 5, 16, 100, 1003] {
                stream_case::<bf16>(level, offset, len, false);
                stream_case::<bf16>(level, offset, len, true);
                stream_case::<f16>(level, offset, len, false);
            }
        }
    }
}

/// A step above `STREAM_COPY_MIN_ELEMS` (so its copy is streamed), with a parameter that
/// starts 37 elements into the arena (so every 16K piece's copy is misaligned and has a
/// scalar head), equals the f32 step on the widened gradients, copy included, on 1 and 3
/// threads.
#[test]
fn large_step_with_streamed_copy_equals_the_f32_step() {
    use optarena::mixed::STREAM_COPY_MIN_ELEMS;
    for threads in [1, 3] {
        let sizes = [37, STREAM_COPY_MIN_ELEMS + 5];
        let mut rng = Rng(77);
        let mut b1 = ArenaBuilder::<f32>::new();
        let mut b2 = ArenaBuilder::<f32>::new();
        let mut h1 = Vec::new();
        let mut h2 = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let init = rng.vec(n, 1.0);
            h1.push(b1.param(&format!("p{i}"), &[n], &init).unwrap());
            h2.push(b2.param(&format!("p{i}"), &[n], &init).unwrap());
        }
        let (mut a1, mut a2) = (b1.build(), b2.build());
        let config = AdamWConfig::default();
        let mut o1 = AdamW::new(&a1, [ParamGroup::all()], config.clone()).unwrap();
        let mut o2 = AdamW::new(&a2, [ParamGroup::all()], config).unwrap();
        for o in [&mut o1, &mut o2] {
            o.set_parallelism(pool(threads));
        }
        let mut copy = HalfBuffer::<bf16>::copy_of(&a1);
        for step in 0..2 {
            let g: HalfBuffer<bf16> = half_grads(&a1, &h1, &mut rng, 1.0, None);
            o1.step_mixed(&mut a1, &g, &mut copy, StepOptions::default())
                .unwrap();
            a2.grads_mut().copy_from_slice(&g.to_f32_vec());
            o2.step(&mut a2).unwrap();
            let what = format!("threads {threads} step {step}");
            assert_eq!(bits(a1.params()), bits(a2.params()), "{what}: params");
            for (&p1, &p2) in h1.iter().zip(&h2) {
                for name in ["exp_avg", "exp_avg_sq"] {
                    assert_eq!(o1.buffer(p1, name).map(bits), o2.buffer(p2, name).map(bits));
                }
            }
            let want: Vec<bf16> = a2.params().iter().map(|&x| bf16::from_f32(x)).collect();
            assert!(copy.as_slice() == &want[..], "{what}: copy");
        }
    }
}
