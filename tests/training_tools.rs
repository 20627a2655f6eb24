//! Clipping, clip folded into the step, grad scaling, the non-finite guard, accumulation and
//! hooks.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::sync::{Arc, Mutex};

use common::{build_arena, write_grads};
use optarena::clip::{
    clip_grad_norm, clip_grad_norm_all, clip_grad_norm_with, clip_grad_value, clip_grad_value_all,
    total_norm, total_norm_with, NormScratch, NormType,
};
use optarena::optim::*;
use optarena::{
    Arena, ClipNorm, GradScaler, GroupHyperparams, Parallelism, Param, ParamGroup, SimdLevel,
    StepOutcome,
};

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![7, 5],
        vec![5],
        vec![300, 401],
        vec![33],
        vec![1],
        vec![129, 67],
    ]
}

fn bits(a: &Arena<f32>) -> Vec<u32> {
    a.params().iter().map(|x| x.to_bits()).collect()
}

fn pool(n: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    ))
}

#[test]
fn norm_is_bitwise_the_same_for_any_thread_count() {
    let (mut arena, _) = build_arena::<f32>(&shapes(), 1, &[]);
    write_grads(&mut arena, 3, &[4]);
    let all = [0..arena.num_params()];
    for norm in [
        NormType::P(2.0),
        NormType::P(1.0),
        NormType::Inf,
        NormType::P(3.0),
        NormType::P(0.5),
    ] {
        let seq = total_norm(&arena, &all, norm, &Parallelism::Sequential);
        assert!(seq.is_finite() && seq > 0.0);
        for n in [1, 2, 3, 7] {
            assert_eq!(
                seq.to_bits(),
                total_norm(&arena, &all, norm, &pool(n)).to_bits(),
                "{norm:?} {n} threads"
            );
        }
        assert_eq!(
            seq.to_bits(),
            total_norm(&arena, &all, norm, &Parallelism::Global).to_bits()
        );
    }
}

#[test]
fn norm_and_clipped_step_are_bitwise_the_same_at_every_simd_level() {
    let levels: Vec<SimdLevel> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .collect();
    let (mut arena, _) = build_arena::<f32>(&shapes(), 1, &[]);
    write_grads(&mut arena, 5, &[2]);
    let all = [0..arena.num_params()];
    for norm in [NormType::P(2.0), NormType::P(1.0), NormType::Inf] {
        let at = |level| {
            let par = Parallelism::Global;
            total_norm_with(&arena, &all, norm, &par, level, &mut NormScratch::default())
        };
        let want = at(SimdLevel::Portable);
        for &level in &levels {
            assert_eq!(at(level).to_bits(), want.to_bits(), "{norm:?} {level:?}");
        }
        let step = |level| {
            let (mut a, h) = build_arena::<f32>(&shapes(), 1, &[]);
            let mut o = adamw(&a, &h);
            o.set_simd_level(level);
            for t in 1..=3 {
                write_grads(&mut a, t, &[]);
                let clip = ClipNorm {
                    max_norm: 0.5,
                    norm_type: norm,
                    error_if_nonfinite: false,
                };
                o.step_with_options(&mut a, optarena::StepOptions::new().clipped(clip))
                    .unwrap();
            }
            bits(&a)
        };
        let want = step(SimdLevel::Portable);
        for &level in &levels {
            assert_eq!(step(level), want, "{level:?}");
        }
    }
}

#[test]
fn norm_matches_a_plain_f64_computation() {
    let (mut arena, _) = build_arena::<f64>(&shapes(), 1, &[]);
    write_grads(&mut arena, 3, &[]);
    let g = arena.grads().to_vec();
    let all = [0..arena.num_params()];
    let l2 = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let l1 = g.iter().map(|x| x.abs()).sum::<f64>();
    let linf = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let got2 = total_norm(&arena, &all, NormType::P(2.0), &Parallelism::Global);
    assert!((got2 - l2).abs() <= 1e-12 * l2, "{got2} vs {l2}");
    let got1 = total_norm(&arena, &all, NormType::P(1.0), &Parallelism::Global);
    assert!((got1 - l1).abs() <= 1e-12 * l1);
    assert_eq!(
        total_norm(&arena, &all, NormType::Inf, &Parallelism::Global),
        linf
    );
}

