//! Every validation error, with torch's message where torch has one, and the promise that a
//! failed call changes nothing.

use optarena::optim::*;
use optarena::{Arena, ArenaBuilder, Error, HyperValue, MatchBy, Param, ParamGroup};

fn arena() -> (Arena<f32>, Vec<Param<f32>>) {
    let mut b = ArenaBuilder::<f32>::new();
    let h = vec![
        b.param("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap(),
        b.param("b", &[3], &[1.0, 2.0, 3.0]).unwrap(),
        b.param("c", &[1], &[5.0]).unwrap(),
    ];
    (b.build(), h)
}

fn msg<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    r.expect_err("expected an error").to_string()
}

fn adam_with(name: &str, v: impl Into<HyperValue>) -> String {
    let (arena, _) = arena();
    msg(Adam::new(
        &arena,
        [ParamGroup::all()],
        AdamConfig::default().with(name, v).unwrap(),
    ))
}

fn sgd_with(pairs: &[(&str, HyperValue)]) -> String {
    let (arena, _) = arena();
    let mut c = SGDConfig::default();
    for (k, v) in pairs {
        c = c.with(k, v.clone()).unwrap();
    }
    msg(SGD::new(&arena, [ParamGroup::all()], c))
}

#[test]
fn torch_messages_for_invalid_values() {
    assert!(adam_with("lr", -1.0).contains("Invalid learning rate: -1"));
    assert!(adam_with("eps", -1e-8).contains("Invalid epsilon value"));
    assert!(adam_with("betas", (1.0, 0.999)).contains("Invalid beta parameter at index 0: 1.0"));
    assert!(adam_with("betas", (0.9, -0.1)).contains("Invalid beta parameter at index 1: -0.1"));
    assert!(adam_with("weight_decay", -0.1).contains("Invalid weight_decay value"));
    assert!(sgd_with(&[("momentum", (-0.5).into())]).contains("Invalid momentum value"));
    assert_eq!(
        sgd_with(&[("nesterov", true.into())]),
        "Nesterov momentum requires a momentum and zero dampening"
    );
    assert_eq!(
        sgd_with(&[
            ("nesterov", true.into()),
            ("momentum", 0.9.into()),
            ("dampening", 0.1.into())
        ]),
        "Nesterov momentum requires a momentum and zero dampening"
    );
}

#[test]
fn nan_is_rejected_everywhere() {
    for name in ["lr", "eps", "weight_decay"] {
        let m = adam_with(name, f64::NAN);
        assert!(m.starts_with("Invalid") && m.contains("NaN"), "{name}: {m}");
    }
    assert!(adam_with("betas", (f64::NAN, 0.9)).contains("Invalid beta parameter at index 0: NaN"));
    for name in ["lr", "momentum", "dampening", "weight_decay"] {
        let m = sgd_with(&[(name, f64::NAN.into())]);
        assert!(m.starts_with("Invalid") && m.contains("NaN"), "{name}: {m}");
    }
    let (arena, _) = arena();
    let m = msg(RAdam::new(
        &arena,
        [ParamGroup::all()],
        RAdamConfig::default().with_eps(f64::NAN),
    ));
    assert!(m.contains("Invalid epsilon value: NaN"), "{m}");
}

#[test]
fn invalid_values_in_an_added_group() {
    let (arena, h) = arena();
    let mut opt = Adam::new(&arena, [ParamGroup::new([h[0]])], AdamConfig::default()).unwrap();
    let e = msg(opt.add_param_group(&arena, ParamGroup::new([h[1]]).with("lr", -1.0)));
    assert!(e.contains("Invalid learning rate: -1"), "{e}");
    let e = msg(opt.add_param_group(&arena, ParamGroup::new([h[1]]).with("betas", (0.9, 1.0))));
    assert!(e.contains("Invalid beta parameter at index 1: 1.0"), "{e}");
    assert_eq!(opt.num_groups(), 1, "a rejected group is not added");
    opt.add_param_group(&arena, ParamGroup::new([h[1]]).with("lr", 0.5))
        .unwrap();
    assert_eq!(opt.lr(1).unwrap(), 0.5);
    assert_eq!(opt.lr(0).unwrap(), 1e-3);
}

