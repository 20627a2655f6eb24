//! The optimizer machinery, for every algorithm: thread-count determinism, save / load /
//! continue (by position and by name), gradient presence, and the checked step.

mod common;

use std::sync::Arc;

use common::{build_arena, write_grads};
use optarena::optim::*;
use optarena::{
    Algorithm, Arena, ArenaBuilder, Float, Hyperparams, MatchBy, Optimizer, Parallelism, Param,
    ParamGroup, StateDict, StepOutcome,
};

/// Two groups: params 0..3 and 3..6, the largest over the parallel threshold.
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
const BLOCKS: [usize; 2] = [3, 3];

fn groups<T: Float>(
    handles: &[Param<T>],
    group2: &[(&str, optarena::HyperValue)],
) -> Vec<ParamGroup<T>> {
    let mut g2 = ParamGroup::new(handles[3..].iter().copied());
    for (k, v) in group2 {
        g2 = g2.with(k, v.clone());
    }
    vec![ParamGroup::new(handles[..3].iter().copied()), g2]
}

fn snapshot<T: Float>(arena: &Arena<T>) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<_> = arena
        .infos()
        .iter()
        .map(|i| {
            let bits = arena
                .value_by_name(&i.name)
                .unwrap()
                .iter()
                .map(|x| x.to_f64().to_bits())
                .collect();
            (i.name.clone(), bits)
        })
        .collect();
    v.sort();
    v
}

fn run<T: Float, A: Algorithm>(
    config: &A::Config,
    group2: &[(&str, optarena::HyperValue)],
    par: Parallelism,
    steps: u64,
) -> Vec<(String, Vec<u64>)> {
    let (mut arena, h) = build_arena::<T>(&shapes(), 11, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, group2), config.clone())
        .unwrap()
        .with_parallelism(par);
    for t in 1..=steps {
        // Parameter 4 misses its gradient on even steps: it must be skipped, not decayed.
        let skip: &[usize] = if t % 2 == 0 { &[4] } else { &[] };
        write_grads(&mut arena, t, skip);
        opt.step(&mut arena).unwrap();
    }
    snapshot(&arena)
}

fn pool(n: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    ))
}

fn determinism<T: Float, A: Algorithm>(config: A::Config, group2: &[(&str, optarena::HyperValue)]) {
    let seq = run::<T, A>(&config, group2, Parallelism::Sequential, 4);
    for n in [1, 2, 3, 5] {
        assert_eq!(
            seq,
            run::<T, A>(&config, group2, pool(n), 4),
            "{} with {n} threads",
            A::NAME
        );
    }
    assert_eq!(seq, run::<T, A>(&config, group2, Parallelism::Global, 4));
}

fn save_load_continue<T: Float, A: Algorithm>(
    config: A::Config,
    group2: &[(&str, optarena::HyperValue)],
) {
    let uninterrupted = run::<T, A>(&config, group2, Parallelism::Sequential, 7);
    for by in [MatchBy::Position, MatchBy::Name] {
        let (mut arena, h) = build_arena::<T>(&shapes(), 11, &[]);
        let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, group2), config.clone()).unwrap();
        for t in 1..=4 {
            let skip: &[usize] = if t % 2 == 0 { &[4] } else { &[] };
            write_grads(&mut arena, t, skip);
            opt.step(&mut arena).unwrap();
        }
        let json = opt.state_dict_json().unwrap();
        let params: Vec<(String, Vec<T>)> = arena
            .infos()
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    arena.value_by_name(&i.name).unwrap().to_vec(),
                )
            })
            .collect();
        drop(opt);
        drop(arena);
        // A fresh model: by name, registered in another order inside each group.
        let reverse: &[usize] = if by == MatchBy::Name { &BLOCKS } else { &[] };
        let (mut arena, h) = build_arena::<T>(&shapes(), 999, reverse);
        for (name, v) in &params {
            arena.value_by_name_mut(name).unwrap().copy_from_slice(v);
        }
        // Fresh optimizer with other hyperparameters: loading must restore the saved ones.
        let mut opt =
            Optimizer::<T, A>::new(&arena, groups(&h, &[]), A::Config::default()).unwrap();
        opt.load_state_dict_json(&json, by).unwrap();
        assert_eq!(opt.group_config(0).unwrap(), &config);
        for t in 5..=7 {
            let skip: &[usize] = if t % 2 == 0 { &[4] } else { &[] };
            write_grads(&mut arena, t, skip);
            opt.step(&mut arena).unwrap();
        }
        assert_eq!(
            snapshot(&arena),
            uninterrupted,
            "{} resumed by {by:?}",
            A::NAME
        );
        // And the state round-trips exactly.
        let again: StateDict<T> = serde_json::from_str(&opt.state_dict_json().unwrap()).unwrap();
        assert_eq!(again, opt.state_dict());
    }
}