#[test]
fn parameters_without_gradients_are_left_out() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    write_grads(&mut arena, 1, &[]);
    let before = arena.grad(h[2]).unwrap().to_vec();
    arena.clear_grad(h[2]);
    let all = [0..arena.num_params()];
    let n_without = total_norm(&arena, &all, NormType::P(2.0), &Parallelism::Sequential);
    clip_grad_norm_with(
        &mut arena,
        &h,
        ClipNorm::new(1e-3),
        &Parallelism::Sequential,
    )
    .unwrap();
    arena.set_grad(h[2], &before).unwrap();
    assert_eq!(
        arena.grad(h[2]).unwrap(),
        &before[..],
        "an absent grad is not clipped"
    );
    let n_with = total_norm(&arena, &all, NormType::P(2.0), &Parallelism::Sequential);
    assert!(n_with > n_without);
}

#[test]
fn error_if_nonfinite_changes_nothing() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    write_grads(&mut arena, 1, &[]);
    arena.grad_mut(h[0])[3] = f32::NAN;
    let before: Vec<u32> = arena.grads().iter().map(|x| x.to_bits()).collect();
    let e =
        clip_grad_norm_all(&mut arena, ClipNorm::new(1.0).error_if_nonfinite(true)).unwrap_err();
    assert!(
        e.to_string()
            .contains("The total norm of order 2.0 for gradients from `parameters` is non-finite"),
        "{e}"
    );
    let after: Vec<u32> = arena.grads().iter().map(|x| x.to_bits()).collect();
    assert_eq!(before, after);
    assert!(NormType::from_f64(-1.0).is_err());
    assert!(NormType::from_f64(f64::NAN).is_err());
}

#[test]
fn clip_takes_handles_and_torch_defaults() {
    // clip_grad_norm over some parameters (handles) touches only those, and equals the norm of
    // their gradients alone; torch's defaults are norm_type=2.0, error_if_nonfinite=False.
    let (mut arena, h) = build_arena::<f64>(&shapes(), 1, &[]);
    write_grads(&mut arena, 1, &[]);
    let before = arena.grads().to_vec();
    let chosen = [h[1], h[3]];
    let want: f64 = chosen
        .iter()
        .flat_map(|&p| arena.grad(p).unwrap().to_vec())
        .map(|g| g * g)
        .sum::<f64>()
        .sqrt();
    let total = clip_grad_norm(&mut arena, &chosen, ClipNorm::new(0.5)).unwrap();
    assert!((total - want).abs() <= 1e-12 * want, "{total} vs {want}");
    let coef = 0.5 / (total + 1e-6);
    for (i, &p) in h.iter().enumerate() {
        let (g, b) = (arena.grad(p).unwrap(), &before[arena.info(p).range()]);
        for (x, y) in g.iter().zip(b) {
            if chosen.contains(&p) {
                assert_eq!(*x, y * coef, "param {i}");
            } else {
                assert_eq!(x, y, "param {i} is not clipped");
            }
        }
    }
    assert_eq!(
        ClipNorm::new(2.0),
        ClipNorm {
            max_norm: 2.0,
            norm_type: NormType::P(2.0),
            error_if_nonfinite: false
        }
    );
    // A handle of another arena is an error, and nothing changes.
    let (other, oh) = build_arena::<f64>(&shapes(), 2, &[]);
    drop(other);
    let snapshot = arena.grads().to_vec();
    let e = clip_grad_norm(&mut arena, &[h[0], oh[1]], ClipNorm::new(1.0)).unwrap_err();
    assert!(e.to_string().contains("another arena"), "{e}");
    let e = clip_grad_value(&mut arena, &[oh[0]], 1.0).unwrap_err();
    assert!(e.to_string().contains("another arena"), "{e}");
    assert_eq!(arena.grads(), &snapshot[..]);
}

