//! L-BFGS beyond the torch fixtures: save / load / continue bit for bit, undoing a failed
//! closure, maximize, validation messages, the one-group rule, and the flat-vector kernels.

mod common;

use common::{LBFGSProblem, Rng};
use optarena::kernels::lbfgs as k;
use optarena::{
    Arena, ArenaBuilder, Error, Float, GroupHyperparams, HyperValue, LBFGSConfig, LBFGSStateDict,
    LineSearch, MatchBy, Param, ParamGroup, SimdLevel, LBFGS,
};

/// Rosenbrock over 52 elements split into `a` [5, 5], `b` [12], `c` [15]: vector bodies and
/// scalar tails in every kernel.
const SHAPES: [(&str, &[usize]); 3] = [("a", &[5, 5]), ("b", &[12]), ("c", &[15])];
const N: usize = 52;

fn x0<T: Float>() -> Vec<T> {
    let mut rng = Rng(77);
    (0..N).map(|_| T::from_f64(rng.next_f64() * 0.8)).collect()
}

fn arena_from<T: Float>(values: &[T], order: &[usize]) -> (Arena<T>, Vec<Param<T>>) {
    let mut starts = Vec::new();
    let mut at = 0;
    for (_, s) in SHAPES {
        starts.push(at);
        at += s.iter().product::<usize>();
    }
    let mut b = ArenaBuilder::<T>::new();
    let mut handles = vec![None; SHAPES.len()];
    for &i in order {
        let (name, shape) = SHAPES[i];
        let len: usize = shape.iter().product();
        handles[i] = Some(
            b.param(name, shape, &values[starts[i]..starts[i] + len])
                .unwrap(),
        );
    }
    (b.build(), handles.into_iter().map(Option::unwrap).collect())
}

fn arena<T: Float>() -> Arena<T> {
    arena_from(&x0::<T>(), &[0, 1, 2]).0
}

/// The closure: Rosenbrock of the flat parameters (by name, so registration order does not
/// matter), gradients written to the arena.
fn rosenbrock<T: Float>(a: &mut Arena<T>) -> T {
    let mut x = Vec::with_capacity(N);
    for (name, _) in SHAPES {
        x.extend_from_slice(a.value_by_name(name).unwrap());
    }
    let mut g = vec![T::ZERO; N];
    let f = LBFGSProblem::Rosenbrock.eval(&x, &mut g);
    let mut at = 0;
    for (name, _) in SHAPES {
        let dst = a.grad_by_name_mut(name).unwrap();
        let len = dst.len();
        dst.copy_from_slice(&g[at..at + len]);
        at += len;
    }
    f
}

fn configs() -> Vec<LBFGSConfig> {
    let sw = LineSearch::StrongWolfe;
    vec![
        LBFGSConfig::default(),
        LBFGSConfig::default().with_line_search_fn(sw),
        LBFGSConfig::default()
            .with_history_size(3)
            .with_max_iter(7)
            .with_lr(0.5),
        LBFGSConfig::default()
            .with_history_size(2)
            .with_max_iter(10)
            .with_tolerance_change(1e-12)
            .with_line_search_fn(sw),
        LBFGSConfig::default()
            .with_max_iter(4)
            .with_max_eval(Some(6))
            .with_maximize(false),
    ]
}

fn bits<T: Float>(a: &Arena<T>) -> Vec<u64> {
    a.params().iter().map(|x| x.to_f64().to_bits()).collect()
}

fn save_load_continue<T: Float>() {
    for config in configs() {
        let mut a1 = arena::<T>();
        let mut opt1 = LBFGS::new(&a1, [ParamGroup::all()], config.clone()).unwrap();
        for _ in 0..3 {
            opt1.step(&mut a1, rosenbrock).unwrap();
        }
        let json = opt1.state_dict_json().unwrap();
        // The JSON round trip is exact.
        let parsed: LBFGSStateDict<T> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, opt1.state_dict(), "{config:?}");

        // A fresh arena and optimizer, loaded from the checkpoint.
        let mut a2 = arena::<T>();
        a2.params_mut().copy_from_slice(a1.params());
        let mut opt2 = LBFGS::new(&a2, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
        opt2.load_state_dict_json(&json, MatchBy::Position).unwrap();
        assert_eq!(opt2.config(), opt1.config());
        assert_eq!(opt2.state_dict(), opt1.state_dict());
        for s in 0..4 {
            let l1 = opt1.step(&mut a1, rosenbrock).unwrap();
            let l2 = opt2.step(&mut a2, rosenbrock).unwrap();
            assert_eq!(
                l1.to_f64().to_bits(),
                l2.to_f64().to_bits(),
                "{config:?} step {s}"
            );
            assert_eq!(bits(&a1), bits(&a2), "{config:?} step {s}");
            assert_eq!(opt1.func_evals(), opt2.func_evals());
            assert_eq!(opt1.n_iter(), opt2.n_iter());
        }
        assert_eq!(
            opt1.state_dict_json().unwrap(),
            opt2.state_dict_json().unwrap()
        );
    }
}

#[test]
fn save_load_continue_is_bitwise_f32() {
    save_load_continue::<f32>();
}

#[test]
fn save_load_continue_is_bitwise_f64() {
    save_load_continue::<f64>();
}