fn non_finite_step_changes_nothing<T: Float, A: Algorithm>(config: A::Config) {
    let (mut arena, h) = build_arena::<T>(&shapes(), 3, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, &[]), config).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    let before_params = snapshot(&arena);
    let before_state = opt.state_dict();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        write_grads(&mut arena, 2, &[]);
        arena.grad_mut(h[2])[1234] = T::from_f64(bad);
        assert_eq!(
            opt.step_with_options(
                &mut arena,
                optarena::StepOptions::new().skipping_non_finite()
            )
            .unwrap()
            .outcome,
            StepOutcome::SkippedNonFinite
        );
        assert_eq!(snapshot(&arena), before_params);
        assert_eq!(opt.state_dict(), before_state);
        assert_eq!(opt.find_non_finite_grad(&arena), Some("p2"));
    }
    write_grads(&mut arena, 2, &[]);
    assert_eq!(
        opt.step_with_options(
            &mut arena,
            optarena::StepOptions::new().skipping_non_finite()
        )
        .unwrap()
        .outcome,
        StepOutcome::Applied
    );
    assert_ne!(snapshot(&arena), before_params);
}

fn missing_grad_is_skipped<T: Float, A: Algorithm>(config: A::Config) {
    let (mut arena, h) = build_arena::<T>(&shapes(), 5, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, &[]), config).unwrap();
    let p1_before = arena.value(h[1]).to_vec();
    for t in 1..=3 {
        write_grads(&mut arena, t, &[1]);
        opt.step(&mut arena).unwrap();
    }
    // torch: no state, no step count, no weight decay for a parameter whose grad is None.
    assert_eq!(arena.value(h[1]), &p1_before[..]);
    assert_eq!(opt.step_count(h[1]), None);
    assert!(opt.state_dict().state.iter().all(|s| s.index != 1));
    if A::TRACKS_STEP {
        assert_eq!(opt.step_count(h[0]), Some(3));
    }
}

macro_rules! api_tests {
    ($modname:ident, $alg:ty, $cfg:ty, [$(($k:literal, $v:expr)),* $(,)?], group2: [$(($k2:literal, $v2:expr)),* $(,)?]) => {
        mod $modname {
            use super::*;
            #[allow(unused_imports)]
            use optarena::HyperValue::*;
            fn config() -> $cfg {
                #[allow(unused_mut)]
                let mut c = <$cfg>::default();
                $( c.set($k, &$v.into()).unwrap(); )*
                c
            }
            fn group2() -> Vec<(&'static str, optarena::HyperValue)> {
                vec![$(($k2, $v2.into())),*]
            }
            #[test] fn thread_count_determinism_f32() { determinism::<f32, $alg>(config(), &group2()); }
            #[test] fn thread_count_determinism_f64() { determinism::<f64, $alg>(config(), &group2()); }
            #[test] fn save_load_continue_f32() { save_load_continue::<f32, $alg>(config(), &group2()); }
            #[test] fn save_load_continue_f64() { save_load_continue::<f64, $alg>(config(), &group2()); }
            #[test] fn non_finite_step_changes_nothing_f32() { non_finite_step_changes_nothing::<f32, $alg>(config()); }
            #[test] fn missing_grad_is_skipped_f32() { missing_grad_is_skipped::<f32, $alg>(config()); }
        }
    };
}

api_tests!(sgd, SGDAlgorithm, SGDConfig,
    [("lr", 0.01), ("momentum", 0.9), ("weight_decay", 0.01), ("nesterov", true)],
    group2: [("lr", 0.003), ("weight_decay", 0.0)]);
api_tests!(adam, AdamAlgorithm, AdamConfig,
    [("lr", 0.01), ("amsgrad", true), ("weight_decay", 0.01)],
    group2: [("lr", 0.003), ("betas", (0.8, 0.99))]);
api_tests!(adamw, AdamWAlgorithm, AdamWConfig,
    [("lr", 0.01)],
    group2: [("weight_decay", 0.2)]);
api_tests!(radam, RAdamAlgorithm, RAdamConfig,
    [("lr", 0.01), ("weight_decay", 0.01), ("decoupled_weight_decay", true)],
    group2: [("eps", 1e-6)]);
api_tests!(nadam, NAdamAlgorithm, NAdamConfig,
    [("lr", 0.01), ("weight_decay", 0.01), ("momentum_decay", 0.006)],
    group2: [("decoupled_weight_decay", true), ("weight_decay", 0.05)]);
api_tests!(adamax, AdamaxAlgorithm, AdamaxConfig,
    [("lr", 0.01), ("weight_decay", 0.01)],
    group2: [("betas", (0.8, 0.99)), ("maximize", true)]);
api_tests!(adagrad, AdagradAlgorithm, AdagradConfig,
    [("lr", 0.05), ("lr_decay", 0.1), ("initial_accumulator_value", 0.1)],
    group2: [("weight_decay", 0.02), ("eps", 1e-6)]);
api_tests!(adadelta, AdadeltaAlgorithm, AdadeltaConfig,
    [("lr", 0.5), ("rho", 0.8), ("weight_decay", 0.01)],
    group2: [("eps", 1e-4), ("maximize", true)]);
api_tests!(rmsprop, RMSpropAlgorithm, RMSpropConfig,
    [("lr", 0.01), ("centered", true), ("momentum", 0.9), ("weight_decay", 0.01)],
    group2: [("momentum", 0.0), ("alpha", 0.9)]);
api_tests!(rprop, RpropAlgorithm, RpropConfig,
    [("lr", 0.02), ("etas", (0.4, 1.3)), ("step_sizes", (1e-4, 0.5))],
    group2: [("lr", 0.001), ("maximize", true)]);