#[test]
fn clip_value_clamps() {
    let (mut arena, _) = build_arena::<f64>(&shapes(), 1, &[]);
    write_grads(&mut arena, 1, &[]);
    clip_grad_value_all(&mut arena, 0.25).unwrap();
    assert!(arena.grads().iter().all(|g| g.abs() <= 0.25));
    assert!(arena.grads().iter().any(|g| g.abs() == 0.25));
}

fn adamw(arena: &Arena<f32>, h: &[Param<f32>]) -> AdamW<f32> {
    AdamW::new(
        arena,
        [
            ParamGroup::new(h[..3].iter().copied()),
            ParamGroup::new(h[3..].iter().copied()).with("lr", 0.003),
        ],
        AdamWConfig::default().with_lr(0.01),
    )
    .unwrap()
}

#[test]
fn fused_clip_step_equals_clip_then_step_bitwise() {
    for norm in [NormType::P(2.0), NormType::Inf, NormType::P(1.0)] {
        let (mut a1, h1) = build_arena::<f32>(&shapes(), 1, &[]);
        let (mut a2, h2) = build_arena::<f32>(&shapes(), 1, &[]);
        let mut o1 = adamw(&a1, &h1);
        let mut o2 = adamw(&a2, &h2);
        for t in 1..=4 {
            write_grads(&mut a1, t, &[]);
            write_grads(&mut a2, t, &[]);
            let n1 = clip_grad_norm_all(&mut a1, ClipNorm::new(5.0).norm_type(norm)).unwrap();
            o1.step(&mut a1).unwrap();
            let n2 = o2
                .step_with_options(
                    &mut a2,
                    optarena::StepOptions::new().clipped(ClipNorm {
                        max_norm: 5.0,
                        norm_type: norm,
                        error_if_nonfinite: false,
                    }),
                )
                .unwrap()
                .total_norm
                .unwrap();
            assert_eq!(n1.to_bits(), n2.to_bits());
            assert_eq!(bits(&a1), bits(&a2), "{norm:?} step {t}");
        }
    }
}

#[test]
fn nan_gradient_step_changes_nothing_bit_for_bit() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut opt = adamw(&arena, &h);
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    let (p, s) = (bits(&arena), opt.state_dict());
    write_grads(&mut arena, 2, &[]);
    arena.grad_mut(h[5])[0] = f32::NAN;
    assert_eq!(
        opt.step_with_options(
            &mut arena,
            optarena::StepOptions::new().skipping_non_finite()
        )
        .unwrap()
        .outcome,
        StepOutcome::SkippedNonFinite
    );
    assert_eq!(bits(&arena), p);
    assert_eq!(opt.state_dict(), s);
}

#[test]
fn grad_scaler_unscales_skips_and_adapts() {
    let (mut a1, h1) = build_arena::<f32>(&shapes(), 1, &[]);
    let (mut a2, h2) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut o1 = adamw(&a1, &h1);
    let mut o2 = adamw(&a2, &h2);
    let mut scaler = GradScaler::new(1024.0, 2.0, 0.5, 2).unwrap();
    for t in 1..=3 {
        // Unscaled reference.
        write_grads(&mut a1, t, &[]);
        o1.step(&mut a1).unwrap();
        // Scaled gradients (powers of two scale exactly), unscaled in the step.
        write_grads(&mut a2, t, &[]);
        let s = scaler.scale() as f32;
        a2.grads_mut().iter_mut().for_each(|g| *g *= s);
        assert_eq!(scaler.step(&mut o2, &mut a2).unwrap(), StepOutcome::Applied);
        scaler.update();
        assert_eq!(bits(&a1), bits(&a2), "step {t}");
    }
    assert_eq!(
        scaler.scale(),
        2048.0,
        "grew after growth_interval = 2 applied steps"
    );
    assert_eq!(scaler.growth_tracker(), 1);
    // An overflowed step: skipped, nothing changes, the scale backs off.
    write_grads(&mut a2, 9, &[]);
    a2.grad_mut(h2[2])[7] = f32::INFINITY;
    let (p, st) = (bits(&a2), o2.state_dict());
    assert_eq!(
        scaler.step(&mut o2, &mut a2).unwrap(),
        StepOutcome::SkippedNonFinite
    );
    scaler.update();
    assert_eq!(bits(&a2), p);
    assert_eq!(o2.state_dict(), st);
    assert_eq!(scaler.scale(), 1024.0);
    assert_eq!(scaler.growth_tracker(), 0);
    let json = serde_json::to_string(&scaler).unwrap();
    assert_eq!(serde_json::from_str::<GradScaler>(&json).unwrap(), scaler);
    assert!(GradScaler::new(1.0, 0.5, 0.5, 1).is_err());
    assert!(GradScaler::new(1.0, 2.0, 1.5, 1).is_err());
}