#[test]
fn state_dict_holds_torchs_state() {
    let mut a = arena::<f64>();
    let config = LBFGSConfig::default().with_history_size(3).with_max_iter(7);
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], config).unwrap();
    assert!(
        opt.state_dict().state.is_none(),
        "no state before the first step"
    );
    opt.step(&mut a, rosenbrock).unwrap();
    let sd = opt.state_dict();
    let st = sd.state.as_ref().unwrap();
    assert_eq!(st.func_evals, opt.func_evals());
    assert_eq!(st.n_iter, 7);
    assert_eq!(st.d.as_ref().unwrap().len(), N);
    assert_eq!(st.prev_flat_grad.as_ref().unwrap().len(), N);
    let dirs = st.old_dirs.as_ref().unwrap();
    assert_eq!(dirs.len(), 3, "the history is capped at history_size");
    assert_eq!(st.old_stps.as_ref().unwrap().len(), 3);
    assert_eq!(st.ro.as_ref().unwrap().len(), 3);
    assert_eq!(st.al.as_ref().unwrap().len(), 3, "al is history_size long");
    // ro = 1 / (y·s) and H_diag = y·s / y·y of the newest pair (in the dtype).
    let stps = st.old_stps.as_ref().unwrap();
    for ((y, s), ro) in dirs.iter().zip(stps).zip(st.ro.as_ref().unwrap()) {
        assert_eq!(*ro, 1.0 / k::dot(SimdLevel::Best, y, s));
    }
    let (y, s) = (&dirs[2], &stps[2]);
    assert_eq!(
        st.h_diag.unwrap(),
        k::dot(SimdLevel::Best, y, s) / k::dot(SimdLevel::Best, y, y)
    );
    let json = serde_json::to_value(&sd).unwrap();
    for key in [
        "func_evals",
        "n_iter",
        "d",
        "t",
        "old_dirs",
        "old_stps",
        "ro",
        "H_diag",
        "prev_flat_grad",
        "prev_loss",
        "al",
    ] {
        assert!(json["state"].get(key).is_some(), "state has `{key}`");
    }
    assert_eq!(
        json["param_groups"][0]["hyperparams"]["max_eval"],
        8.75f64.floor()
    );
}

#[test]
fn early_return_counts_the_evaluation_only() {
    let mut a = arena::<f32>();
    let config = LBFGSConfig::default().with_tolerance_grad(1e9);
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], config).unwrap();
    let before = bits(&a);
    let loss = opt.step(&mut a, rosenbrock).unwrap();
    assert_eq!(loss, rosenbrock(&mut arena::<f32>()));
    assert_eq!(bits(&a), before);
    let st = opt.state_dict().state.unwrap();
    assert_eq!((st.func_evals, st.n_iter), (1, 0));
    assert!(st.d.is_none() && st.old_dirs.is_none() && st.al.is_none());
}

fn failing_closure_changes_nothing<T: Float>() {
    for config in configs() {
        for fail_at in [1, 2, 5, 9] {
            let mut a = arena::<T>();
            let mut twin_a = arena::<T>();
            let mut opt = LBFGS::new(&a, [ParamGroup::all()], config.clone()).unwrap();
            let mut twin = LBFGS::new(&twin_a, [ParamGroup::all()], config.clone()).unwrap();
            for _ in 0..2 {
                opt.step(&mut a, rosenbrock).unwrap();
                twin.step(&mut twin_a, rosenbrock).unwrap();
            }
            let saved = opt.state_dict_json().unwrap();
            let params = bits(&a);
            let mut calls = 0;
            let r = opt.try_step(&mut a, |a| {
                calls += 1;
                if calls == fail_at {
                    Err("boom")
                } else {
                    Ok(rosenbrock(a))
                }
            });
            if calls < fail_at {
                // The step finished before the failing call.
                r.unwrap();
                continue;
            }
            let e = r.unwrap_err();
            assert!(
                matches!(&e, Error::Closure(m) if m == "boom"),
                "{config:?} at {fail_at}: {e:?}"
            );
            assert_eq!(bits(&a), params, "parameters restored");
            assert_eq!(opt.state_dict_json().unwrap(), saved, "state restored");
            // And the run continues as if the failed step never happened.
            for _ in 0..3 {
                let l1 = opt
                    .try_step(&mut a, |a| Ok::<_, String>(rosenbrock(a)))
                    .unwrap();
                let l2 = twin.step(&mut twin_a, rosenbrock).unwrap();
                assert_eq!(l1.to_f64().to_bits(), l2.to_f64().to_bits());
                assert_eq!(bits(&a), bits(&twin_a), "{config:?} at {fail_at}");
            }
            assert_eq!(
                opt.state_dict_json().unwrap(),
                twin.state_dict_json().unwrap()
            );
        }
    }
}

#[test]
fn failing_closure_changes_nothing_f32() {
    failing_closure_changes_nothing::<f32>();
}

#[test]
fn failing_closure_changes_nothing_f64() {
    failing_closure_changes_nothing::<f64>();
}