api_tests!(asgd, ASGDAlgorithm, ASGDConfig,
    [("lr", 0.05), ("t0", 2.0), ("lambd", 0.01), ("weight_decay", 0.01)],
    group2: [("t0", 1e6), ("alpha", 0.5)]);
api_tests!(adafactor, AdafactorAlgorithm, AdafactorConfig,
    [("lr", 0.02), ("weight_decay", 0.01), ("d", 1.5)],
    group2: [("beta2_decay", -0.6), ("maximize", true), ("eps", (1e-20, 1e-3))]);

// ---- Algorithm-specific API ----

/// ASGD's averaged parameters: a copy of the iterate while `mu` is 1, then the running mean of
/// the iterates from step `t0 + 2` on.
#[test]
fn asgd_averaged_is_the_running_mean_of_the_iterates() {
    let (mut arena, h) = build_arena::<f64>(&shapes(), 21, &[]);
    let config = ASGDConfig::default().with_lr(0.05).with_t0(3.0);
    let mut opt = ASGD::new(&arena, groups(&h, &[]), config.clone()).unwrap();
    assert!(
        opt.averaged(h[0]).is_none(),
        "no average before the first step"
    );
    assert!(opt.scalars(h[0]).is_none());
    let mut iterates: Vec<Vec<f64>> = Vec::new();
    for t in 1..=12u64 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
        let theta = arena.value(h[3]).to_vec();
        iterates.push(theta.clone());
        let ax = opt.averaged(h[3]).unwrap();
        // Steps 1..=t0+1 use mu = 1: the average is the iterate itself.
        let first = (config.t0 as usize + 2).min(t as usize);
        let window = &iterates[first - 1..];
        for (k, &a) in ax.iter().enumerate() {
            let mean = window.iter().map(|v| v[k]).sum::<f64>() / window.len() as f64;
            // mu is a float32 value (1/3 is not exact), so the weights are off by ~1e-8.
            assert!(
                (a - mean).abs() <= 1e-6 * (1.0 + mean.abs()),
                "step {t}, element {k}: ax {a}, mean of the iterates {mean}"
            );
        }
        if t <= config.t0 as u64 + 1 {
            assert_eq!(ax, &theta[..], "step {t}: ax copies the iterate");
        }
        // The same buffer torch calls state["ax"].
        assert_eq!(Some(ax), opt.buffer(h[3], "ax"));
    }
    // eta and mu live in float32, as torch's 0-dim state tensors.
    let s = opt.scalars(h[3]).unwrap();
    assert_eq!(s.eta, s.eta as f32 as f64);
    assert_eq!(s.mu, (1.0f64 / (12.0 - 3.0)) as f32 as f64);
    assert!(s.eta < config.lr);
    let saved = opt.state_dict();
    assert_eq!(saved.state[0].scalars["eta"], s.eta);
    assert_eq!(saved.state[0].scalars["mu"], s.mu);
}

#[test]
fn asgd_eta_starts_at_lr_rounded_to_f32() {
    let (mut arena, h) = build_arena::<f64>(&shapes(), 22, &[]);
    // lambd = 0: eta stays at lr, read back from float32.
    let config = ASGDConfig::default().with_lr(0.1).with_lambd(0.0);
    let mut opt = ASGD::new(&arena, groups(&h, &[]), config).unwrap();
    let before = arena.value(h[1]).to_vec();
    write_grads(&mut arena, 1, &[]);
    let g = arena.grad(h[1]).unwrap().to_vec();
    opt.step(&mut arena).unwrap();
    let eta = 0.1f32 as f64;
    for ((&p, &p0), &g) in arena.value(h[1]).iter().zip(&before).zip(&g) {
        assert_eq!(p, p0 * 1.0 + (-eta) * g);
    }
    assert_eq!(opt.scalars(h[1]).unwrap().eta, eta);
}

/// Turning RMSprop's momentum off mid-training keeps `square_avg` and `grad_avg` (torch then
/// just stops reading `momentum_buffer`): the same as loading the state without it.
#[test]
fn rmsprop_momentum_switched_off_keeps_the_other_buffers() {
    let config = RMSpropConfig::default()
        .with_centered(true)
        .with_momentum(0.9);
    let (mut arena, h) = build_arena::<f32>(&shapes(), 31, &[]);
    let mut opt = RMSprop::new(&arena, groups(&h, &[]), config.clone()).unwrap();
    for t in 1..=3 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }
    let grad_avg = opt.buffer(h[0], "grad_avg").unwrap().to_vec();
    let mut saved = opt.state_dict();
    let params = arena.params().to_vec();

    opt.set_hyper(0, "momentum", 0.0).unwrap();
    assert_eq!(opt.buffer(h[0], "grad_avg").unwrap(), &grad_avg[..]);
    assert!(opt.buffer(h[0], "momentum_buffer").is_none());
    assert!(
        opt.buffer(h[4], "momentum_buffer").is_some(),
        "group 1 unchanged"
    );
    for t in 4..=6 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }

    // The same run through a checkpoint without the momentum buffers of group 0.
    for st in &mut saved.state {
        if st.index < 3 {
            st.buffers.remove("momentum_buffer");
        }
    }
    saved.param_groups[0]
        .hyperparams
        .insert("momentum".into(), optarena::HyperValue::Number(0.0));
    let (mut arena2, h2) = build_arena::<f32>(&shapes(), 31, &[]);
    arena2.params_mut().copy_from_slice(&params);
    let mut opt2 = RMSprop::new(&arena2, groups(&h2, &[]), config).unwrap();
    opt2.load_state_dict(&saved, MatchBy::Position).unwrap();
    for t in 4..=6 {
        write_grads(&mut arena2, t, &[]);
        opt2.step(&mut arena2).unwrap();
    }
    assert_eq!(snapshot(&arena), snapshot(&arena2));
    assert_eq!(opt.state_dict(), opt2.state_dict());
}