#[test]
fn empty_parameter_lists() {
    let (arena, _) = arena();
    let none: [ParamGroup<f32>; 0] = [];
    assert_eq!(
        msg(Adam::new(&arena, none, AdamConfig::default())),
        "optimizer got an empty parameter list"
    );
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::new([])],
        AdamConfig::default(),
    ));
    assert_eq!(e, "optimizer got an empty parameter list");
}

#[test]
fn parameter_in_two_groups_or_twice_in_one() {
    let (arena, h) = arena();
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::new([h[0], h[1]]), ParamGroup::new([h[1], h[2]])],
        AdamConfig::default(),
    ));
    assert!(
        e.contains("some parameters appear in more than one parameter group"),
        "{e}"
    );
    assert!(e.contains("`b`"), "names the parameter: {e}");
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::new([h[0], h[0]])],
        AdamConfig::default(),
    ));
    assert!(
        e.contains("duplicate parameters") && e.contains("`a`"),
        "{e}"
    );
    let mut opt = SGD::new(&arena, [ParamGroup::new([h[0]])], SGDConfig::default()).unwrap();
    let e = msg(opt.add_param_group(&arena, ParamGroup::new([h[0]])));
    assert!(e.contains("more than one parameter group"), "{e}");
}

#[test]
fn a_group_may_have_gaps_and_overlap_is_found_in_sets() {
    let (arena, h) = arena();
    // `a` and `c` around `b`: accepted, stepped as two runs.
    let mut opt = Adam::new(
        &arena,
        [ParamGroup::new([h[2], h[0]])],
        AdamConfig::default(),
    )
    .unwrap();
    assert_eq!(opt.group_params(0).unwrap(), &[0..1, 2..3]);
    let handles: Vec<usize> = opt.group_handles(0).unwrap().map(|p| p.index()).collect();
    assert_eq!(handles, [0, 2]);
    // The gap's parameter can join another group, and `all` is one run.
    opt.add_param_group(&arena, ParamGroup::new([h[1]]))
        .unwrap();
    assert_eq!(opt.group_params(1).unwrap(), std::slice::from_ref(&(1..2)));
    let all = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
    assert_eq!(all.group_params(0).unwrap(), std::slice::from_ref(&(0..3)));
    // Groups whose spans interleave but whose sets are disjoint are fine; a shared parameter
    // inside the other group's gap is found and named.
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::new([h[0], h[2]]), ParamGroup::new([h[1], h[2]])],
        AdamConfig::default(),
    ));
    assert!(
        e.contains("more than one parameter group") && e.contains("`c`"),
        "{e}"
    );
    assert!(matches!(
        opt.group_params(2).unwrap_err(),
        Error::NoSuchGroup { index: 2, count: 2 }
    ));
}

#[test]
fn unknown_hyperparameter_names() {
    let (arena, _) = arena();
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::all().with("momentum", 0.9)],
        AdamConfig::default(),
    ));
    assert!(
        e.contains("Adam has no hyperparameter `momentum`") && e.contains("betas"),
        "{e}"
    );
    let e = msg(AdamConfig::default().with("nesterov", true));
    assert!(e.contains("no hyperparameter `nesterov`"), "{e}");
    let e = msg(AdamConfig::default().with("lr", true));
    assert!(e.contains("`lr` expects a number"), "{e}");
    let mut opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::default()).unwrap();
    let e = msg(opt.set_hyper(0, "betas", (0.9, 0.99)));
    assert!(e.contains("SGD has no hyperparameter `betas`"), "{e}");
    let e = msg(opt.set_hyper(3, "lr", 0.1));
    assert!(e.contains("no parameter group 3"), "{e}");
}

#[test]
fn set_hyper_validates_and_changes_nothing_on_error() {
    let (arena, _) = arena();
    let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
    let before = opt.group_config(0).unwrap().clone();
    assert!(msg(opt.set_hyper(0, "lr", -0.5)).contains("Invalid learning rate"));
    assert!(msg(opt.set_hyper(0, "eps", f64::NAN)).contains("Invalid epsilon value"));
    assert_eq!(opt.group_config(0).unwrap(), &before);
    opt.set_lr(0, 0.25).unwrap();
    assert_eq!(opt.lr(0).unwrap(), 0.25);
    assert_eq!(opt.hyper(0, "amsgrad").unwrap(), HyperValue::Bool(false));
}

