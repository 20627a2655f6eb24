//! Half-precision parameters without master weights (issue 15, modes 1 and 3):
//! `Optimizer::step_half`.
//!
//! - Mode 1 against torch: SCHEMA.md's bfloat16 cases (torch's `fused=True` CPU step on bf16
//!   parameters, gradients and state), the committed full set `tests/fixtures/bf16.json`
//!   (written by `scripts/gen_fixtures.py --only bf16`) and the shared sample, at SCHEMA's bf16
//!   tolerance; the number of values equal to torch's bit for bit is printed.
//! - Modes 1 and 3 against a scalar oracle, bit for bit, at every SIMD level this CPU has and on
//!   1, 2 and 3 threads, for every elementwise algorithm: torch's fused update written out here
//!   per element (SGD, Adam, AdamW, Adagrad) or the algorithm's scalar reference kernel (the
//!   others, which torch has no fused kernel for) on the widened values, then the parameters
//!   rounded (to nearest, or stochastically with the documented counter-based bits) and bf16
//!   state rounded to nearest.
//! - Stochastic rounding: unbiased (the mean of many roundings of `x` is `x` within a few
//!   standard errors, at many positions between two bf16 values), and updates far below half a
//!   bf16 unit track the f32 trajectory where rounding to nearest stalls.

mod common;

use std::sync::Arc;

use common::bf16::{replay_case, Bf16Replay};
use common::{json_files, load_cases, Outcome, Rng};
use half::{bf16, f16};
use optarena::mixed::{bf16_stochastic_round, stochastic_bits, HalfBuffer, ParamRounding, Storage};
use optarena::optim::*;
use optarena::{
    Algorithm, Arena, ArenaBuilder, Error, Hyperparams, KernelArgs, Optimizer, Parallelism, Param,
    ParamGroup, SimdLevel, StatePrecision, StepOptions, Subnormals,
};

fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .collect()
}