fn maximize_matches_minimizing<T: Float>() {
    for config in configs() {
        let mut a1 = arena::<T>();
        let mut a2 = arena::<T>();
        let mut min = LBFGS::new(&a1, [ParamGroup::all()], config.clone()).unwrap();
        let max_config = config.clone().with_maximize(true);
        let mut max = LBFGS::new(&a2, [ParamGroup::all()], max_config).unwrap();
        for _ in 0..4 {
            let l1 = min.step(&mut a1, rosenbrock).unwrap();
            // Maximize -f: the closure reports -f and -grad f.
            let l2 = max
                .step(&mut a2, |a| {
                    let f = rosenbrock(a);
                    for g in a.grads_mut() {
                        *g = -*g;
                    }
                    -f
                })
                .unwrap();
            assert_eq!(
                (-l2).to_f64().to_bits(),
                l1.to_f64().to_bits(),
                "{config:?}"
            );
            assert_eq!(bits(&a1), bits(&a2), "{config:?}");
            assert_eq!(min.func_evals(), max.func_evals());
        }
    }
}

#[test]
fn maximizing_minus_f_is_minimizing_f() {
    maximize_matches_minimizing::<f32>();
    maximize_matches_minimizing::<f64>();
}

#[test]
fn converges_on_rosenbrock() {
    for config in configs() {
        let mut a = arena::<f64>();
        let mut opt = LBFGS::new(&a, [ParamGroup::all()], config.clone()).unwrap();
        for _ in 0..200 {
            opt.step(&mut a, rosenbrock).unwrap();
        }
        let f = rosenbrock(&mut a);
        assert!(f < 1e-6, "{config:?}: f = {f}");
    }
}

#[test]
fn a_parameter_without_gradient_counts_as_zero() {
    let mut a = arena::<f64>();
    let b = a.find("b").unwrap();
    let before = a.value(b).to_vec();
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    for _ in 0..3 {
        opt.step(&mut a, |a| {
            let f = rosenbrock(a);
            a.clear_grad(b);
            f
        })
        .unwrap();
    }
    assert_eq!(a.value(b), &before[..], "torch's zero view: b never moves");
    assert_ne!(a.value_by_name("a").unwrap(), &x0::<f64>()[..25]);
}

#[test]
fn validation_messages() {
    let a = arena::<f32>();
    let new = |c: LBFGSConfig| {
        LBFGS::new(&a, [ParamGroup::all()], c)
            .unwrap_err()
            .to_string()
    };
    let with = |name: &str, v: HyperValue| new(LBFGSConfig::default().with(name, v).unwrap());
    assert_eq!(with("lr", (-1.0).into()), "Invalid learning rate: -1.0");
    assert_eq!(with("lr", f64::NAN.into()), "Invalid learning rate: NaN");
    assert!(with("lr", f64::INFINITY.into()).starts_with("Invalid lr value"));
    assert_eq!(
        with("tolerance_grad", f64::NAN.into()),
        "Invalid tolerance_grad value: NaN"
    );
    assert_eq!(
        with("tolerance_change", f64::NAN.into()),
        "Invalid tolerance_change value: NaN"
    );
    // A line search by name is checked when it is set (torch raises the same error at the
    // first step).
    assert_eq!(
        LBFGSConfig::default()
            .with("line_search_fn", HyperValue::Str("backtracking".into()))
            .unwrap_err()
            .to_string(),
        "only 'strong_wolfe' is supported"
    );
    assert_eq!(
        LBFGSConfig::default()
            .with("line_search_fn", HyperValue::Str("strong_wolfe".into()))
            .unwrap()
            .line_search_fn,
        LineSearch::StrongWolfe
    );
    assert!(with("history_size", 0usize.into()).starts_with("Invalid history_size value: 0"));
    let e = new(LBFGSConfig::default()
        .with_max_eval(Some(0))
        .with_line_search_fn(LineSearch::StrongWolfe));
    assert!(e.starts_with("Invalid max_eval value: 0"), "{e}");
    // max_eval 0 without a line search is what torch runs: one iteration and its
    // re-evaluation (checked with torch 2.15: func_evals 2, n_iter 1).
    let mut a = arena::<f32>();
    let mut opt = LBFGS::new(
        &a,
        [ParamGroup::all()],
        LBFGSConfig::default().with_max_eval(Some(0)),
    )
    .unwrap();
    opt.step(&mut a, rosenbrock).unwrap();
    assert_eq!((opt.func_evals(), opt.n_iter()), (2, 1));
    // Kinds are checked when set.
    let e = LBFGSConfig::default()
        .with("max_eval", HyperValue::Number(2.5))
        .unwrap_err();
    assert!(e.to_string().contains("max_eval"), "{e}");
    assert!(LBFGSConfig::default()
        .with("max_eval", HyperValue::None)
        .is_ok());
    let e = LBFGSConfig::default()
        .with("betas", (0.9, 0.99))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("LBFGS has no hyperparameter `betas`"),
        "{e}"
    );
}