#[test]
fn unknown_names_and_foreign_arenas() {
    let (arena, _) = arena();
    let (other, oh) = arena_pair();
    assert_eq!(msg(arena.find("zzz")), "no parameter named `zzz`");
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::named(["a", "zzz"])],
        AdamConfig::default(),
    ));
    assert_eq!(e, "no parameter named `zzz`");
    let e = msg(Adam::new(
        &arena,
        [ParamGroup::new([oh])],
        AdamConfig::default(),
    ));
    assert!(e.contains("another arena"), "{e}");
    let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
    let mut other = other;
    assert!(msg(opt.step(&mut other)).contains("built for another arena"));
}

fn arena_pair() -> (Arena<f32>, Param<f32>) {
    let mut b = ArenaBuilder::<f32>::new();
    let p = b.param("a", &[1], &[0.0]).unwrap();
    (b.build(), p)
}

#[test]
fn registration_errors() {
    let mut b = ArenaBuilder::<f64>::new();
    b.param("w", &[2], &[1.0, 2.0]).unwrap();
    assert_eq!(
        msg(b.param("w", &[1], &[1.0])),
        "a parameter named `w` is already registered"
    );
    let e = msg(b.param("v", &[2, 3], &[1.0; 5]));
    assert_eq!(e, "parameter `v` has shape [2, 3] (6 values), got 5 values");
    let mut arena = b.build();
    let w = arena.find("w").unwrap();
    assert!(msg(arena.set_grad(w, &[1.0])).contains("got 1 values"));
}

#[test]
fn defaults_are_torchs() {
    // burn's defaults differ (eps 1e-5, dampening 0.1); ours are torch's.
    let a = AdamConfig::default();
    assert_eq!(
        (a.lr, a.betas, a.eps, a.weight_decay),
        (1e-3, (0.9, 0.999), 1e-8, 0.0)
    );
    assert!(!a.amsgrad && !a.maximize && !a.decoupled_weight_decay);
    let w = AdamWConfig::default();
    assert_eq!((w.weight_decay, w.decoupled_weight_decay), (1e-2, true));
    let s = SGDConfig::default();
    assert_eq!(
        (s.lr, s.momentum, s.dampening, s.weight_decay, s.nesterov),
        (1e-3, 0.0, 0.0, 0.0, false)
    );
    let r = RAdamConfig::default();
    assert_eq!(
        (
            r.lr,
            r.betas,
            r.eps,
            r.weight_decay,
            r.decoupled_weight_decay
        ),
        (1e-3, (0.9, 0.999), 1e-8, 0.0, false)
    );
}

fn stepped_adam() -> (Arena<f32>, Vec<Param<f32>>, Adam<f32>) {
    let (mut arena, h) = arena();
    let mut opt = Adam::new(
        &arena,
        [
            ParamGroup::new([h[0], h[1]]),
            ParamGroup::new([h[2]]).with("lr", 0.1),
        ],
        AdamConfig::default(),
    )
    .unwrap();
    for p in &h {
        arena.grad_mut(*p).fill(0.5);
    }
    opt.step(&mut arena).unwrap();
    (arena, h, opt)
}