/// Turning momentum on for a centered RMSprop (torch: `KeyError`) starts `momentum_buffer` at
/// zero and keeps `grad_avg`, which sits after it: the same as loading a zero buffer.
#[test]
fn rmsprop_momentum_switched_on_keeps_grad_avg() {
    let config = RMSpropConfig::default().with_centered(true);
    let (mut arena, h) = build_arena::<f64>(&shapes(), 33, &[]);
    let mut opt = RMSprop::new(&arena, groups(&h, &[]), config.clone()).unwrap();
    for t in 1..=3 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }
    let mut saved = opt.state_dict();
    let params = arena.params().to_vec();
    let grad_avg = opt.buffer(h[2], "grad_avg").unwrap().to_vec();
    opt.set_hyper(0, "momentum", 0.5).unwrap();
    assert_eq!(opt.buffer(h[2], "grad_avg").unwrap(), &grad_avg[..]);
    assert!(opt
        .buffer(h[2], "momentum_buffer")
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
    for t in 4..=6 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }

    for st in &mut saved.state {
        if st.index < 3 {
            let n = st.buffers["square_avg"].len();
            st.buffers.insert("momentum_buffer".into(), vec![0.0; n]);
        }
    }
    saved.param_groups[0]
        .hyperparams
        .insert("momentum".into(), optarena::HyperValue::Number(0.5));
    let (mut arena2, h2) = build_arena::<f64>(&shapes(), 33, &[]);
    arena2.params_mut().copy_from_slice(&params);
    let mut opt2 = RMSprop::new(&arena2, groups(&h2, &[]), config).unwrap();
    opt2.load_state_dict(&saved, MatchBy::Position).unwrap();
    for t in 4..=6 {
        write_grads(&mut arena2, t, &[]);
        opt2.step(&mut arena2).unwrap();
    }
    assert_eq!(snapshot(&arena), snapshot(&arena2));
    assert_eq!(opt.state_dict(), opt2.state_dict());
}

/// A config change that drops a buffer leaves a consistent state dict (it used to index past
/// the buffer names).
#[test]
fn dropping_a_buffer_keeps_the_state_dict_consistent() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 32, &[]);
    let config = AdamConfig::default().with_amsgrad(true);
    let mut opt = Adam::new(&arena, groups(&h, &[]), config).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    opt.set_hyper(0, "amsgrad", false).unwrap();
    let sd = opt.state_dict();
    assert!(sd
        .state
        .iter()
        .all(|s| !s.buffers.contains_key("max_exp_avg_sq") || s.index >= 3));
    // Switching it back on starts the buffer afresh, as on first use.
    opt.set_hyper(0, "amsgrad", true).unwrap();
    write_grads(&mut arena, 2, &[]);
    opt.step(&mut arena).unwrap();
    let v = opt.buffer(h[0], "exp_avg_sq").unwrap();
    assert_eq!(opt.buffer(h[0], "max_exp_avg_sq").unwrap(), v);
}

/// SGD's momentum switched on mid-training starts its buffer at the gradient, as torch's
/// `momentum_buffer is None` branch does.
#[test]
fn sgd_momentum_switched_on_starts_at_the_gradient() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 34, &[]);
    let mut opt = SGD::new(&arena, groups(&h, &[]), SGDConfig::default()).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    opt.set_hyper(0, "momentum", 0.9).unwrap();
    write_grads(&mut arena, 2, &[]);
    opt.step(&mut arena).unwrap();
    assert_eq!(
        opt.buffer(h[0], "momentum_buffer").unwrap(),
        arena.grad(h[0]).unwrap()
    );
}

#[test]
fn arena_and_state_buffers_are_64_byte_aligned() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    assert_eq!(arena.params().as_ptr() as usize % 64, 0);
    assert_eq!(arena.grads().as_ptr() as usize % 64, 0);
    let mut opt =
        Optimizer::<f32, AdamAlgorithm>::new(&arena, groups(&h, &[]), AdamConfig::default())
            .unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    // The first parameter of each group starts its group's state buffers.
    for g in [0, 3] {
        for name in ["exp_avg", "exp_avg_sq"] {
            let buf = opt.buffer(h[g], name).unwrap();
            assert_eq!(
                buf.as_ptr() as usize % 64,
                0,
                "{name} of group starting at p{g}"
            );
        }
    }
}

// ---- Adafactor: shaped state, whole-parameter kernels ----