#[test]
fn set_hyper_validates_and_changes_nothing_on_error() {
    let a = arena::<f32>();
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    let before = opt.config().clone();
    assert!(opt.set_hyper("lr", -0.5).is_err());
    assert!(opt
        .set_hyper("line_search_fn", HyperValue::Str("x".into()))
        .is_err());
    assert_eq!(opt.config(), &before);
    // Through the scheduler interface.
    assert_eq!(opt.num_groups(), 1);
    // The trait's names are the other optimizers' (`set_lr(group, lr)`, `lr(group)`); LBFGS's
    // own take no group, so the trait's are called by path.
    GroupHyperparams::set_lr(&mut opt, 0, 0.25).unwrap();
    assert_eq!(GroupHyperparams::lr(&opt, 0).unwrap(), 0.25);
    assert_eq!(opt.lr(), 0.25);
    let e = opt.group_hyper(1, "lr").unwrap_err();
    assert!(
        matches!(e, Error::NoSuchGroup { index: 1, count: 1 }),
        "{e:?}"
    );
    assert!(GroupHyperparams::set_lr(&mut opt, 0, f64::NAN).is_err());
    assert!(GroupHyperparams::set_lr(&mut opt, 1, 0.5).is_err());
    assert!(opt.set_lr(f64::NAN).is_err());
    assert_eq!(opt.lr(), 0.25);
    opt.set_lr(0.5).unwrap();
    assert_eq!(GroupHyperparams::lr(&opt, 0).unwrap(), 0.5);
}

#[test]
fn defaults_are_torchs() {
    let c = LBFGSConfig::default();
    assert_eq!(c.lr, 1.0);
    assert_eq!(c.max_iter, 20);
    assert_eq!(c.max_eval, None);
    assert_eq!(c.tolerance_grad, 1e-7);
    assert_eq!(c.tolerance_change, 1e-9);
    assert_eq!(c.history_size, 100);
    assert_eq!(c.line_search_fn, LineSearch::None);
    assert!(!c.maximize);
    assert_eq!(c.effective_max_eval(), 25);
    let a = arena::<f32>();
    let opt = LBFGS::new(&a, [ParamGroup::all()], c).unwrap();
    // torch fills in max_eval = max_iter * 5 // 4 in the constructor.
    assert_eq!(opt.config().max_eval, Some(25));
    assert_eq!(opt.hyper("max_eval").unwrap(), HyperValue::Number(25.0));
    let c = LBFGSConfig::default().with_max_iter(7);
    assert_eq!(
        LBFGS::new(&a, [ParamGroup::all()], c)
            .unwrap()
            .config()
            .max_eval,
        Some(8)
    );
    // ... from the defaults' max_iter, before the group's overrides (as torch does).
    let opt = LBFGS::new(
        &a,
        [ParamGroup::all().with("max_iter", 100usize).with("lr", 0.5)],
        LBFGSConfig::default(),
    )
    .unwrap();
    assert_eq!(opt.config().max_iter, 100);
    assert_eq!(opt.config().max_eval, Some(25));
    assert_eq!(opt.config().lr, 0.5);
}

#[test]
fn exactly_one_param_group() {
    let (a, h) = arena_from::<f32>(&x0::<f32>(), &[0, 1, 2]);
    let e = LBFGS::new(
        &a,
        [ParamGroup::new([h[0]]), ParamGroup::new([h[1], h[2]])],
        LBFGSConfig::default(),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "LBFGS doesn't support per-parameter options (parameter groups)"
    );
    let none: [ParamGroup<f32>; 0] = [];
    let e = LBFGS::new(&a, none, LBFGSConfig::default()).unwrap_err();
    assert!(matches!(e, Error::EmptyParamList), "{e:?}");
    // A group with a gap is fine: its runs are listed.
    let opt = LBFGS::new(&a, [ParamGroup::new([h[2], h[0]])], LBFGSConfig::default()).unwrap();
    assert_eq!(opt.params(), &[0..1, 2..3]);
    // A sub-range of the arena is fine; the rest is left alone.
    let mut a = a;
    let mut opt = LBFGS::new(&a, [ParamGroup::new([h[1], h[2]])], LBFGSConfig::default()).unwrap();
    assert_eq!(opt.params(), std::slice::from_ref(&(1..3)));
    let before = a.value(h[0]).to_vec();
    opt.step(&mut a, rosenbrock).unwrap();
    assert_eq!(a.value(h[0]), &before[..]);
    assert_ne!(a.value(h[1]), &x0::<f32>()[25..37]);
    // Other arenas are refused.
    let mut other = arena::<f32>();
    assert!(matches!(
        opt.step(&mut other, rosenbrock).unwrap_err(),
        Error::ArenaMismatch(_)
    ));
}

#[test]
fn a_closure_that_replaces_the_arena_is_an_error() {
    let mut a = arena::<f64>();
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    let mut spare = Some(arena::<f64>());
    let e = opt
        .step(&mut a, |a| {
            if let Some(mut s) = spare.take() {
                std::mem::swap(a, &mut s);
            }
            rosenbrock(a)
        })
        .unwrap_err();
    assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
}