#[test]
fn load_state_dict_names_each_mismatch_and_changes_nothing() {
    let (_, _, opt) = stepped_adam();
    let good = opt.state_dict();
    let (_, _, mut target) = stepped_adam();
    target.set_lr(0, 0.7).unwrap();
    let before = target.state_dict();

    let mut sd = good.clone();
    sd.optimizer = "SGD".into();
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position))
        .contains("saved by the SGD optimizer, this is Adam"));

    let mut sd = good.clone();
    sd.param_groups.pop();
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position))
        .contains("it has 1 parameter groups, the optimizer has 2"));

    let mut sd = good.clone();
    sd.param_groups[0].params.pop();
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position))
        .contains("group 0 has 1 parameters in the saved state and 2"));

    let mut sd = good.clone();
    sd.param_groups[0].params[1].shape = vec![4];
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position))
        .contains("has shape [4] in the saved state"));

    let mut sd = good.clone();
    sd.state[1].buffers.get_mut("exp_avg").unwrap().pop();
    let e = msg(target.load_state_dict(&sd, MatchBy::Position));
    assert!(
        e.contains("buffer `exp_avg` of parameter `b` has 2 values, the parameter has 3"),
        "{e}"
    );

    let mut sd = good.clone();
    sd.param_groups[1].params[0].name = "zzz".into();
    assert!(msg(target.load_state_dict(&sd, MatchBy::Name))
        .contains("group 1 has no parameter named `zzz`"));

    let mut sd = good.clone();
    sd.param_groups[1]
        .hyperparams
        .insert("momentum".into(), HyperValue::Number(0.9));
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position))
        .contains("no hyperparameter `momentum`"));

    let mut sd = good.clone();
    sd.param_groups[0]
        .hyperparams
        .insert("lr".into(), HyperValue::Number(-1.0));
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position)).contains("Invalid learning rate"));

    let mut sd = good.clone();
    sd.state[0].step = None;
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position)).contains("has no step count"));

    let mut sd = good.clone();
    // A leading buffer missing is refused (a trailing one may legitimately be absent: a setting
    // that adds it was switched on after the state was made).
    sd.state[0].buffers.remove("exp_avg");
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position))
        .contains("has buffers [\"exp_avg_sq\"]"));

    let mut sd = good.clone();
    sd.format = 99;
    assert!(msg(target.load_state_dict(&sd, MatchBy::Position)).contains("format version 99"));

    assert!(
        msg(target.load_state_dict_json("{not json", MatchBy::Position))
            .starts_with("serialisation:")
    );

    assert_eq!(target.state_dict(), before, "failed loads changed nothing");
    target.load_state_dict(&good, MatchBy::Position).unwrap();
    assert_eq!(target.state_dict(), good);
}

#[test]
fn f64_state_loads_into_f32_optimizer() {
    let mut b = ArenaBuilder::<f64>::new();
    let p = b.param("a", &[2], &[1.0, 2.0]).unwrap();
    let mut a64 = b.build();
    let mut o64 = Adam::new(&a64, [ParamGroup::all()], AdamConfig::default()).unwrap();
    a64.set_grad(p, &[0.1, 0.2]).unwrap();
    o64.step(&mut a64).unwrap();
    let sd = o64.state_dict();
    let mut b = ArenaBuilder::<f32>::new();
    b.param("a", &[2], &[1.0, 2.0]).unwrap();
    let a32 = b.build();
    let mut o32 = Adam::new(&a32, [ParamGroup::all()], AdamConfig::default()).unwrap();
    o32.load_state_dict(&sd, MatchBy::Name).unwrap();
    let got = o32.state_dict();
    let want: Vec<f32> = sd.state[0].buffers["exp_avg"]
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(got.state[0].buffers["exp_avg"], want);
    assert_eq!(got.state[0].step, Some(1));
}

/// Builds an optimizer of algorithm `A` over every parameter with `pairs` set on its
/// defaults, and returns the error message (the values are set unchecked, then validated by
/// the constructor, as torch's `__init__` checks them).
fn msg_of<A: optarena::Algorithm>(pairs: &[(&str, HyperValue)]) -> String
where
    A::Config: optarena::Hyperparams,
{
    use optarena::Hyperparams;
    let (arena, _) = arena();
    let mut c = A::Config::default();
    for (k, v) in pairs {
        c.set(k, v).unwrap();
    }
    msg(optarena::Optimizer::<f32, A>::new(
        &arena,
        [ParamGroup::all()],
        c,
    ))
}