#[test]
fn accumulation_folds_one_over_k_into_the_step() {
    let (mut a1, h1) = build_arena::<f32>(&shapes(), 1, &[]);
    let (mut a2, h2) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut o1 = adamw(&a1, &h1);
    let mut o2 = adamw(&a2, &h2);
    let k = 4;
    // k micro-batches accumulated into the arena's gradients.
    a2.zero_grad(true);
    for micro in 0..k {
        let (mut tmp, _) = build_arena::<f32>(&shapes(), 1, &[]);
        write_grads(&mut tmp, 10 + micro, &[]);
        for p in a2.handles().collect::<Vec<_>>() {
            let src = tmp
                .grad_by_name(&a2.info(p).name)
                .unwrap()
                .unwrap()
                .to_vec();
            a2.grad_mut(p)
                .iter_mut()
                .zip(src)
                .for_each(|(g, s)| *g += s);
        }
    }
    o2.step_with_options(
        &mut a2,
        optarena::StepOptions::new()
            .accumulated(k as usize)
            .unwrap(),
    )
    .unwrap();
    // The same sum, averaged by hand with the same rounding (g * (1/k)), then a plain step.
    let summed = a2.grads().to_vec();
    let inv = 1.0f32 / k as f32;
    a1.grads_mut()
        .iter_mut()
        .zip(&summed)
        .for_each(|(g, s)| *g = s * inv);
    o1.step(&mut a1).unwrap();
    assert_eq!(bits(&a1), bits(&a2));
    let e = optarena::StepOptions::new().accumulated(0).unwrap_err();
    assert_eq!(e.to_string(), "Invalid micro-batch count: 0");
}

#[test]
fn hooks_run_around_applied_steps_and_can_be_removed() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut opt = adamw(&arena, &h);
    let log = Arc::new(Mutex::new(Vec::new()));
    let l1 = log.clone();
    let pre = opt.register_step_pre_hook(move |groups: &mut dyn GroupHyperparams| {
        // Halve group 0's lr before each step, as a scheduler would.
        let lr = groups.lr(0).unwrap();
        groups.set_lr(0, lr / 2.0).unwrap();
        l1.lock().unwrap().push(format!("pre {}", lr / 2.0));
    });
    let l2 = log.clone();
    let post = opt.register_step_post_hook(move |groups: &mut dyn GroupHyperparams| {
        l2.lock()
            .unwrap()
            .push(format!("post {}", groups.num_groups()));
    });
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    arena.grad_mut(h[0])[0] = f32::NAN;
    let outcome = opt
        .step_with_options(
            &mut arena,
            optarena::StepOptions::new().skipping_non_finite(),
        )
        .unwrap()
        .outcome;
    assert_eq!(outcome, StepOutcome::SkippedNonFinite); // skipped: hooks do not run
    assert!(opt.remove_hook(pre));
    assert!(!opt.remove_hook(pre));
    write_grads(&mut arena, 2, &[]);
    opt.step(&mut arena).unwrap();
    assert!(opt.remove_hook(post));
    assert_eq!(*log.lock().unwrap(), ["pre 0.005", "post 2", "post 2"]);
    assert_eq!(opt.lr(0).unwrap(), 0.005);
}