/// Parameters of every kind Adafactor distinguishes: matrices, a batched 3-D tensor, vectors,
/// a scalar, a one-column matrix, and an empty parameter.
fn adafactor_arena<T: Float>(seed: u64) -> (Arena<T>, Vec<Param<T>>) {
    let shapes = vec![
        vec![7, 5],
        vec![5],
        vec![300, 401],
        vec![4, 3, 6],
        vec![],
        vec![129, 1],
        vec![0, 3],
    ];
    build_arena::<T>(&shapes, seed, &[])
}

#[test]
fn adafactor_state_is_factored_by_shape() {
    let (mut arena, h) = adafactor_arena::<f32>(41);
    let mut opt = Adafactor::new(&arena, [ParamGroup::all()], AdafactorConfig::default()).unwrap();
    assert!(
        opt.buffer(h[0], "row_var").is_none(),
        "no state before a step"
    );
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    // torch: row_var has the gradient's shape with the last dim 1, col_var with the
    // second-to-last dim 1; variance the gradient's shape.
    let len = |p: Param<f32>, b: &str| opt.buffer(p, b).map(<[f32]>::len);
    assert_eq!(
        (len(h[0], "row_var"), len(h[0], "col_var")),
        (Some(7), Some(5))
    );
    assert_eq!(len(h[0], "variance"), None);
    assert_eq!(len(h[1], "variance"), Some(5));
    assert_eq!(len(h[1], "row_var"), None);
    assert_eq!(
        (len(h[2], "row_var"), len(h[2], "col_var")),
        (Some(300), Some(401))
    );
    assert_eq!(
        (len(h[3], "row_var"), len(h[3], "col_var")),
        (Some(4 * 3), Some(4 * 6))
    );
    assert_eq!(len(h[4], "variance"), Some(1), "a scalar is not factored");
    assert_eq!(
        (len(h[5], "row_var"), len(h[5], "col_var")),
        (Some(129), Some(1))
    );
    assert_eq!(
        (len(h[6], "row_var"), len(h[6], "col_var")),
        (Some(0), Some(3))
    );
    // Step 1 weighs the new squared gradient by 1: row_var is the mean of g² over each row.
    let g = arena.grad(h[0]).unwrap();
    let row_var = opt.buffer(h[0], "row_var").unwrap();
    for (i, &r) in row_var.iter().enumerate() {
        let mean = g[i * 5..i * 5 + 5].iter().map(|x| x * x).sum::<f32>() / 5.0;
        assert!((r - mean).abs() <= 1e-6 * mean, "row {i}: {r} vs {mean}");
    }
    let sd = opt.state_dict();
    let keys: Vec<Vec<&str>> = sd
        .state
        .iter()
        .map(|s| s.buffers.keys().map(String::as_str).collect())
        .collect();
    assert_eq!(keys[0], ["col_var", "row_var"]);
    assert_eq!(keys[1], ["variance"]);
    assert_eq!(keys[4], ["variance"]);
    assert!(sd.state.iter().all(|s| s.step == Some(1)));
    // The empty parameter has state (and a step count) but is left as it was.
    assert_eq!(sd.state.len(), 7);
    assert_eq!(opt.step_count(h[6]), Some(1));
}

#[test]
fn adafactor_fused_step_equals_the_reference_step() {
    for config in [
        AdafactorConfig::default(),
        AdafactorConfig::default()
            .with_weight_decay(0.05)
            .with_maximize(true)
            .with_eps((Some(1e-10), 1e-2)),
    ] {
        let (mut a1, h) = adafactor_arena::<f32>(42);
        let (mut a2, _) = adafactor_arena::<f32>(42);
        let mut o1 = Adafactor::new(&a1, [ParamGroup::all()], config.clone()).unwrap();
        let mut o2 = Adafactor::new(&a2, [ParamGroup::all()], config.clone()).unwrap();
        for t in 1..=4 {
            let skip: &[usize] = if t == 2 { &[1, 3] } else { &[] };
            write_grads(&mut a1, t, skip);
            write_grads(&mut a2, t, skip);
            o1.step(&mut a1).unwrap();
            o2.step_reference(&mut a2).unwrap();
        }
        assert_eq!(snapshot(&a1), snapshot(&a2));
        assert_eq!(o1.state_dict(), o2.state_dict());
        assert_eq!(o1.step_count(h[1]), Some(3));
    }
}

/// `eps = (None, ε₂)` is `torch.finfo(dtype).eps`: f32's for an f32 model, f64's for f64.
#[test]
fn adafactor_eps1_none_is_the_dtype_epsilon() {
    fn run<T: Float>(eps1: Option<f64>) -> Vec<(String, Vec<u64>)> {
        let (mut arena, _) = adafactor_arena::<T>(43);
        let config = AdafactorConfig::default().with_eps((eps1, 1e-3));
        let mut opt = Adafactor::new(&arena, [ParamGroup::all()], config).unwrap();
        for t in 1..=3 {
            // Tiny gradients on a few elements (between the two epsilons): the estimate is
            // clamped by eps1 there.
            write_grads(&mut arena, t, &[]);
            let infos = arena.infos().to_vec();
            for info in &infos {
                if let Ok(g) = arena.grad_by_name_mut(&info.name) {
                    g.iter_mut().take(10).for_each(|x| *x = T::from_f64(1e-9));
                }
            }
            opt.step(&mut arena).unwrap();
        }
        snapshot(&arena)
    }
    let same = |a: Vec<(String, Vec<u64>)>, b: Vec<(String, Vec<u64>)>| a == b;
    assert!(same(
        run::<f32>(None),
        run::<f32>(Some(f32::EPSILON as f64))
    ));
    assert!(!same(run::<f32>(None), run::<f32>(Some(f64::EPSILON))));
    assert!(same(run::<f64>(None), run::<f64>(Some(f64::EPSILON))));
    assert!(!same(
        run::<f64>(None),
        run::<f64>(Some(f32::EPSILON as f64))
    ));
}