fn pool(threads: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Mode 1 against torch
// ---------------------------------------------------------------------------------------------

/// Replays every bf16 case of `path`; returns (cases, values compared, values bit-exact).
fn replay_bf16_file(path: &std::path::Path, parallelism: &Parallelism) -> (usize, usize, usize) {
    let mut failures = Vec::new();
    let (mut cases, mut compared, mut exact) = (0, 0, 0);
    for case in load_cases(path) {
        if case["dtype"].as_str() != Some("bfloat16") {
            continue;
        }
        for mode in [Subnormals::Flush, Subnormals::Preserve] {
            let Bf16Replay {
                outcome,
                compared: c,
                exact: e,
            } = replay_case(&case, parallelism.clone(), mode);
            match outcome {
                Outcome::Pass => {}
                Outcome::Fail(m) => failures.push(m),
                Outcome::Skip(what) => failures.push(format!("skipped: {what}")),
            }
            if mode == Subnormals::Flush {
                cases += 1;
                compared += c;
                exact += e;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} case(s) outside SCHEMA's bf16 tolerance:\n{}",
        path.display(),
        failures.len(),
        failures.join("\n")
    );
    println!(
        "bf16 fused vs torch: {}: {cases} cases, {compared} values, {exact} bit-exact ({:.3}%)",
        path.file_name().unwrap().to_string_lossy(),
        100.0 * exact as f64 / compared.max(1) as f64
    );
    (cases, compared, exact)
}

/// The full committed set: SGD (momentum, nesterov, dampening, weight decay, maximize), Adam,
/// AdamW (amsgrad) and Adagrad, one and two groups, tails past the 16-lane body, 25 steps.
#[test]
fn torch_fused_bf16_full_set() {
    let path = common::fixtures_dir().join("bf16.json");
    let (cases, compared, exact) = replay_bf16_file(&path, &Parallelism::Sequential);
    assert!(cases >= 20 && compared > 0);
    // Most values equal torch's bits (torch's vector body uses FMA in its lerp; see
    // `Optimizer::step_half`); the rest are within SCHEMA's tolerance, checked above.
    assert!(
        exact * 1000 >= compared * 999,
        "{exact} of {compared} bit-exact"
    );
    // The same on three threads, with the default SIMD level.
    replay_bf16_file(&path, &pool(3));
}

/// SCHEMA.md's sample (the committed copy, and the shared directory when it is present).
#[test]
fn torch_fused_bf16_shared_sample() {
    let mut dirs = vec![common::fixtures_dir().join("sample")];
    dirs.extend(common::shared_samples_dir());
    for dir in dirs {
        let path = dir.join("bf16.json");
        assert!(
            json_files(&dir).contains(&path),
            "{} missing",
            path.display()
        );
        let (cases, compared, _) = replay_bf16_file(&path, &Parallelism::Sequential);
        assert!(cases >= 4 && compared > 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Modes 1 and 3 against the scalar oracle, bit for bit
// ---------------------------------------------------------------------------------------------

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![37],
        vec![5, 13],
        vec![1000],
        vec![2 * 16 * 1024 + 77],
        vec![3],
    ]
}

/// The layout (an f32 arena, used only to build the optimizer and the half buffers) and
/// initial values exact in bf16.
fn build(seed: u64) -> (Arena<f32>, Vec<Param<f32>>) {
    let mut rng = Rng(seed);
    let mut b = ArenaBuilder::<f32>::new();
    let mut handles = Vec::new();
    for (i, s) in shapes().iter().enumerate() {
        let n: usize = s.iter().product();
        let init: Vec<f32> = rng
            .vec::<f32>(n, 1.0)
            .into_iter()
            .map(|x| bf16::from_f32(x).to_f32())
            .collect();
        handles.push(b.param(&format!("p{i}"), s, &init).unwrap());
    }
    (b.build(), handles)
}

fn bits16<P: Storage>(x: &[P]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn round_param(x: f32, rounding: ParamRounding, index: usize) -> f32 {
    match rounding {
        ParamRounding::Nearest => bf16::from_f32(x).to_f32(),
        ParamRounding::Stochastic { seed, step } => {
            bf16_stochastic_round(x, stochastic_bits(seed, step, index as u64)).to_f32()
        }
    }
}

fn num(c: &impl Hyperparams, name: &str) -> f64 {
    match c.get(name).unwrap() {
        optarena::HyperValue::Number(x) => x,
        other => panic!("{name}: {other:?}"),
    }
}

fn flag(c: &impl Hyperparams, name: &str) -> bool {
    c.get(name).unwrap() == optarena::HyperValue::Bool(true)
}

fn pair(c: &impl Hyperparams, name: &str) -> (f64, f64) {
    match c.get(name).unwrap() {
        optarena::HyperValue::Pair(a, b) => (a, b),
        other => panic!("{name}: {other:?}"),
    }
}

/// torch's fused CPU step (`FusedSGDKernel.cpp`, `FusedAdamKernel.cpp`,
/// `FusedAdagradKernel.cpp`, with the multiply-adds its compiled vector body fuses), written
/// out per element in f32 for step `t`, independently of the crate's kernels. `None` for the
/// algorithms torch has no fused kernel for.
fn torch_fused_step(
    name: &str,
    c: &impl Hyperparams,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    bufs: &mut [Vec<f32>],
) -> Option<()> {
    if !matches!(name, "SGD" | "Adam" | "AdamW" | "Adagrad") {
        return None;
    }
    let maximize = flag(c, "maximize");
    let wd = num(c, "weight_decay");
    let eff = |x: f32| if maximize { -x } else { x };
    match name {
        "SGD" => {
            let (lr, mom, damp) = (num(c, "lr"), num(c, "momentum"), num(c, "dampening"));
            let nesterov = flag(c, "nesterov");
            for i in 0..p.len() {
                let mut d = eff(g[i]);
                if wd != 0.0 {
                    d = p[i].mul_add(wd as f32, d);
                }
                if mom != 0.0 {
                    let b = &mut bufs[0][i];
                    *b = if t == 1 {
                        d
                    } else {
                        ((1.0 - damp) as f32).mul_add(d, *b * mom as f32)
                    };
                    d = if nesterov {
                        b.mul_add(mom as f32, d)
                    } else {
                        *b
                    };
                }
                p[i] = d.mul_add(-lr as f32, p[i]);
            }
        }
        "Adam" | "AdamW" => {
            let (lr, eps) = (num(c, "lr"), num(c, "eps"));
            let (b1, b2) = pair(c, "betas");
            let decoupled = name == "AdamW" || flag(c, "decoupled_weight_decay");
            let amsgrad = flag(c, "amsgrad");
            let step_size = lr / (1.0 - b1.powf(t as f64));
            let bc2_sqrt = (1.0 - b2.powf(t as f64)).sqrt() as f32;
            let w = (1.0 - b1) as f32;
            for i in 0..p.len() {
                let mut d = eff(g[i]);
                let mut x = p[i];
                if wd != 0.0 {
                    if decoupled {
                        x *= (1.0 - lr * wd) as f32;
                    } else {
                        d = x.mul_add(wd as f32, d);
                    }
                }
                let m = bufs[0][i];
                bufs[0][i] = if w.abs() < 0.5 {
                    w.mul_add(d - m, m)
                } else {
                    (w - 1.0).mul_add(d - m, d)
                };
                bufs[1][i] = (((1.0 - b2) as f32) * d).mul_add(d, bufs[1][i] * b2 as f32);
                let second = if amsgrad {
                    bufs[2][i] = bufs[2][i].max(bufs[1][i]);
                    bufs[2][i]
                } else {
                    bufs[1][i]
                };
                let denom = second.sqrt() / bc2_sqrt + eps as f32;
                p[i] = x + (-step_size as f32) * bufs[0][i] / denom;
            }
        }
        "Adagrad" => {
            let (lr, eps, decay) = (num(c, "lr"), num(c, "eps"), num(c, "lr_decay"));
            let clr = (lr / (1.0 + (t - 1) as f64 * decay)) as f32;
            for i in 0..p.len() {
                let mut d = eff(g[i]);
                if wd != 0.0 {
                    d = p[i].mul_add(wd as f32, d);
                }
                bufs[0][i] = d.mul_add(d, bufs[0][i]);
                p[i] -= clr * d / (bufs[0][i].sqrt() + eps as f32);
            }
        }
        _ => unreachable!(),
    }
    Some(())
}

/// Four steps of `step_half` (bf16 parameters, gradients in `G`) against the oracle: the
/// algorithm's scalar reference kernel on the f32 widening of everything, then the parameters
/// rounded as `rounding` says and bf16 state rounded to nearest.
fn check_half<A: Algorithm, G: Storage>(
    config: &A::Config,
    state: StatePrecision,
    stochastic: bool,
    level: SimdLevel,
    threads: usize,
) {
    let (arena, handles) = build(31);
    let mut opt = Optimizer::<f32, A>::new(&arena, [ParamGroup::all()], config.clone()).unwrap();
    opt.set_simd_level(level);
    opt.set_parallelism(pool(threads));
    opt.set_parallel_threshold(0);
    opt.set_subnormals(Subnormals::Preserve);
    opt.set_state_precision(state).unwrap();
    let mut params = HalfBuffer::<bf16>::copy_of(&arena);
    let mut grads = HalfBuffer::<G>::gradients(&arena);
    let n_bufs = A::buffers(config).len();
    let half_state = state == StatePrecision::Bf16;
    let mut p_ref = arena.params().to_vec();
    let mut s_ref: Vec<Vec<f32>> = (0..n_bufs)
        .map(|k| {
            let init = A::buffer_init(config, k) as f32;
            let init = if half_state {
                bf16::from_f32(init).to_f32()
            } else {
                init
            };
            vec![init; p_ref.len()]
        })
        .collect();
    drop(arena);
    let mut scalars = A::init_scalars(config);
    let mut rng = Rng(17);
    for step in 1..=4u64 {
        let rounding = if stochastic {
            ParamRounding::Stochastic {
                seed: 0xC0FFEE,
                step: 100 + step,
            }
        } else {
            ParamRounding::Nearest
        };
        let g: Vec<f32> = rng.vec(p_ref.len(), 1.0);
        for (d, &x) in grads.as_mut_slice().iter_mut().zip(&g) {
            *d = G::from_f32(x);
        }
        opt.step_half(&mut params, &grads, rounding, StepOptions::default())
            .unwrap();
        let coeffs = A::prepare(config, step, &mut scalars);
        let args = KernelArgs {
            coeffs,
            fresh: step == 1,
            grad_scale: 1.0,
            simd: level,
        };
        let wide = grads.to_f32_vec();
        if torch_fused_step(A::NAME, config, step, &mut p_ref, &wide, &mut s_ref).is_none() {
            let mut bufs: Vec<&mut [f32]> = s_ref.iter_mut().map(|b| &mut b[..]).collect();
            A::reference(&args, &mut p_ref, &wide, &mut bufs);
        }
        for (i, x) in p_ref.iter_mut().enumerate() {
            *x = round_param(*x, rounding, i);
        }
        if half_state {
            for b in &mut s_ref {
                for x in b.iter_mut() {
                    *x = bf16::from_f32(*x).to_f32();
                }
            }
        }
        let what = format!(
            "{} {config:?} {state:?} {rounding:?} grads {} {level:?} threads {threads} step {step}",
            A::NAME,
            G::DTYPE
        );
        assert_eq!(bits16(params.as_slice()), bits(&p_ref), "{what}: params");
        for &p in &handles {
            let r = params.value(p).len();
            let start = {
                let base = params.as_slice().as_ptr() as usize;
                (params.value(p).as_ptr() as usize - base) / 2
            };
            for (k, name) in A::buffers(config).iter().enumerate() {
                let got: Vec<u32> = if half_state {
                    bits16(opt.buffer_bf16(p, name).unwrap())
                } else {
                    bits(opt.buffer(p, name).unwrap())
                };
                assert_eq!(got, bits(&s_ref[k][start..start + r]), "{what}: {name}");
            }
        }
    }
}

/// Every level, 1-3 threads, both roundings and both state precisions (bf16 gradients), and
/// f32 gradients once.
fn check_all<A: Algorithm>(cs: &[A::Config]) {
    for c in cs {
        for level in levels() {
            for threads in [1, 2, 3] {
                check_half::<A, bf16>(c, StatePrecision::Bf16, false, level, threads);
                check_half::<A, bf16>(c, StatePrecision::Bf16, true, level, threads);
            }
            check_half::<A, bf16>(c, StatePrecision::Full, true, level, 2);
            check_half::<A, bf16>(c, StatePrecision::Full, false, level, 3);
        }
        check_half::<A, f32>(c, StatePrecision::Bf16, true, SimdLevel::Best, 2);
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

macro_rules! half_test {
    ($name:ident, $alg:ty, $cfg:ty, [$($variant:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            #[allow(unused_imports)]
            use optarena::HyperValue::*;
            check_all::<$alg>(&configs::<$cfg>(&[$($variant),*]));
        }
    };
}

half_test!(
    half_sgd,
    SGDAlgorithm,
    SGDConfig,
    [
        &[("lr", Number(0.05))],
        &[
            ("momentum", Number(0.8)),
            ("dampening", Number(0.3)),
            ("weight_decay", Number(0.01)),
            ("maximize", Bool(true))
        ],
        &[("momentum", Number(0.8)), ("nesterov", Bool(true))],
    ]
);
half_test!(
    half_adam,
    AdamAlgorithm,
    AdamConfig,
    [
        &[("lr", Number(0.01))],
        &[("amsgrad", Bool(true)), ("weight_decay", Number(0.1))],
    ]
);
half_test!(
    half_adamw,
    AdamWAlgorithm,
    AdamWConfig,
    [&[("amsgrad", Bool(true)), ("maximize", Bool(true))]]
);
half_test!(
    half_radam,
    RAdamAlgorithm,
    RAdamConfig,
    [&[
        ("decoupled_weight_decay", Bool(true)),
        ("weight_decay", Number(0.1))
    ]]
);
half_test!(
    half_nadam,
    NAdamAlgorithm,
    NAdamConfig,
    [&[("weight_decay", Number(0.1))]]
);
half_test!(
    half_adamax,
    AdamaxAlgorithm,
    AdamaxConfig,
    [&[("weight_decay", Number(0.1))]]
);
half_test!(
    half_adagrad,
    AdagradAlgorithm,
    AdagradConfig,
    [&[
        ("initial_accumulator_value", Number(0.5)),
        ("lr_decay", Number(0.1))
    ]]
);
half_test!(
    half_adadelta,
    AdadeltaAlgorithm,
    AdadeltaConfig,
    [&[("weight_decay", Number(0.1))]]
);
half_test!(
    half_rmsprop,
    RMSpropAlgorithm,
    RMSpropConfig,
    [&[("momentum", Number(0.9)), ("centered", Bool(true))]]
);
half_test!(
    half_rprop,
    RpropAlgorithm,
    RpropConfig,
    [&[("etas", Pair(0.3, 1.5))]]
);
half_test!(
    half_asgd,
    ASGDAlgorithm,
    ASGDConfig,
    [&[("t0", Number(1.0)), ("weight_decay", Number(0.01))]]
);

/// f16 parameters (rounded to nearest) with f32 state: torch's fused Adam / SGD order in f32,
/// the parameters rounded to f16, at every level and on 1 and 3 threads.
#[test]
fn f16_parameters_round_to_nearest() {
    use optarena::HyperValue::*;
    fn run<A: Algorithm>(config: &A::Config) {
        for level in levels() {
            for threads in [1, 3] {
                let (arena, _) = build(41);
                let mut opt =
                    Optimizer::<f32, A>::new(&arena, [ParamGroup::all()], config.clone()).unwrap();
                opt.set_simd_level(level);
                opt.set_parallelism(pool(threads));
                opt.set_parallel_threshold(0);
                let mut params = HalfBuffer::<f16>::copy_of(&arena);
                let mut grads = HalfBuffer::<f16>::gradients(&arena);
                let mut p_ref: Vec<f32> = params.to_f32_vec();
                let mut s_ref: Vec<Vec<f32>> = (0..A::buffers(config).len())
                    .map(|_| vec![0.0; p_ref.len()])
                    .collect();
                drop(arena);
                let mut rng = Rng(23);
                for step in 1..=3u64 {
                    let g: Vec<f32> = rng.vec(p_ref.len(), 1.0);
                    for (d, &x) in grads.as_mut_slice().iter_mut().zip(&g) {
                        *d = f16::from_f32(x);
                    }
                    opt.step_half(
                        &mut params,
                        &grads,
                        ParamRounding::Nearest,
                        StepOptions::default(),
                    )
                    .unwrap();
                    let wide = grads.to_f32_vec();
                    torch_fused_step(A::NAME, config, step, &mut p_ref, &wide, &mut s_ref).unwrap();
                    for x in p_ref.iter_mut() {
                        *x = f16::from_f32(*x).to_f32();
                    }
                    assert_eq!(
                        bits16(params.as_slice()),
                        bits(&p_ref),
                        "{} {level:?} threads {threads} step {step}",
                        A::NAME
                    );
                }
            }
        }
    }
    run::<AdamAlgorithm>(&configs::<AdamConfig>(&[&[("lr", Number(0.01))]])[0]);
    run::<SGDAlgorithm>(
        &configs::<SGDConfig>(&[&[("lr", Number(0.05)), ("momentum", Number(0.9))]])[0],
    );
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding: the generator, unbiasedness, tracking small updates
// ---------------------------------------------------------------------------------------------

/// AES's round function (FIPS-197) written out from its definition, independently of the
/// crate's `aes` dependency and of the AES instructions: the S-box from the multiplicative
/// inverse in GF(2^8) and the affine map; state byte `i` is row `i % 4`, column `i / 4`.
struct TextbookAes {
    sbox: [u8; 256],
}

impl TextbookAes {
    fn xtime(b: u8) -> u8 {
        (b << 1) ^ if b & 0x80 != 0 { 0x1b } else { 0 }
    }

    fn mul(mut a: u8, mut b: u8) -> u8 {
        let mut p = 0;
        while b != 0 {
            if b & 1 != 0 {
                p ^= a;
            }
            a = Self::xtime(a);
            b >>= 1;
        }
        p
    }

    fn new() -> Self {
        let sbox = std::array::from_fn(|x| {
            let x = x as u8;
            // x^254 = x^-1 in GF(2^8) (0 for 0).
            let mut inv = 1u8;
            for _ in 0..254 {
                inv = Self::mul(inv, x);
            }
            let inv = if x == 0 { 0 } else { inv };
            inv ^ inv.rotate_left(1)
                ^ inv.rotate_left(2)
                ^ inv.rotate_left(3)
                ^ inv.rotate_left(4)
                ^ 0x63
        });
        TextbookAes { sbox }
    }

    /// SubBytes, ShiftRows, MixColumns (not in the last round), AddRoundKey.
    fn round(&self, s: [u8; 16], key: [u8; 16], last: bool) -> [u8; 16] {
        let shifted: [u8; 16] =
            std::array::from_fn(|i| self.sbox[s[i % 4 + 4 * ((i / 4 + i % 4) % 4)] as usize]);
        let mut out = shifted;
        if !last {
            for c in 0..4 {
                let a = &shifted[4 * c..4 * c + 4];
                let m = |x: u8, k: u8| Self::mul(x, k);
                out[4 * c] = m(a[0], 2) ^ m(a[1], 3) ^ a[2] ^ a[3];
                out[4 * c + 1] = a[0] ^ m(a[1], 2) ^ m(a[2], 3) ^ a[3];
                out[4 * c + 2] = a[0] ^ a[1] ^ m(a[2], 2) ^ m(a[3], 3);
                out[4 * c + 3] = m(a[0], 3) ^ a[1] ^ a[2] ^ m(a[3], 2);
            }
        }
        std::array::from_fn(|i| out[i] ^ key[i])
    }
}

fn hex16(s: &str) -> [u8; 16] {
    std::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
}

/// The generator as documented (`stochastic_bits`: ARS-5 keyed by SplitMix64 of the seed and
/// step), written out here with the textbook AES round, itself checked against FIPS-197.
#[test]
fn stochastic_bits_follow_the_documented_generator() {
    let aes = TextbookAes::new();
    // FIPS-197 §5.1.1's S-box entries, and Appendix B: the start of round 2 from the start of
    // round 1 and round key 1.
    assert_eq!((aes.sbox[0x00], aes.sbox[0x53]), (0x63, 0xED));
    assert_eq!(
        aes.round(
            hex16("193de3bea0f4e22b9ac68d2ae9f84808"),
            hex16("a0fafe1788542cb123a339392a6c7605"),
            false
        ),
        hex16("a49c7ff2689f352b6b5bea43026a5049")
    );
    let splitmix64 = common::splitmix64;
    let weyl = [0x9E37_79B9_7F4A_7C15u64, 0xBB67_AE85_84CA_A73B];
    let bytes = |k: [u64; 2]| -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&k[0].to_le_bytes());
        b[8..].copy_from_slice(&k[1].to_le_bytes());
        b
    };
    let mut rng = Rng(3);
    for _ in 0..1000 {
        let seed = (rng.next_f64().to_bits()) ^ 0x1234;
        let step = (rng.next_f64().abs() * 1e6) as u64;
        let index = (rng.next_f64().abs() * 1e15) as u64;
        let k = splitmix64(seed ^ splitmix64(step));
        let mut key = [k, splitmix64(k)];
        let counter = index >> 3;
        let mut x: [u8; 16] = std::array::from_fn(|i| bytes([counter, counter])[i] ^ bytes(key)[i]);
        for round in 1..=5 {
            key = [key[0].wrapping_add(weyl[0]), key[1].wrapping_add(weyl[1])];
            x = aes.round(x, bytes(key), round == 5);
        }
        let j = (index & 7) as usize;
        let word = u16::from_le_bytes([x[2 * j], x[2 * j + 1]]);
        assert_eq!(stochastic_bits(seed, step, index), word, "index {index}");
    }
    // Rounding: add the bits below the mantissa and truncate; infinities stay, NaN is quiet.
    assert_eq!(bf16_stochastic_round(1.0, 0xFFFF).to_f32(), 1.0);
    let next = f32::from_bits(0x3F81_0000);
    assert_eq!(
        bf16_stochastic_round(f32::from_bits(0x3F80_0001), 0xFFFF).to_f32(),
        next
    );
    assert_eq!(
        bf16_stochastic_round(f32::from_bits(0x3F80_0001), 0xFFFE).to_f32(),
        1.0
    );
    assert_eq!(
        bf16_stochastic_round(f32::INFINITY, 0xFFFF).to_f32(),
        f32::INFINITY
    );
    assert_eq!(
        bf16_stochastic_round(f32::NEG_INFINITY, 0xFFFF).to_f32(),
        f32::NEG_INFINITY
    );
    assert_eq!(bf16_stochastic_round(f32::NAN, 0xFFFF).to_bits(), 0x7FC0);
    assert_eq!(
        bf16_stochastic_round(f32::from_bits(0x7F80_0001), 0).to_bits(),
        0x7FC0
    );
}

/// The mean of `n` stochastic roundings of `x` lies within 4.5 standard errors of `x`, for `x`
/// at many positions between two bf16 neighbours (near each, halfway, in between), of both
/// signs, normal and subnormal, with the bits of many steps and element indices.
#[test]
fn stochastic_rounding_is_unbiased() {
    let n = 200_000u64;
    let bases: [u32; 4] = [0x3F80_0000, 0xC2F6_0000, 0x0012_0000, 0x3A12_0000];
    let fracs: [u32; 9] = [
        1, 0x0100, 0x1999, 0x4000, 0x8000, 0x8001, 0xC000, 0xE666, 0xFFFF,
    ];
    for &base in &bases {
        for &frac in &fracs {
            let x = f32::from_bits(base | frac);
            let lo = f32::from_bits(base) as f64;
            let hi = f32::from_bits(base + 0x1_0000) as f64;
            let ulp = (hi - lo).abs();
            let p = frac as f64 / 65536.0;
            let mut sum = 0.0f64;
            for k in 0..n {
                let (step, index) = (k % 97, k / 97 * 1_000_003 + 17);
                sum += bf16_stochastic_round(x, stochastic_bits(42, step, index)).to_f64();
            }
            let mean = sum / n as f64;
            let se = ulp * (p * (1.0 - p) / n as f64).sqrt();
            let err = (mean - x as f64).abs();
            assert!(
                err <= 4.5 * se + 1e-3 * ulp / (n as f64).sqrt(),
                "x = {x:e} (bits {:#x}): mean {mean:e}, error {err:e}, standard error {se:e}",
                x.to_bits()
            );
        }
    }
}

/// The random bits look like independent uniform 16-bit words: over 2^20 neighbouring elements,
/// every bit is set about half the time, the top byte is spread evenly (chi-square), and
/// neither neighbours, nor the same element at consecutive steps, nor elements a block apart
/// are correlated. Bounds are five to six standard deviations (the test is deterministic).
#[test]
fn stochastic_bits_look_uniform_and_independent() {
    let n = 1usize << 20;
    let (seed, step, start) = (0xDEAD_BEEF, 7, 12_345_u64);
    let r: Vec<u16> = (0..n as u64)
        .map(|i| stochastic_bits(seed, step, start + i))
        .collect();
    let half = n as f64 / 2.0;
    let sd = (n as f64).sqrt() / 2.0;
    for bit in 0..16 {
        let ones = r.iter().filter(|&&x| x >> bit & 1 == 1).count() as f64;
        assert!(
            (ones - half).abs() < 5.0 * sd,
            "bit {bit}: {ones} ones of {n}"
        );
    }
    let mut bins = [0f64; 256];
    for &x in &r {
        bins[(x >> 8) as usize] += 1.0;
    }
    let expected = n as f64 / 256.0;
    let chi2: f64 = bins
        .iter()
        .map(|&b| (b - expected).powi(2) / expected)
        .sum();
    // 255 degrees of freedom: mean 255, standard deviation about 22.6.
    assert!((120.0..390.0).contains(&chi2), "chi-square {chi2}");
    let correlation = |a: &[u16], b: &[u16]| -> f64 {
        let m = a.len() as f64;
        let (ma, mb) = (
            a.iter().map(|&x| x as f64).sum::<f64>() / m,
            b.iter().map(|&x| x as f64).sum::<f64>() / m,
        );
        let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
        for (&x, &y) in a.iter().zip(b) {
            let (dx, dy) = (x as f64 - ma, y as f64 - mb);
            sab += dx * dy;
            saa += dx * dx;
            sbb += dy * dy;
        }
        sab / (saa * sbb).sqrt()
    };
    let bound = 5.0 / (n as f64).sqrt();
    let next_step: Vec<u16> = (0..n as u64)
        .map(|i| stochastic_bits(seed, step + 1, start + i))
        .collect();
    for (what, c) in [
        ("neighbours", correlation(&r[..n - 1], &r[1..])),
        ("a block apart", correlation(&r[..n - 8], &r[8..])),
        ("consecutive steps", correlation(&r, &next_step)),
    ] {
        assert!(c.abs() < bound, "{what}: correlation {c}");
    }
}

/// Through the optimizer: SGD with lr 1 from zero moves every element to `x` = -grad,
/// stochastically rounded; the mean over 64K elements is `x` within 4.5 standard errors, at
/// every level.
#[test]
fn stochastic_step_is_unbiased_through_the_kernel() {
    let n = 1 << 16;
    let mut b = ArenaBuilder::<f32>::new();
    let p = b.zeros("w", &[n]).unwrap();
    let arena = b.build();
    for level in levels() {
        for (i, frac) in [0x0400u32, 0x5555, 0x8000, 0xF000].into_iter().enumerate() {
            let x = f32::from_bits(0x3F40_0000 | frac);
            let config = configs::<SGDConfig>(&[&[("lr", optarena::HyperValue::Number(1.0))]]);
            let mut opt =
                Optimizer::<f32, SGDAlgorithm>::new(&arena, [ParamGroup::all()], config[0].clone())
                    .unwrap();
            opt.set_simd_level(level);
            let mut params = HalfBuffer::<bf16>::copy_of(&arena);
            let mut grads = HalfBuffer::<f32>::gradients(&arena);
            grads.value_mut(p).fill(-x);
            let rounding = ParamRounding::Stochastic {
                seed: 7,
                step: i as u64,
            };
            opt.step_half(&mut params, &grads, rounding, StepOptions::default())
                .unwrap();
            let mean = params.value(p).iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
            let ulp = 2f64.powi(-8);
            let q = frac as f64 / 65536.0;
            let se = ulp * (q * (1.0 - q) / n as f64).sqrt();
            assert!(
                (mean - x as f64).abs() <= 4.5 * se,
                "{level:?} x = {x}: mean {mean}, standard error {se:e}"
            );
        }
    }
}

/// Updates of 1e-4 on parameters near 1 (where half a bf16 unit is 2^-9 ≈ 2e-3): with rounding
/// to nearest every update is lost and the parameters never move; with stochastic rounding
/// they follow the f32 trajectory (1 - 0.1 after 1000 steps) on average.
#[test]
fn stochastic_rounding_tracks_small_updates_where_nearest_stalls() {
    let n = 1 << 16;
    let steps = 1000u64;
    let mut b = ArenaBuilder::<f32>::new();
    let p = b.param_with("w", &[n], |_| 1.0).unwrap();
    let arena = b.build();
    let lr = 1e-4;
    let config = configs::<SGDConfig>(&[&[("lr", optarena::HyperValue::Number(lr))]]);
    let mut results = Vec::new();
    for stochastic in [false, true] {
        let mut opt =
            Optimizer::<f32, SGDAlgorithm>::new(&arena, [ParamGroup::all()], config[0].clone())
                .unwrap();
        let mut params = HalfBuffer::<bf16>::copy_of(&arena);
        let mut grads = HalfBuffer::<bf16>::gradients(&arena);
        grads.value_mut(p).fill(bf16::ONE);
        for step in 0..steps {
            let r = if stochastic {
                ParamRounding::Stochastic { seed: 99, step }
            } else {
                ParamRounding::Nearest
            };
            opt.step_half(&mut params, &grads, r, StepOptions::default())
                .unwrap();
        }
        results.push(
            params
                .value(p)
                .iter()
                .map(|v| v.to_f64())
                .collect::<Vec<_>>(),
        );
    }
    let mut f32_value = 1.0f32;
    for _ in 0..steps {
        f32_value -= lr as f32;
    }
    let target = f32_value as f64;
    assert!((target - 0.9).abs() < 1e-3);
    assert!(
        results[0].iter().all(|&v| v == 1.0),
        "nearest rounding moved"
    );
    // Each element's error is a sum of 1000 zero-mean roundings: a random walk of a few bf16
    // units (about 0.02). Its mean over the elements lies within a few standard errors of
    // the f32 value; the spread stays that of the walk.
    let mean = results[1].iter().sum::<f64>() / n as f64;
    let var = results[1].iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    assert!(
        (mean - target).abs() <= 4.5 * se,
        "stochastic mean {mean}, f32 {target}, standard error {se:e}"
    );
    // Per step, an element near 0.9-1 rounds with variance at most q(1-q)·ulp² where q is the
    // update in units of 2^-8 (0.0256): 1000 steps give a standard deviation below 0.02.
    assert!(var.sqrt() < 0.025, "spread {}", var.sqrt());
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn misuse_is_refused_and_changes_nothing() {
    let (arena, handles) = build(5);
    let (other, _) = build(5);
    let mut opt =
        Optimizer::<f32, AdamAlgorithm>::new(&arena, [ParamGroup::all()], AdamConfig::default())
            .unwrap();
    opt.set_state_precision(StatePrecision::Bf16).unwrap();
    let mut params = HalfBuffer::<bf16>::copy_of(&arena);
    let mut grads = HalfBuffer::<bf16>::gradients(&arena);
    grads.as_mut_slice().fill(bf16::ONE);
    let before = params.clone();
    // Buffers of another arena.
    let mut foreign = HalfBuffer::<bf16>::copy_of(&other);
    let e = opt
        .step_half(
            &mut foreign,
            &grads,
            ParamRounding::Nearest,
            StepOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
    let foreign_grads = HalfBuffer::<bf16>::gradients(&other);
    let e = opt
        .step_half(
            &mut params,
            &foreign_grads,
            ParamRounding::Nearest,
            StepOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
    // Stochastic rounding of f16 parameters.
    let mut f16_params = HalfBuffer::<f16>::copy_of(&arena);
    let e = opt
        .step_half(
            &mut f16_params,
            &grads,
            ParamRounding::Stochastic { seed: 1, step: 1 },
            StepOptions::default(),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("stochastic rounding is for bfloat16"),
        "{e}"
    );
    // An algorithm without a mixed-precision kernel.
    let mut adafactor = Optimizer::<f32, AdafactorAlgorithm>::new(
        &arena,
        [ParamGroup::all()],
        AdafactorConfig::default(),
    )
    .unwrap();
    let e = adafactor
        .step_half(
            &mut params,
            &grads,
            ParamRounding::Nearest,
            StepOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::MixedPrecision(_)), "{e}");
    // A non-finite gradient with `skip_non_finite`: skipped whole.
    grads.value_mut(handles[1])[0] = bf16::NAN;
    let r = opt
        .step_half(
            &mut params,
            &grads,
            ParamRounding::Nearest,
            StepOptions {
                skip_non_finite: true,
                ..StepOptions::default()
            },
        )
        .unwrap();
    assert_eq!(r.outcome, optarena::StepOutcome::SkippedNonFinite);
    assert_eq!(params.as_slice(), before.as_slice());
    assert!(opt.step_count(handles[0]).is_none());
}