#[test]
fn load_by_name_into_a_reordered_arena() {
    let mut a1 = arena::<f64>();
    let mut opt1 = LBFGS::new(&a1, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    opt1.step(&mut a1, rosenbrock).unwrap();
    let saved = opt1.state_dict();
    let (a2, _) = arena_from::<f64>(&x0::<f64>(), &[2, 0, 1]);
    let mut opt2 = LBFGS::new(&a2, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    let e = opt2.load_state_dict(&saved, MatchBy::Position).unwrap_err();
    assert!(e.to_string().contains("has shape"), "{e}");
    opt2.load_state_dict(&saved, MatchBy::Name).unwrap();
    // Each parameter's segment of every vector moved with it.
    let d1 = saved.state.as_ref().unwrap().d.clone().unwrap();
    let d2 = opt2.state_dict().state.unwrap().d.unwrap();
    // a2's layout is c (15), a (25), b (12); a1's is a, b, c.
    assert_eq!(&d2[..15], &d1[37..]);
    assert_eq!(&d2[15..40], &d1[..25]);
    assert_eq!(&d2[40..], &d1[25..37]);
    let names: Vec<_> = opt2.state_dict().param_groups[0]
        .params
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(names, ["c", "a", "b"]);
}

#[test]
fn bad_state_dicts_are_named_and_change_nothing() {
    let mut a = arena::<f32>();
    let config = LBFGSConfig::default().with_history_size(4);
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], config).unwrap();
    opt.step(&mut a, rosenbrock).unwrap();
    opt.step(&mut a, rosenbrock).unwrap();
    let good = opt.state_dict();
    let before = opt.state_dict_json().unwrap();
    let check = |opt: &mut LBFGS<f32>, sd: LBFGSStateDict<f32>, want: &str| {
        let e = opt
            .load_state_dict(&sd, MatchBy::Position)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot load state dict"), "{e}");
        assert!(e.contains(want), "`{e}` should mention `{want}`");
        assert_eq!(
            opt.state_dict_json().unwrap(),
            before,
            "changed by a failed load"
        );
    };
    let mut sd = good.clone();
    sd.optimizer = "Adam".into();
    check(&mut opt, sd, "saved by the Adam optimizer");
    let mut sd = good.clone();
    sd.param_groups.push(sd.param_groups[0].clone());
    check(&mut opt, sd, "2 parameter groups");
    let mut sd = good.clone();
    sd.param_groups[0].params.pop();
    check(&mut opt, sd, "2 parameters in the saved state and 3");
    let mut sd = good.clone();
    sd.param_groups[0].params[1].shape = vec![3, 4];
    check(&mut opt, sd, "has shape [3, 4]");
    let mut sd = good.clone();
    sd.param_groups[0]
        .hyperparams
        .insert("lr".into(), HyperValue::Number(-1.0));
    check(&mut opt, sd, "Invalid learning rate: -1.0");
    let mut sd = good.clone();
    sd.state.as_mut().unwrap().d.as_mut().unwrap().pop();
    check(&mut opt, sd, "`d` has 51 values");
    let mut sd = good.clone();
    sd.state.as_mut().unwrap().old_dirs.as_mut().unwrap()[0].push(1.0);
    check(&mut opt, sd, "`old_dirs[0]` has 53 values");
    let mut sd = good.clone();
    sd.state.as_mut().unwrap().ro.as_mut().unwrap().push(1.0);
    check(&mut opt, sd, "must agree");
    let mut sd = good.clone();
    sd.state.as_mut().unwrap().prev_loss = None;
    check(&mut opt, sd, "but not all");
    let mut sd = good.clone();
    let st = sd.state.as_mut().unwrap();
    for v in [&mut st.old_dirs, &mut st.old_stps] {
        let v = v.as_mut().unwrap();
        while v.len() < 5 {
            v.push(vec![0.5; N]);
        }
    }
    st.ro.as_mut().unwrap().resize(5, 1.0);
    check(&mut opt, sd, "more than history_size 4");
    let e = opt
        .load_state_dict_json("{\"format\": 1}", MatchBy::Position)
        .unwrap_err();
    assert!(matches!(e, Error::Serde { .. }), "{e}");
    assert_eq!(opt.state_dict_json().unwrap(), before);
    // The good one still loads, also into f64.
    opt.load_state_dict(&good, MatchBy::Position).unwrap();
    let a64 = arena::<f64>();
    let mut opt64 = LBFGS::new(&a64, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    opt64.load_state_dict(&good, MatchBy::Position).unwrap();
    assert_eq!(opt64.n_iter(), opt.n_iter());
    assert_eq!(opt64.history_len(), opt.history_len());
}

#[test]
fn zero_elements_just_evaluate() {
    let mut b = ArenaBuilder::<f32>::new();
    b.zeros("empty", &[0]).unwrap();
    let mut a = b.build();
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    assert_eq!(opt.step(&mut a, |_| 3.5).unwrap(), 3.5);
    assert_eq!(opt.func_evals(), 0);
}

/// Replays `tests/data/lbfgs_torch_bitwise.json` (see `scripts/gen_lbfgs_bitwise.py`): 1- to
/// 3-element problems where torch's reductions add left to right, so every loss, parameter
/// and counter must equal torch's bit for bit, in f32 and f64, with and without the line
/// search. This pins torch's mix of Python floats and 0-dim tensors in the line search.
fn replay_bitwise<T: Float>(case: &serde_json::Value) -> Result<(), String> {
    let mut config = LBFGSConfig::default();
    for (key, v) in case["config"].as_object().unwrap() {
        config = config
            .with(key, common::hyper_value(v))
            .map_err(|e| e.to_string())?;
    }
    let maximize = config.maximize;
    let function = case["function"].as_str().unwrap().to_string();
    let x0: Vec<T> = case["x0"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| T::from_f64(v.as_f64().unwrap()))
        .collect();
    let n = x0.len();
    let mut b = ArenaBuilder::<T>::new();
    let x = b.param("x", &[n], &x0).unwrap();
    let mut arena = b.build();
    let mut opt = LBFGS::new(&arena, [ParamGroup::all()], config).unwrap();
    let mut g = vec![T::ZERO; n];
    for (s, r) in case["recs"].as_array().unwrap().iter().enumerate() {
        let loss = opt
            .step(&mut arena, |a| {
                let xv = a.value(x);
                let mut f = if function == "poly" {
                    let c = |v: f64| T::from_f64(v);
                    let xx = xv[0];
                    g[0] = (c(4.0) * xx * xx - c(6.0)) * xx + T::ONE;
                    ((xx * xx - c(3.0)) * xx + T::ONE) * xx
                } else {
                    LBFGSProblem::Rosenbrock.eval(xv, &mut g)
                };
                if maximize {
                    f = -f;
                    g.iter_mut().for_each(|v| *v = -*v);
                }
                a.set_grad(x, &g).unwrap();
                f
            })
            .map_err(|e| e.to_string())?;
        let want_x: Vec<f64> = r["x"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got_x: Vec<f64> = arena.value(x).iter().map(|v| v.to_f64()).collect();
        let got = (loss.to_f64(), got_x, opt.func_evals(), opt.n_iter());
        let want = (
            r["loss"].as_f64().unwrap(),
            want_x,
            r["evals"].as_u64().unwrap(),
            r["n_iter"].as_u64().unwrap(),
        );
        if got.0.to_bits() != want.0.to_bits()
            || got
                .1
                .iter()
                .zip(&want.1)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            || (got.2, got.3) != (want.2, want.3)
        {
            return Err(format!(
                "{} {} {} x0={}: call {}: optarena (loss, x, evals, n_iter) {got:?}, torch {want:?}",
                case["function"],
                case["dtype"],
                case["config"],
                case["x0"],
                s + 1
            ));
        }
    }
    Ok(())
}

#[test]
fn torch_lbfgs_bit_for_bit() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/lbfgs_torch_bitwise.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 200);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| match c["dtype"].as_str().unwrap() {
            "float32" => replay_bitwise::<f32>(c).err(),
            _ => replay_bitwise::<f64>(c).err(),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

const LENGTHS: [usize; 17] = [
    0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 100, 129, 1031,
];

fn vecs<T: Float>(n: usize, seed: u64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut r = Rng(seed);
    (r.vec(n, 2.0), r.vec(n, 2.0), r.vec(n, 2.0))
}

fn same<T: Float>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
}

/// The instruction-set levels this CPU has.
fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .collect()
}