/// The step is scaled by the parameter's RMS *before* weight decay shrinks it (torch computes
/// `alpha` first), checked by hand on a scalar.
#[test]
fn adafactor_scales_by_the_rms_before_weight_decay() {
    let mut b = ArenaBuilder::<f64>::new();
    let p = b.param("p", &[], &[2.0]).unwrap();
    let mut arena = b.build();
    let config = AdafactorConfig::default()
        .with_lr(0.01)
        .with_weight_decay(0.1);
    let mut opt = Adafactor::new(&arena, [ParamGroup::all()], config).unwrap();
    arena.set_grad(p, &[0.5]).unwrap();
    opt.step(&mut arena).unwrap();
    // Step 1: variance = g² = 0.25, U = g / 0.5 = 1, RMS(U) = 1 (no clipping),
    // rho = min(0.01, 1) = 0.01, alpha = max(1e-3, RMS(θ) = 2) · rho = 0.02.
    // θ = 2 (1 − 0.01 · 0.1) − 0.02 · 1.
    assert_eq!(arena.value(p), &[2.0 * (1.0 - 0.01 * 0.1) - 0.02]);
    assert_eq!(opt.buffer(p, "variance").unwrap(), &[0.25]);
}

/// The step options work on Adafactor as on every algorithm: `k` accumulated micro-batches
/// of the same gradient are the plain step (halving is exact).
#[test]
fn adafactor_accumulated_step_equals_the_plain_step() {
    let (mut a1, _) = adafactor_arena::<f32>(44);
    let (mut a2, _) = adafactor_arena::<f32>(44);
    let c = AdafactorConfig::default();
    let mut o1 = Adafactor::new(&a1, [ParamGroup::all()], c.clone()).unwrap();
    let mut o2 = Adafactor::new(&a2, [ParamGroup::all()], c).unwrap();
    for t in 1..=3 {
        write_grads(&mut a1, t, &[]);
        write_grads(&mut a2, t, &[]);
        a2.grads_mut().iter_mut().for_each(|g| *g *= 2.0);
        o1.step(&mut a1).unwrap();
        o2.step_with_options(
            &mut a2,
            optarena::StepOptions::new().accumulated(2).unwrap(),
        )
        .unwrap();
    }
    assert_eq!(snapshot(&a1), snapshot(&a2));
}

/// A checkpoint whose shaped state does not fit is refused, naming the buffer, and nothing
/// changes.
#[test]
fn adafactor_load_checks_the_shaped_state() {
    let (mut arena, _) = adafactor_arena::<f32>(45);
    let mut opt = Adafactor::new(&arena, [ParamGroup::all()], AdafactorConfig::default()).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    let good = opt.state_dict();
    write_grads(&mut arena, 2, &[]);
    opt.step(&mut arena).unwrap();
    let before = opt.state_dict();

    let mut short = good.clone();
    short.state[0].buffers.get_mut("col_var").unwrap().pop();
    let e = opt
        .load_state_dict(&short, MatchBy::Position)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`col_var`") && e.contains("4 values") && e.contains("keeps 5"),
        "{e}"
    );

    let mut unfactored = good.clone();
    let n = unfactored.state[0].buffers["row_var"].len();
    unfactored.state[0].buffers.clear();
    unfactored.state[0]
        .buffers
        .insert("variance".into(), vec![0.0; n]);
    let e = opt
        .load_state_dict(&unfactored, MatchBy::Name)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[\"variance\"]") && e.contains("[\"row_var\", \"col_var\"]"),
        "{e}"
    );
    assert_eq!(
        opt.state_dict(),
        before,
        "a failed load changed the optimizer"
    );

    // The good one loads, and the next step continues from it.
    opt.load_state_dict(&good, MatchBy::Name).unwrap();
    assert_eq!(opt.state_dict(), good);
}

/// `set_grad` with another arena's handle is an error, not a panic, and changes nothing.
#[test]
fn set_grad_with_a_foreign_handle_is_an_error() {
    let mut b = ArenaBuilder::<f32>::new();
    let mine = b.param("w", &[2], &[1.0, 2.0]).unwrap();
    let mut arena = b.build();
    let mut other = ArenaBuilder::<f32>::new();
    let foreign = other.param("w", &[2], &[0.0, 0.0]).unwrap();
    let e = arena.set_grad(foreign, &[0.5, 0.5]).unwrap_err();
    assert!(e.to_string().contains("another arena"), "{e}");
    assert!(!arena.has_grad(mine));
    arena.set_grad(mine, &[0.5, 0.5]).unwrap();
    assert_eq!(arena.grad(mine), Some(&[0.5f32, 0.5][..]));
}