#[test]
fn torch_messages_nadam_adamax_adagrad_adadelta() {
    use HyperValue::*;
    // NAdam
    assert_eq!(
        msg_of::<NAdamAlgorithm>(&[("momentum_decay", Number(-0.1))]),
        "Invalid momentum_decay value: -0.1"
    );
    assert_eq!(
        msg_of::<NAdamAlgorithm>(&[("lr", Number(-1.0))]),
        "Invalid learning rate: -1.0"
    );
    assert_eq!(
        msg_of::<NAdamAlgorithm>(&[("betas", Pair(0.9, 1.0))]),
        "Invalid beta parameter at index 1: 1.0"
    );
    assert_eq!(
        msg_of::<NAdamAlgorithm>(&[("eps", Number(-1e-8))]),
        "Invalid epsilon value: -1e-8"
    );
    assert_eq!(
        msg_of::<NAdamAlgorithm>(&[("weight_decay", Number(-0.1))]),
        "Invalid weight_decay value: -0.1"
    );
    // Adamax
    assert_eq!(
        msg_of::<AdamaxAlgorithm>(&[("betas", Pair(-0.1, 0.999))]),
        "Invalid beta parameter at index 0: -0.1"
    );
    assert_eq!(
        msg_of::<AdamaxAlgorithm>(&[("eps", Number(-1.0))]),
        "Invalid epsilon value: -1.0"
    );
    assert_eq!(
        msg_of::<AdamaxAlgorithm>(&[("weight_decay", Number(-1.0))]),
        "Invalid weight_decay value: -1.0"
    );
    assert_eq!(
        msg_of::<AdamaxAlgorithm>(&[("lr", Number(-0.5))]),
        "Invalid learning rate: -0.5"
    );
    // Adagrad, in torch's order of checks.
    assert_eq!(
        msg_of::<AdagradAlgorithm>(&[("lr_decay", Number(-0.5))]),
        "Invalid lr_decay value: -0.5"
    );
    assert_eq!(
        msg_of::<AdagradAlgorithm>(&[("initial_accumulator_value", Number(-1.0))]),
        "Invalid initial_accumulator_value value: -1.0"
    );
    assert_eq!(
        msg_of::<AdagradAlgorithm>(&[("eps", Number(-1e-10))]),
        "Invalid epsilon value: -1e-10"
    );
    assert_eq!(
        msg_of::<AdagradAlgorithm>(&[
            ("weight_decay", Number(-1.0)),
            ("initial_accumulator_value", Number(-1.0))
        ]),
        "Invalid weight_decay value: -1.0"
    );
    assert_eq!(
        msg_of::<AdagradAlgorithm>(&[("lr", Number(-0.01)), ("lr_decay", Number(-1.0))]),
        "Invalid learning rate: -0.01"
    );
    // Adadelta: 0 <= rho <= 1, both ends allowed.
    assert_eq!(
        msg_of::<AdadeltaAlgorithm>(&[("rho", Number(1.1))]),
        "Invalid rho value: 1.1"
    );
    assert_eq!(
        msg_of::<AdadeltaAlgorithm>(&[("rho", Number(-0.1))]),
        "Invalid rho value: -0.1"
    );
    assert_eq!(
        msg_of::<AdadeltaAlgorithm>(&[("eps", Number(-1e-6))]),
        "Invalid epsilon value: -1e-6"
    );
    assert_eq!(
        msg_of::<AdadeltaAlgorithm>(&[("weight_decay", Number(-0.1))]),
        "Invalid weight_decay value: -0.1"
    );
    assert_eq!(
        msg_of::<AdadeltaAlgorithm>(&[("lr", Number(-1.0))]),
        "Invalid learning rate: -1.0"
    );
    let (arena, _) = arena();
    for rho in [0.0, 1.0] {
        let c = AdadeltaConfig::default().with_rho(rho);
        Adadelta::new(&arena, [ParamGroup::all()], c).unwrap();
    }
}

#[test]
fn nan_is_rejected_by_nadam_adamax_adagrad_adadelta() {
    let nan = || HyperValue::Number(f64::NAN);
    let check = |m: String, what: &str| {
        assert!(m.starts_with("Invalid") && m.contains("NaN"), "{what}: {m}");
    };
    for name in ["lr", "eps", "weight_decay", "momentum_decay"] {
        check(msg_of::<NAdamAlgorithm>(&[(name, nan())]), name);
    }
    check(
        msg_of::<NAdamAlgorithm>(&[("betas", HyperValue::Pair(0.9, f64::NAN))]),
        "betas",
    );
    for name in ["lr", "eps", "weight_decay"] {
        check(msg_of::<AdamaxAlgorithm>(&[(name, nan())]), name);
    }
    for name in [
        "lr",
        "lr_decay",
        "weight_decay",
        "initial_accumulator_value",
        "eps",
    ] {
        check(msg_of::<AdagradAlgorithm>(&[(name, nan())]), name);
    }
    for name in ["lr", "rho", "eps", "weight_decay"] {
        check(msg_of::<AdadeltaAlgorithm>(&[(name, nan())]), name);
    }
    assert_eq!(
        msg_of::<AdagradAlgorithm>(&[("lr_decay", HyperValue::Number(f64::INFINITY))]),
        "Invalid lr_decay value: inf"
    );
}