fn kernels_match_reference<T: Float>(level: SimdLevel) {
    let alpha = T::from_f64(-0.37);
    for n in LENGTHS {
        let (x, y, z) = vecs::<T>(n, n as u64 + 1);
        let (mut s, mut r) = (y.clone(), y.clone());
        k::axpy(level, &mut s, alpha, &x);
        k::reference::axpy(&mut r, alpha, &x);
        assert!(same(&s, &r), "axpy n={n}");
        let mut s = vec![T::ZERO; n];
        k::axpy_into(level, &mut s, &y, alpha, &x);
        let mut r = y.clone();
        k::reference::axpy(&mut r, alpha, &x);
        assert!(same(&s, &r), "axpy_into n={n}");
        k::sub_into(level, &mut s, &x, &y);
        k::reference::sub_into(&mut r, &x, &y);
        assert!(same(&s, &r), "sub n={n}");
        k::scale_into(level, &mut s, &x, alpha);
        k::reference::scale_into(&mut r, &x, alpha);
        assert!(same(&s, &r), "scale_into n={n}");
        let mut sc = x.clone();
        k::scale(level, &mut sc, alpha);
        assert!(same(&sc, &r), "scale n={n}");
        k::neg_into(level, &mut s, &x);
        k::reference::neg_into(&mut r, &x);
        assert!(same(&s, &r), "neg n={n}");
        let mut ng = x.clone();
        k::neg(level, &mut ng);
        assert!(same(&ng, &r), "neg in place n={n}");

        // Fused axpy + dot is bitwise the two passes.
        let (mut q1, mut q2) = (y.clone(), y.clone());
        let fused = k::axpy_dot(level, &mut q1, alpha, &x, &z);
        k::axpy(level, &mut q2, alpha, &x);
        let two = k::dot(level, &z, &q2);
        assert!(same(&q1, &q2) && same(&[fused], &[two]), "axpy_dot n={n}");

        // Reductions: within rounding of an f64 sum, and the exact max.
        let eps = if T::DTYPE == "float32" { 1e-5 } else { 1e-13 };
        let scale: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a.to_f64() * b.to_f64()).abs())
            .sum();
        let want = k::reference::dot_f64(&x, &y);
        assert!(
            (k::dot(level, &x, &y).to_f64() - want).abs() <= eps * scale + 1e-300,
            "dot n={n}"
        );
        let want = k::reference::abs_sum_f64(&x);
        assert!(
            (k::abs_sum(level, &x).to_f64() - want).abs() <= eps * want,
            "abs_sum n={n}"
        );
        assert_eq!(
            k::abs_max(level, &x),
            k::reference::abs_max(&x),
            "abs_max n={n}"
        );
        let scaled: Vec<T> = x.iter().map(|&v| v * alpha).collect();
        assert_eq!(
            k::abs_max_scaled(level, &x, alpha),
            k::reference::abs_max(&scaled),
            "abs_max_scaled n={n}"
        );
    }
}