/// The typed `with_*` builders set the same fields as the by-name `with` (what schedulers and
/// Python-style interop use), and start from torch's defaults.
#[test]
fn config_builders_match_by_name_setters() {
    let typed = AdamWConfig::new()
        .with_lr(0.01)
        .with_betas((0.8, 0.95))
        .with_weight_decay(0.1)
        .with_amsgrad(true);
    let by_name = AdamWConfig::default()
        .with("lr", 0.01)
        .and_then(|c| c.with("betas", (0.8, 0.95)))
        .and_then(|c| c.with("weight_decay", 0.1))
        .and_then(|c| c.with("amsgrad", true))
        .unwrap();
    assert_eq!(typed, by_name);
    assert_eq!(
        (typed.lr, typed.betas, typed.eps),
        (0.01, (0.8, 0.95), 1e-8)
    );
    assert_eq!(SGDConfig::new(), SGDConfig::default());
    let sgd = SGDConfig::new().with_momentum(0.9).with_nesterov(true);
    assert_eq!(
        (sgd.lr, sgd.momentum, sgd.nesterov, sgd.dampening),
        (1e-3, 0.9, true, 0.0)
    );
    let sparse = SparseAdamConfig::new().with_eps(1e-6).with_maximize(true);
    assert_eq!((sparse.lr, sparse.eps, sparse.maximize), (1e-3, 1e-6, true));
}

/// A typed override (a closure over the config, checked by the compiler) is the same override
/// as by torch's name: the same configs, the same steps bit for bit.
#[test]
fn typed_group_overrides_equal_overrides_by_name() {
    let (mut a1, h1) = build_arena::<f32>(&shapes(), 1, &[]);
    let (mut a2, h2) = build_arena::<f32>(&shapes(), 1, &[]);
    let defaults = AdamConfig::default().with_lr(1e-2);
    let by_name = [
        ParamGroup::new(h1[..3].iter().copied())
            .with("lr", 1e-3)
            .with("amsgrad", true),
        ParamGroup::new(h1[3..].iter().copied()).with("weight_decay", 0.1),
    ];
    let typed = [
        ParamGroup::new(h2[..3].iter().copied()).configure(|c: &mut AdamConfig| {
            c.lr = 1e-3;
            c.amsgrad = true;
        }),
        // By name and typed, mixed in one group, applied in order.
        ParamGroup::new(h2[3..].iter().copied())
            .with("weight_decay", 0.5)
            .configure(|c: &mut AdamConfig| c.weight_decay = 0.1),
    ];
    let mut o1 = Adam::new(&a1, by_name, defaults.clone()).unwrap();
    let mut o2 = Adam::new(&a2, typed, defaults).unwrap();
    for g in 0..2 {
        assert_eq!(o1.group_config(g).unwrap(), o2.group_config(g).unwrap());
    }
    assert!(o2.group_config(0).unwrap().amsgrad);
    assert_eq!(o2.group_config(1).unwrap().weight_decay, 0.1);
    for t in 0..3 {
        write_grads(&mut a1, t, &[]);
        write_grads(&mut a2, t, &[]);
        o1.step(&mut a1).unwrap();
        o2.step(&mut a2).unwrap();
    }
    assert_eq!(snapshot(&a1), snapshot(&a2));
    assert_eq!(o1.state_dict(), o2.state_dict());
}