#[test]
fn defaults_of_nadam_adamax_adagrad_adadelta_are_torchs() {
    let n = NAdamConfig::default();
    assert_eq!(
        (n.lr, n.betas, n.eps, n.weight_decay, n.momentum_decay),
        (2e-3, (0.9, 0.999), 1e-8, 0.0, 4e-3)
    );
    assert!(!n.decoupled_weight_decay && !n.maximize);
    let m = AdamaxConfig::default();
    assert_eq!(
        (m.lr, m.betas, m.eps, m.weight_decay),
        (2e-3, (0.9, 0.999), 1e-8, 0.0)
    );
    assert!(!m.maximize);
    let a = AdagradConfig::default();
    assert_eq!(
        (
            a.lr,
            a.lr_decay,
            a.weight_decay,
            a.initial_accumulator_value,
            a.eps
        ),
        (1e-2, 0.0, 0.0, 0.0, 1e-10)
    );
    assert!(!a.maximize);
    let d = AdadeltaConfig::default();
    assert_eq!((d.lr, d.rho, d.eps, d.weight_decay), (1.0, 0.9, 1e-6, 0.0));
    assert!(!d.maximize);
}

fn new_with<A: optarena::Algorithm>(config: Result<A::Config, Error>) -> String {
    let (arena, _) = arena();
    msg(optarena::Optimizer::<f32, A>::new(
        &arena,
        [ParamGroup::all()],
        config.unwrap(),
    ))
}

fn rmsprop_with(name: &str, v: impl Into<HyperValue>) -> String {
    new_with::<RMSpropAlgorithm>(RMSpropConfig::default().with(name, v))
}

fn rprop_with(name: &str, v: impl Into<HyperValue>) -> String {
    new_with::<RpropAlgorithm>(RpropConfig::default().with(name, v))
}

fn asgd_with(name: &str, v: impl Into<HyperValue>) -> String {
    new_with::<ASGDAlgorithm>(ASGDConfig::default().with(name, v))
}

#[test]
fn rmsprop_torch_messages() {
    assert_eq!(rmsprop_with("lr", -0.1), "Invalid learning rate: -0.1");
    assert_eq!(rmsprop_with("eps", -1e-8), "Invalid epsilon value: -1e-8");
    assert_eq!(
        rmsprop_with("momentum", -0.5),
        "Invalid momentum value: -0.5"
    );
    assert_eq!(
        rmsprop_with("weight_decay", -1.0),
        "Invalid weight_decay value: -1.0"
    );
    assert_eq!(rmsprop_with("alpha", -0.5), "Invalid alpha value: -0.5");
    for name in ["lr", "eps", "momentum", "weight_decay", "alpha"] {
        let m = rmsprop_with(name, f64::NAN);
        assert!(m.starts_with("Invalid") && m.contains("NaN"), "{name}: {m}");
    }
    // torch accepts alpha above 1 and zero momentum.
    let (arena, _) = arena();
    RMSprop::new(
        &arena,
        [ParamGroup::all()],
        RMSpropConfig::default().with_alpha(1.5),
    )
    .unwrap();
}

#[test]
fn rprop_torch_messages() {
    // torch: `if not 0.0 < etas[0] < 1.0 < etas[1]`.
    assert_eq!(
        rprop_with("etas", (1.0, 0.5)),
        "Invalid eta values: 1.0, 0.5"
    );
    assert_eq!(
        rprop_with("etas", (0.0, 1.2)),
        "Invalid eta values: 0.0, 1.2"
    );
    assert_eq!(
        rprop_with("etas", (0.5, 1.0)),
        "Invalid eta values: 0.5, 1.0"
    );
    assert_eq!(
        rprop_with("etas", (f64::NAN, 1.2)),
        "Invalid eta values: NaN, 1.2"
    );
    assert_eq!(
        rprop_with("etas", (0.5, f64::NAN)),
        "Invalid eta values: 0.5, NaN"
    );
    assert_eq!(rprop_with("lr", -1.0), "Invalid learning rate: -1.0");
    assert!(rprop_with("lr", f64::NAN).contains("Invalid learning rate: NaN"));
    let m = rprop_with("step_sizes", (f64::NAN, 50.0));
    assert!(
        m.starts_with("Invalid step_sizes") && m.contains("NaN"),
        "{m}"
    );
    // An unbounded step size is meaningful.
    let (arena, _) = arena();
    Rprop::new(
        &arena,
        [ParamGroup::all()],
        RpropConfig::default().with_step_sizes((0.0, f64::INFINITY)),
    )
    .unwrap();
}