#[test]
fn kernels_match_reference_f32() {
    for level in levels() {
        kernels_match_reference::<f32>(level);
    }
}

#[test]
fn kernels_match_reference_f64() {
    for level in levels() {
        kernels_match_reference::<f64>(level);
    }
}

/// Reductions sum in the same order at every instruction-set level, so they agree bit for bit.
fn reductions_agree_across_levels<T: Float>() {
    let alpha = T::from_f64(0.61);
    for n in LENGTHS {
        let (x, y, z) = vecs::<T>(n, n as u64 + 5);
        let at = |level: SimdLevel| {
            let mut q = y.clone();
            let fused = k::axpy_dot(level, &mut q, alpha, &x, &z);
            let v = [
                k::dot(level, &x, &y),
                k::abs_sum(level, &x),
                k::abs_max(level, &x),
                k::abs_max_scaled(level, &x, alpha),
                fused,
            ];
            (v.map(|v| v.to_f64().to_bits()), q)
        };
        let want = at(SimdLevel::Portable);
        for level in levels() {
            let got = at(level);
            assert_eq!(got.0, want.0, "{level:?} n={n}");
            assert!(same(&got.1, &want.1), "{level:?} n={n}");
        }
    }
}

#[test]
fn reductions_agree_across_levels_f32() {
    reductions_agree_across_levels::<f32>();
}

#[test]
fn reductions_agree_across_levels_f64() {
    reductions_agree_across_levels::<f64>();
}

/// Whole L-BFGS runs (both line searches) are bitwise the same at every level.
#[test]
fn runs_agree_across_levels() {
    for config in configs() {
        let run = |level: SimdLevel| {
            let mut a = arena::<f64>();
            let mut opt = LBFGS::new(&a, [ParamGroup::all()], config.clone())
                .unwrap()
                .with_simd_level(level);
            for _ in 0..3 {
                opt.step(&mut a, rosenbrock).unwrap();
            }
            bits(&a)
        };
        let want = run(SimdLevel::Portable);
        for level in levels() {
            assert_eq!(run(level), want, "{level:?} {config:?}");
        }
    }
}

#[test]
fn abs_max_propagates_nan_at_any_position() {
    for level in levels() {
        abs_max_propagates_nan_at::<f32>(level);
        abs_max_propagates_nan_at::<f64>(level);
    }
    assert_eq!(k::abs_max::<f64>(SimdLevel::Best, &[]), 0.0);
}

fn abs_max_propagates_nan_at<T: Float>(level: SimdLevel) {
    for n in [1usize, 5, 8, 33, 40] {
        for at in [0, n / 2, n - 1] {
            let mut v = vec![T::ONE; n];
            v[at] = T::from_f64(f64::NAN);
            assert!(
                k::abs_max(level, &v).to_f64().is_nan(),
                "{level:?} n={n} at={at}"
            );
            assert!(k::abs_max_scaled(level, &v, T::from_f64(2.0))
                .to_f64()
                .is_nan());
        }
    }
}