/// A typed override is validated as torch's constructor validates (torch's message), and a
/// failed `add_param_group` or `configure_group` changes nothing.
#[test]
fn typed_overrides_are_validated() {
    let (arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    let bad = ParamGroup::new(h[..3].iter().copied()).configure(|c: &mut AdamConfig| c.lr = -1.0);
    let e = Adam::new(&arena, [bad], AdamConfig::default()).unwrap_err();
    assert_eq!(e.to_string(), "Invalid learning rate: -1.0");

    let mut opt = Adam::new(
        &arena,
        [ParamGroup::new(h[..3].iter().copied())],
        AdamConfig::default(),
    )
    .unwrap();
    let bad = ParamGroup::new(h[3..].iter().copied())
        .configure(|c: &mut AdamConfig| c.betas = (1.0, 0.999));
    let e = opt.add_param_group(&arena, bad).unwrap_err();
    assert_eq!(e.to_string(), "Invalid beta parameter at index 0: 1.0");
    assert_eq!(opt.num_groups(), 1);
    let good = ParamGroup::new(h[3..].iter().copied()).configure(|c: &mut AdamConfig| c.lr = 0.5);
    opt.add_param_group(&arena, good).unwrap();
    assert_eq!(opt.lr(1).unwrap(), 0.5);

    let before = opt.group_config(1).unwrap().clone();
    let e = opt.configure_group(1, |c| c.eps = f64::NAN).unwrap_err();
    assert_eq!(e.to_string(), "Invalid epsilon value: NaN");
    assert_eq!(opt.group_config(1).unwrap(), &before);
    opt.configure_group(1, |c| c.maximize = true).unwrap();
    assert!(opt.group_config(1).unwrap().maximize);
    assert!(opt.configure_group(2, |c| c.lr = 0.1).is_err());
    // The inherent lr setter and the by-name one are the same change.
    opt.set_lr(0, 0.25).unwrap();
    assert_eq!(
        opt.hyper(0, "lr").unwrap(),
        optarena::HyperValue::Number(0.25)
    );
}

/// Step options compose as values: scales multiply, accumulation is a `1/k` scale, and the
/// guard and the clip are flags on the same value; the composed step equals the step with the
/// fields written out, bit for bit.
#[test]
fn step_options_compose() {
    use optarena::{ClipNorm, StepOptions};
    let clip = ClipNorm::l2(0.5);
    let composed = StepOptions::new()
        .accumulated(4)
        .unwrap()
        .scaled(0.5)
        .clipped(clip)
        .skipping_non_finite();
    let written = StepOptions {
        grad_scale: 0.125,
        skip_non_finite: true,
        clip: Some(clip),
    };
    assert_eq!(composed, written);
    assert_eq!(StepOptions::new(), StepOptions::default());
    assert_eq!(
        StepOptions::new().accumulated(0).unwrap_err().to_string(),
        "Invalid micro-batch count: 0"
    );

    let (mut a1, h1) = build_arena::<f32>(&shapes(), 1, &[]);
    let (mut a2, h2) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut o1 = Adam::new(&a1, groups(&h1, &[]), AdamConfig::default()).unwrap();
    let mut o2 = Adam::new(&a2, groups(&h2, &[]), AdamConfig::default()).unwrap();
    for t in 0..3 {
        write_grads(&mut a1, t, &[]);
        write_grads(&mut a2, t, &[]);
        let r1 = o1.step_with_options(&mut a1, composed).unwrap();
        let r2 = o2.step_with_options(&mut a2, written).unwrap();
        assert_eq!(r1, r2);
        assert_eq!(r1.outcome, StepOutcome::Applied);
        assert!(r1.total_norm.unwrap() > 0.0);
    }
    assert_eq!(snapshot(&a1), snapshot(&a2));
}

/// The spellings of earlier releases (README's "Naming") are aliases of torch's names, at the
/// paths where they were: code written against them builds and steps the same optimizer.
#[test]
#[allow(deprecated)]
fn old_spellings_alias_torch_names() {
    use optarena::kernels;
    use std::any::TypeId;
    fn same<A: 'static, B: 'static>() -> bool {
        TypeId::of::<A>() == TypeId::of::<B>()
    }
    assert!(same::<optarena::Sgd<f32>, optarena::SGD<f32>>());
    assert!(same::<optarena::SgdConfig, optarena::SGDConfig>());
    assert!(same::<optarena::SgdAlgorithm, optarena::SGDAlgorithm>());
    assert!(same::<optarena::Asgd<f64>, optarena::ASGD<f64>>());
    assert!(same::<optarena::AsgdConfig, optarena::ASGDConfig>());
    assert!(same::<optarena::AsgdAlgorithm, optarena::ASGDAlgorithm>());
    assert!(same::<optarena::AsgdScalars, optarena::ASGDScalars>());
    assert!(same::<optarena::Lbfgs<f32>, optarena::LBFGS<f32>>());
    assert!(same::<optarena::LbfgsConfig, optarena::LBFGSConfig>());
    assert!(same::<optarena::LbfgsState<f64>, optarena::LBFGSState<f64>>());
    assert!(same::<
        optarena::LbfgsStateDict<f64>,
        optarena::LBFGSStateDict<f64>,
    >());
    assert!(same::<kernels::sgd::SgdCoeffs, kernels::sgd::SGDCoeffs>());
    assert!(same::<kernels::asgd::AsgdCoeffs, kernels::asgd::ASGDCoeffs>());
    assert!(same::<
        kernels::nadam::NadamCoeffs,
        kernels::nadam::NAdamCoeffs,
    >());
    assert!(same::<
        kernels::radam::RadamCoeffs,
        kernels::radam::RAdamCoeffs,
    >());
    assert!(same::<
        kernels::rmsprop::RmspropCoeffs,
        kernels::rmsprop::RMSpropCoeffs,
    >());

    // A loop written with the old names, against the same loop with torch's.
    let run = |old: bool| {
        let mut b = ArenaBuilder::<f32>::new();
        let w = b.param("w", &[3], &[1.0, -2.0, 0.5]).unwrap();
        let mut arena = b.build();
        let config = optarena::SgdConfig::default()
            .with_lr(0.1)
            .with_momentum(0.9);
        let mut opt = if old {
            optarena::Sgd::new(&arena, [ParamGroup::all()], config).unwrap()
        } else {
            optarena::SGD::new(&arena, [ParamGroup::all()], config).unwrap()
        };
        for _ in 0..3 {
            arena.grad_mut(w).copy_from_slice(&[0.5, 0.25, -1.0]);
            opt.step(&mut arena).unwrap();
        }
        arena.value(w).to_vec()
    };
    let (old, new) = (run(true), run(false));
    assert_eq!(old, new);
    assert_ne!(new, vec![1.0, -2.0, 0.5], "the steps moved the weights");
}