#[test]
fn asgd_torch_messages() {
    assert_eq!(asgd_with("lr", -0.1), "Invalid learning rate: -0.1");
    assert_eq!(asgd_with("lambd", -1e-4), "Invalid lambd value: -0.0001");
    assert_eq!(asgd_with("alpha", -0.75), "Invalid alpha value: -0.75");
    assert_eq!(
        asgd_with("weight_decay", -0.1),
        "Invalid weight_decay value: -0.1"
    );
    for name in ["lr", "lambd", "alpha", "weight_decay", "t0"] {
        let m = asgd_with(name, f64::NAN);
        assert!(m.starts_with("Invalid") && m.contains("NaN"), "{name}: {m}");
    }
    // t0 = inf: never average; allowed.
    let (arena, _) = arena();
    ASGD::new(
        &arena,
        [ParamGroup::all()],
        ASGDConfig::default().with_t0(f64::INFINITY),
    )
    .unwrap();
}

#[test]
fn rmsprop_rprop_asgd_defaults_are_torchs() {
    let r = RMSpropConfig::default();
    assert_eq!(
        (r.lr, r.alpha, r.eps, r.weight_decay, r.momentum),
        (1e-2, 0.99, 1e-8, 0.0, 0.0)
    );
    assert!(!r.centered && !r.maximize);
    let p = RpropConfig::default();
    assert_eq!(
        (p.lr, p.etas, p.step_sizes),
        (1e-2, (0.5, 1.2), (1e-6, 50.0))
    );
    assert!(!p.maximize);
    let a = ASGDConfig::default();
    assert_eq!(
        (a.lr, a.lambd, a.alpha, a.t0, a.weight_decay),
        (1e-2, 1e-4, 0.75, 1e6, 0.0)
    );
    assert!(!a.maximize);
}

#[test]
fn rmsprop_buffers_follow_momentum_and_centered() {
    use optarena::Algorithm;
    let names = |momentum: f64, centered: bool| {
        RMSpropAlgorithm::buffers(
            &RMSpropConfig::default()
                .with_momentum(momentum)
                .with_centered(centered),
        )
    };
    assert_eq!(names(0.0, false), ["square_avg"]);
    assert_eq!(names(0.9, false), ["square_avg", "momentum_buffer"]);
    assert_eq!(names(0.0, true), ["square_avg", "grad_avg"]);
    assert_eq!(
        names(0.9, true),
        ["square_avg", "momentum_buffer", "grad_avg"]
    );
    assert_eq!(
        RpropAlgorithm::buffers(&RpropConfig::default()),
        ["prev", "step_size"]
    );
    assert_eq!(ASGDAlgorithm::buffers(&ASGDConfig::default()), ["ax"]);
}

fn adafactor_with(name: &str, v: impl Into<HyperValue>) -> String {
    new_with::<AdafactorAlgorithm>(AdafactorConfig::default().with(name, v))
}