/// An f64 JSON state loads into an f32 L-BFGS and back, cast as the typed load casts.
#[test]
fn json_state_casts_across_dtypes() {
    let mut a64 = arena::<f64>();
    let mut opt64 = LBFGS::new(&a64, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    opt64
        .step(&mut a64, &mut |a: &mut Arena<f64>| rosenbrock(a))
        .unwrap();
    let a32 = arena::<f32>();
    let mut from_json = LBFGS::new(&a32, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    from_json
        .load_state_dict_json(&opt64.state_dict_json().unwrap(), MatchBy::Name)
        .unwrap();
    let mut typed = LBFGS::new(&a32, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    typed
        .load_state_dict(&opt64.state_dict(), MatchBy::Name)
        .unwrap();
    assert_eq!(
        from_json.state_dict_json().unwrap(),
        typed.state_dict_json().unwrap()
    );
    let b64 = arena::<f64>();
    let mut back = LBFGS::new(&b64, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    back.load_state_dict_json(&from_json.state_dict_json().unwrap(), MatchBy::Name)
        .unwrap();
    assert_eq!(back.state_dict().dtype, "float64");
}

/// A group with a gap in the arena (`a` and `c` around `b`, which is not optimized) follows
/// exactly the path of the same group registered in one piece (`a`, `c`, then `b`): the flat
/// vector is the group's parameters in arena order either way. Checked bit for bit, with a
/// failing closure undone in between (the snapshot of a fragmented group), and through a
/// state-dict round trip between the two layouts.
#[test]
fn a_fragmented_group_follows_the_contiguous_path() {
    for config in configs() {
        let (mut gap, hg) = arena_from::<f64>(&x0::<f64>(), &[0, 1, 2]);
        let (mut one, ho) = arena_from::<f64>(&x0::<f64>(), &[0, 2, 1]);
        let mut opt_gap =
            LBFGS::new(&gap, [ParamGroup::new([hg[0], hg[2]])], config.clone()).unwrap();
        let mut opt_one =
            LBFGS::new(&one, [ParamGroup::new([ho[0], ho[2]])], config.clone()).unwrap();
        assert_eq!(opt_gap.params(), &[0..1, 2..3]);
        assert_eq!(opt_one.params(), std::slice::from_ref(&(0..2)));
        let b_before = gap.value(hg[1]).to_vec();
        let same = |gap: &Arena<f64>, one: &Arena<f64>| {
            for (name, _) in SHAPES {
                let x: Vec<u64> = gap
                    .value_by_name(name)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let y: Vec<u64> = one
                    .value_by_name(name)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(x, y, "{name} {config:?}");
            }
        };
        for s in 0..3 {
            let l1 = opt_gap.step(&mut gap, rosenbrock).unwrap();
            let l2 = opt_one.step(&mut one, rosenbrock).unwrap();
            assert_eq!(l1.to_bits(), l2.to_bits(), "{config:?} step {s}");
            same(&gap, &one);
            assert_eq!(opt_gap.func_evals(), opt_one.func_evals());
            let d1: Option<Vec<u64>> = opt_gap
                .direction()
                .map(|d| d.iter().map(|v| v.to_bits()).collect());
            let d2: Option<Vec<u64>> = opt_one
                .direction()
                .map(|d| d.iter().map(|v| v.to_bits()).collect());
            assert_eq!(d1, d2, "{config:?} step {s}");
        }
        assert_eq!(gap.value(hg[1]), &b_before[..], "b is not in the group");
        // A closure that fails on its second call: both undo the step, to the same bits.
        for (opt, a) in [(&mut opt_gap, &mut gap), (&mut opt_one, &mut one)] {
            let before = bits(a);
            let mut calls = 0;
            let e = opt.try_step(a, |a| {
                calls += 1;
                if calls == 2 {
                    Err("fail")
                } else {
                    Ok(rosenbrock(a))
                }
            });
            if e.is_err() {
                assert_eq!(bits(a), before, "{config:?}");
            }
        }
        same(&gap, &one);
        // Each layout's state loads into the other by name and continues identically.
        let json = opt_gap.state_dict_json().unwrap();
        let mut opt_one2 =
            LBFGS::new(&one, [ParamGroup::new([ho[2], ho[0]])], config.clone()).unwrap();
        opt_one2.load_state_dict_json(&json, MatchBy::Name).unwrap();
        let l1 = opt_gap.step(&mut gap, rosenbrock).unwrap();
        let l2 = opt_one2.step(&mut one, rosenbrock).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits(), "{config:?}");
        same(&gap, &one);
    }
}

/// `LineSearch` by torch's value: `"strong_wolfe"` / `None` in state dicts and serde, the
/// typed enum in Rust; a saved unknown name is torch's error, and the load changes nothing.
#[test]
fn line_search_is_an_enum_with_torchs_names() {
    let config = LBFGSConfig::default().with_line_search_fn(LineSearch::StrongWolfe);
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["line_search_fn"], "strong_wolfe");
    let back: LBFGSConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
    let none = serde_json::to_value(LBFGSConfig::default()).unwrap();
    assert!(none["line_search_fn"].is_null());
    let e = serde_json::from_value::<LBFGSConfig>(serde_json::json!({"line_search_fn": "x"}))
        .unwrap_err();
    assert!(
        e.to_string().contains("only 'strong_wolfe' is supported"),
        "{e}"
    );
    assert_eq!(LineSearch::StrongWolfe.torch_name(), Some("strong_wolfe"));
    assert_eq!(LineSearch::from_torch_name(None).unwrap(), LineSearch::None);

    // Through a state dict: saved as torch's string, loaded back as the enum.
    let mut a = arena::<f64>();
    let mut opt = LBFGS::new(&a, [ParamGroup::all()], config.clone()).unwrap();
    opt.step(&mut a, rosenbrock).unwrap();
    let sd = serde_json::to_value(opt.state_dict()).unwrap();
    assert_eq!(
        sd["param_groups"][0]["hyperparams"]["line_search_fn"],
        "strong_wolfe"
    );
    let mut fresh = LBFGS::new(&a, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    fresh
        .load_state_dict_json(&sd.to_string(), MatchBy::Name)
        .unwrap();
    assert_eq!(fresh.config().line_search_fn, LineSearch::StrongWolfe);
    let mut bad = sd.clone();
    bad["param_groups"][0]["hyperparams"]["line_search_fn"] = "backtracking".into();
    let mut target = LBFGS::new(&a, [ParamGroup::all()], LBFGSConfig::default()).unwrap();
    let before = target.state_dict();
    let e = target
        .load_state_dict_json(&bad.to_string(), MatchBy::Name)
        .unwrap_err();
    assert!(
        e.to_string().contains("only 'strong_wolfe' is supported"),
        "{e}"
    );
    assert_eq!(target.state_dict(), before);
    // A typed override for L-BFGS's one group.
    let typed = ParamGroup::all().configure(|c: &mut LBFGSConfig| {
        c.line_search_fn = LineSearch::StrongWolfe;
        c.history_size = 7;
    });
    let opt = LBFGS::new(&a, [typed], LBFGSConfig::default()).unwrap();
    assert_eq!(opt.config().line_search_fn, LineSearch::StrongWolfe);
    assert_eq!(opt.config().history_size, 7);
}
