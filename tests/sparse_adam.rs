//! `SparseAdam` beyond the torch fixtures (`tests/fixtures/sparse_adam.json`, replayed by
//! `tests/parity.rs`): fused = reference bitwise, only touched rows change, duplicate rows
//! are summed, every invalid input is an error that changes nothing, save / load / continue.

mod common;

use common::*;
use optarena::{Arena, ArenaBuilder, Error, Float, SparseAdam, SparseAdamConfig, SparseGrad};

fn table<T: Float>(rows: usize, cols: usize) -> (Arena<T>, optarena::Param<T>, optarena::Param<T>) {
    let mut b = ArenaBuilder::<T>::new();
    let mut rng = Rng(3);
    let e = b
        .param("emb", &[rows, cols], &rng.vec::<T>(rows * cols, 1.0))
        .unwrap();
    let v = b.param("vec", &[5], &rng.vec::<T>(5, 1.0)).unwrap();
    (b.build(), e, v)
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn snapshot<T: Float>(opt: &SparseAdam<T>, arena: &Arena<T>) -> (String, Vec<u64>) {
    (opt.state_dict_json().unwrap(), bits(arena.params()))
}

#[test]
fn torch_fixtures_with_the_reference_kernel() {
    for case in load_cases(&fixtures_dir().join("sparse_adam.json")) {
        let o = run_sparse_case(&case, true);
        assert!(matches!(o, Outcome::Pass), "{o:?}");
    }
}

fn fused_vs_reference<T: Float>(cols: usize, level: optarena::SimdLevel) {
    let cfgs = [
        SparseAdamConfig::default(),
        SparseAdamConfig::default()
            .with_lr(0.05)
            .with_betas((0.5, 0.9))
            .with_eps(1e-3)
            .with_maximize(true),
    ];
    for cfg in cfgs {
        let (mut a1, e, v) = table::<T>(50, cols);
        let (mut a2, e2, v2) = table::<T>(50, cols);
        let mut o1 = SparseAdam::all(&a1, cfg).unwrap();
        o1.set_simd_level(level);
        let mut o2 = SparseAdam::all(&a2, cfg).unwrap();
        let mut rng = Rng(17);
        for t in 0..6 {
            let rows: Vec<usize> = (0..(3 + t * 2))
                .map(|_| ((rng.next_f64() + 1.0) * 25.0) as usize % 50)
                .collect();
            let vals = rng.vec::<T>(rows.len() * cols, 2.0);
            let vrows = [4usize, 0];
            let vvals = rng.vec::<T>(2, 1.0);
            let g = [
                SparseGrad::new(e, &rows, &vals),
                SparseGrad::new(v, &vrows, &vvals),
            ];
            o1.step_sparse(&mut a1, &g).unwrap();
            let g2 = [
                SparseGrad::new(e2, &rows, &vals),
                SparseGrad::new(v2, &vrows, &vvals),
            ];
            o2.step_sparse_reference(&mut a2, &g2).unwrap();
            assert_eq!(
                snapshot(&o1, &a1),
                snapshot(&o2, &a2),
                "cols {cols} step {t}"
            );
        }
    }
}

#[test]
fn fused_equals_reference_at_every_simd_level() {
    for level in optarena::SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
    {
        for cols in [1, 3, 8, 13, 64, 67] {
            fused_vs_reference::<f32>(cols, level);
            fused_vs_reference::<f64>(cols, level);
        }
    }
}

#[test]
fn only_touched_rows_and_their_state_change() {
    let (mut a, e, v) = table::<f32>(100, 8);
    let mut opt = SparseAdam::all(&a, SparseAdamConfig::default().with_lr(0.1)).unwrap();
    let before = a.params().to_vec();
    let rows = [3usize, 97, 40];
    let vals = vec![0.5f32; 24];
    opt.step_sparse(&mut a, &[SparseGrad::new(e, &rows, &vals)])
        .unwrap();
    let (m, s) = opt.state(&a, e).unwrap();
    for r in 0..100 {
        let span = r * 8..(r + 1) * 8;
        let touched = rows.contains(&r);
        let changed = a.value(e)[span.clone()] != before[span.clone()];
        assert_eq!(changed, touched, "row {r}");
        assert_eq!(
            m[span.clone()].iter().any(|&x| x != 0.0),
            touched,
            "exp_avg row {r}"
        );
        assert_eq!(
            s[span].iter().any(|&x| x != 0.0),
            touched,
            "exp_avg_sq row {r}"
        );
    }
    assert_eq!(a.value(v), &before[800..]);
    assert_eq!(opt.step_count(e), Some(1));
    assert_eq!(opt.step_count(v), None);
    // An empty gradient counts a step, as in torch, and changes no value.
    let snap = a.params().to_vec();
    opt.step_sparse(
        &mut a,
        &[SparseGrad::new(e, &[], &[]), SparseGrad::new(v, &[], &[])],
    )
    .unwrap();
    assert_eq!(a.params(), &snap[..]);
    assert_eq!((opt.step_count(e), opt.step_count(v)), (Some(2), Some(1)));
}

#[test]
fn duplicate_rows_are_summed_as_torch_coalesces() {
    let (mut a1, e1, _) = table::<f64>(10, 3);
    let (mut a2, e2, _) = table::<f64>(10, 3);
    let cfg = SparseAdamConfig::default().with_lr(0.1);
    let mut o1 = SparseAdam::all(&a1, cfg).unwrap();
    let mut o2 = SparseAdam::all(&a2, cfg).unwrap();
    let rows1 = [7usize, 2, 7, 7];
    let vals1 = [
        1.0, 2.0, 3.0, 0.5, 0.5, 0.5, -1.0, 0.25, 1.0, 0.5, 0.25, 2.0,
    ];
    let rows2 = [2usize, 7];
    let vals2 = [0.5, 0.5, 0.5, 0.5, 2.5, 6.0];
    o1.step_sparse(&mut a1, &[SparseGrad::new(e1, &rows1, &vals1)])
        .unwrap();
    o2.step_sparse(&mut a2, &[SparseGrad::new(e2, &rows2, &vals2)])
        .unwrap();
    assert_eq!(snapshot(&o1, &a1), snapshot(&o2, &a2));
}

#[test]
fn invalid_input_is_an_error_naming_it_and_changes_nothing() {
    let (mut a, e, v) = table::<f32>(10, 4);
    let mut opt = SparseAdam::new(&a, [(vec![e], SparseAdamConfig::default())]).unwrap();
    opt.step_sparse(&mut a, &[SparseGrad::new(e, &[1], &[1.0; 4])])
        .unwrap();
    let (other, oe, _) = table::<f32>(10, 4);
    let _ = other;
    let before = snapshot(&opt, &a);
    let four = [1.0f32; 4];
    let eight = [1.0f32; 8];
    let cases: Vec<(Vec<SparseGrad<'_, f32>>, &str)> = vec![
        (
            vec![SparseGrad::new(e, &[10], &four)],
            "row index 10 is out of range for parameter `emb` of shape [10, 4] (10 rows)",
        ),
        (
            vec![SparseGrad::new(e, &[1, 2], &four)],
            "has 2 row indices and 4 values; expected 8",
        ),
        (
            vec![SparseGrad::new(e, &[1], &eight)],
            "has 1 row indices and 8 values; expected 4",
        ),
        (
            vec![SparseGrad::new(v, &[0], &four[..1])],
            "`vec` is not in any of this optimizer's groups",
        ),
        (
            vec![
                SparseGrad::new(e, &[1], &four),
                SparseGrad::new(e, &[2], &four),
            ],
            "`emb` has more than one sparse gradient",
        ),
        (
            vec![SparseGrad::new(e, &[2, usize::MAX], &eight)],
            "row index 18446744073709551615 is out of range",
        ),
    ];
    for (g, want) in cases {
        let err = opt.step_sparse(&mut a, &g).unwrap_err();
        assert!(matches!(err, Error::SparseGrad(_)), "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert_eq!(snapshot(&opt, &a), before);
    }
    // A handle of another arena (same index, other arena id).
    let _ = oe;
    let (mut b, be, _) = table::<f32>(10, 4);
    let err = opt
        .step_sparse(&mut b, &[SparseGrad::new(be, &[1], &four)])
        .unwrap_err();
    assert!(err.to_string().contains("another arena"), "{err}");
    let err = opt
        .step_sparse(&mut a, &[SparseGrad::new(be, &[1], &four)])
        .unwrap_err();
    assert!(err.to_string().contains("not one of this arena's"), "{err}");
    assert!(opt.state(&a, be).is_err());
    assert_eq!(snapshot(&opt, &a), before);
    // Dense gradients: torch's message.
    opt.step(&mut a).unwrap();
    a.grad_mut(e)[0] = 1.0;
    assert_eq!(
        opt.step(&mut a).unwrap_err().to_string(),
        "SparseAdam does not support dense gradients, please consider Adam instead"
    );
    assert_eq!(snapshot(&opt, &a), before);
}

#[test]
fn invalid_options_get_torchs_messages() {
    let (a, e, v) = table::<f32>(4, 2);
    let msg = |c: SparseAdamConfig| SparseAdam::all(&a, c).unwrap_err().to_string();
    let d = SparseAdamConfig::default();
    assert_eq!(msg(d.with_lr(0.0)), "Invalid learning rate: 0.0");
    assert_eq!(msg(d.with_lr(f64::NAN)), "Invalid learning rate: NaN");
    assert_eq!(msg(d.with_eps(-1.0)), "Invalid epsilon value: -1.0");
    assert_eq!(
        msg(d.with_betas((1.0, 0.9))),
        "Invalid beta parameter at index 0: 1.0"
    );
    assert_eq!(
        msg(d.with_betas((0.9, -0.1))),
        "Invalid beta parameter at index 1: -0.1"
    );
    let e2 = SparseAdam::new(&a, [(vec![e], d), (vec![v, e], d)]).unwrap_err();
    assert!(matches!(e2, Error::ParamInTwoGroups { .. }), "{e2}");
    let e3 = SparseAdam::new(&a, [(vec![e, e], d)]).unwrap_err();
    assert!(matches!(e3, Error::DuplicateParamInGroup { .. }), "{e3}");
    assert!(matches!(
        SparseAdam::new(&a, [(vec![], d)]).unwrap_err(),
        Error::EmptyParamList
    ));
    let mut opt = SparseAdam::all(&a, d).unwrap();
    assert!(opt.set_group_config(0, d.with_lr(-1.0)).is_err());
    assert_eq!(opt.group_config(0).unwrap(), d);
    assert!(opt.group_config(1).is_err());
}

#[test]
fn save_load_continue_bitwise_and_bad_states_change_nothing() {
    let cfg = SparseAdamConfig::default()
        .with_lr(0.02)
        .with_betas((0.8, 0.99));
    let (mut a, e, v) = table::<f32>(30, 5);
    let mut opt =
        SparseAdam::new(&a, [(vec![e], cfg), (vec![v], SparseAdamConfig::default())]).unwrap();
    let mut rng = Rng(1);
    let grads = |rng: &mut Rng| -> (Vec<usize>, Vec<f32>) {
        let rows: Vec<usize> = (0..6)
            .map(|_| ((rng.next_f64() + 1.0) * 15.0) as usize % 30)
            .collect();
        let vals = rng.vec::<f32>(30, 1.0);
        (rows, vals)
    };
    for _ in 0..3 {
        let (r, x) = grads(&mut rng);
        opt.step_sparse(&mut a, &[SparseGrad::new(e, &r, &x)])
            .unwrap();
    }
    let json = opt.state_dict_json().unwrap();
    let mut a2 = ArenaBuilder::<f32>::new();
    let e2 = a2.param("emb", &[30, 5], a.value(e)).unwrap();
    a2.param("vec", &[5], a.value(v)).unwrap();
    let mut a2 = a2.build();
    let mut o2 = SparseAdam::new(
        &a2,
        [
            (vec![e2], SparseAdamConfig::default()),
            (vec![a2.find("vec").unwrap()], SparseAdamConfig::default()),
        ],
    )
    .unwrap();
    // Bad states first: each is refused and changes nothing.
    let good: serde_json::Value = serde_json::from_str(&json).unwrap();
    let fresh = o2.state_dict_json().unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "saved by the Adam optimizer, this is SparseAdam",
            Box::new(|s| s["optimizer"] = "Adam".into()),
        ),
        (
            "Invalid learning rate",
            Box::new(|s| s["param_groups"][0]["hyperparams"]["lr"] = (-1.0).into()),
        ),
        (
            "buffer `exp_avg` of parameter `emb` has 3 values, the parameter has 150",
            Box::new(|s| s["state"][0]["buffers"]["exp_avg"] = serde_json::json!([1, 2, 3])),
        ),
        (
            "group 0 has no parameter named `x`",
            Box::new(|s| s["param_groups"][0]["params"][0]["name"] = "x".into()),
        ),
        (
            "it has 1 parameter groups, the optimizer has 2",
            Box::new(|s| {
                s["param_groups"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "expected exp_avg, exp_avg_sq",
            Box::new(|s| {
                s["state"][0]["buffers"]
                    .as_object_mut()
                    .unwrap()
                    .remove("exp_avg_sq");
            }),
        ),
    ];
    for (want, edit) in edits {
        let mut s = good.clone();
        edit(&mut s);
        let err = o2.load_state_dict_json(&s.to_string()).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert_eq!(o2.state_dict_json().unwrap(), fresh);
    }
    o2.load_state_dict_json(&json).unwrap();
    assert_eq!(o2.state_dict_json().unwrap(), json);
    for _ in 0..3 {
        let (r, x) = grads(&mut rng);
        opt.step_sparse(&mut a, &[SparseGrad::new(e, &r, &x)])
            .unwrap();
        o2.step_sparse(&mut a2, &[SparseGrad::new(e2, &r, &x)])
            .unwrap();
    }
    assert_eq!(bits(a.params()), bits(a2.params()));
    assert_eq!(
        opt.state_dict_json().unwrap(),
        o2.state_dict_json().unwrap()
    );
}

/// The JSON load pairs each group's parameters by name, as the binary checkpoint load does:
/// a model that registered them in another order (and lists them in another order in the
/// group) loads each parameter's own state and continues bit for bit.
#[test]
fn json_load_matches_parameters_by_name_in_any_order() {
    let (mut a, e, v) = table::<f64>(12, 5);
    let mut opt = SparseAdam::new(&a, [(vec![e, v], SparseAdamConfig::default())]).unwrap();
    let mut rng = Rng(5);
    let step = |opt: &mut SparseAdam<f64>, a: &mut Arena<f64>, e, v, rng: &mut Rng| {
        let (ge, gv) = (rng.vec::<f64>(10, 1.0), rng.vec::<f64>(1, 1.0));
        let grads = [
            SparseGrad::new(e, &[3, 7], &ge),
            SparseGrad::new(v, &[2], &gv),
        ];
        opt.step_sparse(a, &grads).unwrap();
    };
    step(&mut opt, &mut a, e, v, &mut rng);
    // `vec` only once, so the two parameters' steps differ.
    opt.step_sparse(&mut a, &[SparseGrad::new(e, &[1], &rng.vec::<f64>(5, 1.0))])
        .unwrap();
    let json = opt.state_dict_json().unwrap();

    // The same model registered the other way round, the group listing `vec` first.
    let mut b = ArenaBuilder::<f64>::new();
    let v2 = b.param("vec", &[5], a.value(v)).unwrap();
    let e2 = b.param("emb", &[12, 5], a.value(e)).unwrap();
    let mut a2 = b.build();
    let mut o2 = SparseAdam::new(&a2, [(vec![v2, e2], SparseAdamConfig::default())]).unwrap();
    o2.load_state_dict_json(&json).unwrap();
    assert_eq!(o2.step_count(e2), opt.step_count(e));
    assert_eq!(o2.step_count(v2), opt.step_count(v));
    assert_ne!(o2.step_count(e2), o2.step_count(v2));
    for (p, p2) in [(e, e2), (v, v2)] {
        let (m, s) = opt.state(&a, p).unwrap();
        let (m2, s2) = o2.state(&a2, p2).unwrap();
        assert_eq!((bits(m), bits(s)), (bits(m2), bits(s2)));
    }
    let mut rng2 = Rng(9);
    let mut rng3 = Rng(9);
    step(&mut opt, &mut a, e, v, &mut rng2);
    step(&mut o2, &mut a2, e2, v2, &mut rng3);
    assert_eq!(bits(a.value(e)), bits(a2.value(e2)));
    assert_eq!(bits(a.value(v)), bits(a2.value(v2)));
}

#[test]
fn lr_schedulers_drive_sparse_adam_as_in_torch() {
    // The fixture cases with an `"lr_scheduler"` (StepLR, CosineAnnealingLR to 0, OneCycleLR
    // cycling betas[0], SequentialLR, SWALR): every step's lrs and betas[0] and the trajectory are
    // torch's, with the fused kernel.
    let cases: Vec<_> = load_cases(&fixtures_dir().join("sparse_adam.json"))
        .into_iter()
        .filter(|c| c.get("lr_scheduler").is_some())
        .collect();
    let names: Vec<&str> = cases
        .iter()
        .map(|c| c["lr_scheduler"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "StepLR",
            "CosineAnnealingLR",
            "OneCycleLR",
            "SequentialLR",
            "SWALR"
        ]
    );
    for case in &cases {
        let o = run_sparse_case(case, false);
        assert!(matches!(o, Outcome::Pass), "{o:?}");
    }
    // The checker sees a wrong schedule: a recorded lr changed by 1%.
    let mut bad = cases[0].clone();
    let lr = bad["steps"][6]["lrs"][1].as_f64().unwrap();
    bad["steps"][6]["lrs"][1] = (lr * 1.01).into();
    let o = run_sparse_case(&bad, false);
    assert!(
        matches!(&o, Outcome::Fail(m) if m.contains("step 7, group 1 lr")),
        "{o:?}"
    );
}

#[test]
fn group_hyperparameters_by_torchs_names() {
    use optarena::schedule::{LrScheduler, StepLR, StepLRConfig};
    use optarena::{GroupHyperparams, HyperValue};
    let (mut a, e, v) = table::<f32>(8, 2);
    let cfg = SparseAdamConfig::default().with_lr(0.1);
    let mut opt = SparseAdam::new(&a, [(vec![e], cfg), (vec![v], cfg)]).unwrap();
    assert_eq!(opt.num_groups(), 2);
    assert_eq!(
        opt.group_hyper(0, "betas").unwrap(),
        HyperValue::Pair(0.9, 0.999)
    );
    assert_eq!(
        opt.group_hyper(1, "maximize").unwrap(),
        HyperValue::Bool(false)
    );
    opt.set_lr(1, 0.25).unwrap();
    assert_eq!((opt.lr(0).unwrap(), opt.lr(1).unwrap()), (0.1, 0.25));
    // lr 0 is allowed after construction (torch's schedulers set it), negative is not.
    opt.set_lr(0, 0.0).unwrap();
    let before = opt.group_config(0).unwrap();
    for (name, value, want) in [
        (
            "lr",
            HyperValue::Number(-0.5),
            "Invalid learning rate: -0.5",
        ),
        (
            "lr",
            HyperValue::Number(f64::NAN),
            "Invalid learning rate: NaN",
        ),
        (
            "betas",
            HyperValue::Pair(0.9, 1.0),
            "Invalid beta parameter at index 1: 1.0",
        ),
        ("eps", HyperValue::Number(0.0), "Invalid epsilon value: 0.0"),
        ("lr", HyperValue::Bool(true), "lr"),
        ("momentum", HyperValue::Number(0.9), "momentum"),
    ] {
        let e = opt.set_group_hyper(0, name, value).unwrap_err().to_string();
        assert!(e.contains(want), "{name}: {e}");
        assert_eq!(opt.group_config(0).unwrap(), before);
    }
    assert!(matches!(
        opt.set_lr(2, 0.1).unwrap_err(),
        Error::NoSuchGroup { index: 2, count: 2 }
    ));
    // A scheduler sets initial_lr once and moves every group's lr.
    opt.set_lr(0, 0.1).unwrap();
    let mut s = StepLR::new(&mut opt, StepLRConfig::new(1).with_gamma(0.5)).unwrap();
    assert_eq!(opt.group_initial_lr(1).unwrap(), Some(0.25));
    s.step(&mut opt).unwrap();
    assert_eq!((opt.lr(0).unwrap(), opt.lr(1).unwrap()), (0.05, 0.125));
    // And the step uses it: one row moved by lr (Adam's first step moves by ~lr).
    let before = a.value(e)[2];
    opt.step_sparse(&mut a, &[SparseGrad::new(e, &[1], &[1.0, 1.0])])
        .unwrap();
    assert!((before - a.value(e)[2] - 0.05).abs() < 1e-6);
}