#[test]
fn adafactor_torch_messages() {
    assert_eq!(
        adafactor_with("lr", -0.1),
        "Learning rate should be >= 0 but is: -0.1"
    );
    assert_eq!(
        adafactor_with("beta2_decay", 0.5),
        "beta2_decay should be <= 0 but is: 0.5"
    );
    assert_eq!(
        adafactor_with("eps", (-1e-30, 1e-3)),
        "epsilon1 should be >= 0 but is: -1e-30"
    );
    assert_eq!(
        adafactor_with("eps", HyperValue::OptPair(None, -1e-3)),
        "epsilon2 should be >= 0 but is: -0.001"
    );
    assert_eq!(
        adafactor_with("d", 0.5),
        "Clipping threshold d should be >= 1 but is: 0.5"
    );
    assert_eq!(
        adafactor_with("weight_decay", -0.01),
        "weight_decay should be >= 0 but is: -0.01"
    );
    // torch's order: lr is checked first.
    let c = AdafactorConfig::default().with_lr(-1.0).with_d(0.0);
    assert!(new_with::<AdafactorAlgorithm>(Ok(c)).starts_with("Learning rate"));
    // NaN fails each of torch's comparisons.
    for (name, v) in [
        ("lr", HyperValue::Number(f64::NAN)),
        ("beta2_decay", HyperValue::Number(f64::NAN)),
        ("eps", HyperValue::Pair(f64::NAN, 1e-3)),
        ("eps", HyperValue::OptPair(None, f64::NAN)),
        ("d", HyperValue::Number(f64::NAN)),
        ("weight_decay", HyperValue::Number(f64::NAN)),
    ] {
        let m = adafactor_with(name, v);
        assert!(m.contains("should be") && m.ends_with("NaN"), "{name}: {m}");
    }
    // Infinities torch lets through but that make the step meaningless.
    for (name, v) in [
        ("lr", HyperValue::Number(f64::INFINITY)),
        ("beta2_decay", HyperValue::Number(f64::NEG_INFINITY)),
        ("eps", HyperValue::Pair(f64::INFINITY, 1e-3)),
        ("eps", HyperValue::OptPair(None, f64::INFINITY)),
        ("weight_decay", HyperValue::Number(f64::INFINITY)),
    ] {
        let m = adafactor_with(name, v);
        assert!(m.starts_with("Invalid") && m.contains("inf"), "{name}: {m}");
    }
    // d = inf turns update clipping off; beta2_decay = 0 keeps only the newest gradient; an
    // explicit eps1 of 0 is allowed, as in torch.
    let (arena, _) = arena();
    for c in [
        AdafactorConfig::default().with_d(f64::INFINITY),
        AdafactorConfig::default()
            .with_beta2_decay(0.0)
            .with_eps((Some(0.0), 0.0)),
    ] {
        Adafactor::new(&arena, [ParamGroup::all()], c).unwrap();
    }
    // A group override is checked too, and a failed set_hyper changes nothing.
    let err = Adafactor::new(
        &arena,
        [ParamGroup::all().with("d", 0.9)],
        AdafactorConfig::default(),
    );
    assert_eq!(msg(err), "Clipping threshold d should be >= 1 but is: 0.9");
    let mut opt = Adafactor::new(&arena, [ParamGroup::all()], AdafactorConfig::default()).unwrap();
    assert!(opt.set_hyper(0, "beta2_decay", 0.1).is_err());
    assert_eq!(opt.group_config(0).unwrap(), &AdafactorConfig::default());
}

#[test]
fn adafactor_defaults_are_torchs() {
    let c = AdafactorConfig::default();
    assert_eq!(
        (c.lr, c.beta2_decay, c.eps, c.d, c.weight_decay),
        (1e-2, -0.8, (None, 1e-3), 1.0, 0.0)
    );
    assert!(!c.maximize);
    // torch keeps eps as (None, 1e-3) in the group; it survives the state dict's JSON.
    assert_eq!(
        optarena::Hyperparams::get(&c, "eps").unwrap(),
        HyperValue::OptPair(None, 1e-3)
    );
    let (mut arena, h) = arena();
    let mut opt = Adafactor::new(&arena, [ParamGroup::all()], c.clone()).unwrap();
    arena.set_grad(h[0], &[0.1, 0.2, 0.3, 0.4]).unwrap();
    opt.step(&mut arena).unwrap();
    let json = opt.state_dict_json().unwrap();
    assert!(json.contains("\"eps\":[null,0.001]"), "{json}");
    let mut other = Adafactor::new(
        &arena,
        [ParamGroup::all()],
        AdafactorConfig::default().with_eps((Some(1e-20), 1e-2)),
    )
    .unwrap();
    other.load_state_dict_json(&json, MatchBy::Name).unwrap();
    assert_eq!(other.group_config(0).unwrap(), &c);
    // Only the parameter with a gradient has state; it is a 2×2 matrix: factored.
    use optarena::Algorithm;
    assert!(AdafactorAlgorithm::buffers(&c).is_empty());
    assert_eq!(
        AdafactorAlgorithm::aux_buffers(&[2, 2]),
        ["row_var", "col_var"]
    );
    assert_eq!(AdafactorAlgorithm::aux_buffers(&[3]), ["variance"]);
    assert_eq!(AdafactorAlgorithm::aux_buffers(&[]), ["variance"]);
    let sd = other.state_dict();
    assert_eq!(sd.state.len(), 1);
    assert_eq!(sd.state[0].step, Some(1));
    assert_eq!(sd.state[0].buffers.len(), 2);
}
