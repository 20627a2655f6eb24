//! LR schedulers beyond the parity fixtures: torch traces SCHEMA.md's format cannot hold
//! (Adam's `betas`, `step(epoch)`, fractional epochs), save / load / continue for every
//! scheduler, optarena's resume semantics where torch gets resuming wrong
//! (pytorch/pytorch#29697, #60265, #162591), every validation error, and the promise that a
//! failed call changes nothing.

mod common;

use std::path::Path;

use common::*;
use optarena::schedule::*;
use optarena::{
    Algorithm, ArenaBuilder, Error, GroupHyperparams, HyperValue, Hyperparams, LrScheduler,
    MatchBy, Optimizer, ParamGroup, SGDConfig, SGD,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// `momentum`, or the first of `betas`, of group `g`.
fn momentum_of(opt: &dyn GroupHyperparams, g: usize, key: &str) -> f64 {
    match opt.group_hyper(g, key).unwrap() {
        HyperValue::Number(x) => x,
        HyperValue::Pair(a, _) | HyperValue::OptPair(Some(a), _) => a,
        other => panic!("{key} is {other:?}"),
    }
}

fn lrs(opt: &dyn GroupHyperparams) -> Vec<f64> {
    (0..opt.num_groups()).map(|g| opt.lr(g).unwrap()).collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// An optimizer of algorithm `A` (f64) with one parameter per group and the given lrs.
fn make_opt<A: Algorithm>(group_lrs: &[f64], defaults: &Value) -> Box<dyn GroupHyperparams> {
    let mut b = ArenaBuilder::<f64>::new();
    let handles: Vec<_> = (0..group_lrs.len())
        .map(|i| b.param(&format!("p{i}"), &[2], &[1.0, -1.0]).unwrap())
        .collect();
    let arena = b.build();
    let mut cfg = A::Config::default();
    for (k, v) in defaults.as_object().unwrap() {
        cfg.set(k, &hyper_value(v)).unwrap();
    }
    let groups = handles
        .iter()
        .zip(group_lrs)
        .map(|(h, &lr)| ParamGroup::new([*h]).with("lr", lr));
    Box::new(Optimizer::<f64, A>::new(&arena, groups, cfg).unwrap())
}

fn build(name: &str, cfg: &Value, opt: &mut dyn GroupHyperparams) -> Box<dyn LrScheduler> {
    match build_scheduler(name, cfg, opt) {
        Ok(s) => s,
        Err(o) => panic!("{name} {cfg}: {o:?}"),
    }
}

/// Every scheduler case of the committed fixture files (this branch's extras, the samples, and
/// torch's own `schedulers.json` once it is committed).
fn scheduler_cases() -> Vec<Value> {
    let mut files = json_files(&fixtures_dir());
    files.extend(json_files(&fixtures_dir().join("sample")));
    let mut cases: Vec<Value> = files
        .iter()
        .flat_map(|f| load_cases(f))
        .filter(|c| kind_of(c) == Kind::Scheduler)
        .collect();
    cases.dedup_by(|a, b| a["name"] == b["name"] && a["config"] == b["config"]);
    assert!(cases.len() >= 40, "only {} scheduler cases", cases.len());
    cases
}

fn case_lrs(case: &Value) -> Vec<f64> {
    case["base_lrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// One epoch's values, as bits: every group's lr, then every group's momentum.
fn snapshot(opt: &dyn GroupHyperparams) -> Vec<u64> {
    let mut v = bits(&lrs(opt));
    v.extend((0..opt.num_groups()).map(|g| momentum_of(opt, g, "momentum").to_bits()));
    v
}

/// Runs epochs `range` of a fixture case: records the values, then steps (with the metric
/// for ReduceLROnPlateau).
fn run_epochs(
    case: &Value,
    opt: &mut dyn GroupHyperparams,
    sched: &mut dyn LrScheduler,
    range: std::ops::Range<usize>,
) -> Vec<Vec<u64>> {
    let metrics = case["metrics"].as_array();
    let mut out = Vec::new();
    for e in range {
        out.push(snapshot(opt));
        match metrics.and_then(|m| m.get(e)).and_then(Value::as_f64) {
            Some(m) => sched.step_metric(opt, m),
            None => sched.step(opt),
        }
        .unwrap_or_else(|err| panic!("{}: epoch {e}: {err}", case["name"]));
    }
    out.push(snapshot(opt));
    out
}

// ---------------------------------------------------------------------------------------------
// torch traces (scripts/gen_scheduler_extra.py)
// ---------------------------------------------------------------------------------------------

#[test]
fn torch_traces_betas_step_epoch_and_fractional_epochs() {
    let path = fixtures_dir().join("sched/traces.json");
    let cases = load_cases(&path);
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let defaults = &case["opt_defaults"];
        let mut opt = match case["optimizer"].as_str().unwrap() {
            "SGD" => make_opt::<optarena::SGDAlgorithm>(&case_lrs(&case), defaults),
            "Adam" => make_opt::<optarena::AdamAlgorithm>(&case_lrs(&case), defaults),
            "AdamW" => make_opt::<optarena::AdamWAlgorithm>(&case_lrs(&case), defaults),
            "RAdam" => make_opt::<optarena::RAdamAlgorithm>(&case_lrs(&case), defaults),
            other => panic!("{name}: optimizer {other}"),
        };
        let opt = &mut *opt;
        let mut sched = build(case["scheduler"].as_str().unwrap(), &case["config"], opt);
        let key = case["momentum_key"].as_str().unwrap();
        let check = |opt: &dyn GroupHyperparams, i: usize| {
            for g in 0..2 {
                let (want_lr, want_m) = (
                    case["lrs"][i][g].as_f64().unwrap(),
                    case["momentums"][i][g].as_f64().unwrap(),
                );
                let (lr, m) = (opt.lr(g).unwrap(), momentum_of(opt, g, key));
                assert!(
                    sched_close(lr, want_lr) && sched_close(m, want_m),
                    "{name}: after action {i}, group {g}: lr {lr:e} vs torch {want_lr:e}, \
                     {key} {m:e} vs torch {want_m:e}"
                );
            }
        };
        check(opt, 0);
        for (i, a) in case["actions"].as_array().unwrap().iter().enumerate() {
            sched
                .step_epoch(opt, a.as_f64())
                .unwrap_or_else(|e| panic!("{name}: action {i}: {e}"));
            check(opt, i + 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// save / load / continue
// ---------------------------------------------------------------------------------------------

/// How a resumed run restores its state.
#[derive(Debug, Clone, Copy)]
enum Resume {
    /// Optimizer state loaded, then the scheduler built and its state loaded (torch's usual).
    OptimizerFirst,
    /// Scheduler built, then the optimizer state and the scheduler state loaded.
    SchedulerFirst,
    /// Only the scheduler state: a fresh optimizer (pytorch/pytorch#29697).
    SchedulerOnly,
}

#[test]
fn save_load_continue_every_scheduler_case() {
    let mut names = std::collections::BTreeSet::new();
    for case in scheduler_cases() {
        let name = case["scheduler"].as_str().unwrap();
        names.insert(name.to_string());
        let (base, momentum) = (case_lrs(&case), case["momentum"].as_f64().unwrap());
        let mut opt = scheduler_sgd(&base, momentum);
        let mut sched = build(name, &case["config"], &mut opt);
        let whole = run_epochs(&case, &mut opt, &mut *sched, 0..60);
        let final_state = sched.state_dict().unwrap();
        for k in [0usize, 1, 2, 5, 13, 31, 59] {
            let mut opt1 = scheduler_sgd(&base, momentum);
            let mut s1 = build(name, &case["config"], &mut opt1);
            run_epochs(&case, &mut opt1, &mut *s1, 0..k);
            let sched_json = s1.state_dict_json().unwrap();
            let opt_json = opt1.state_dict_json().unwrap();
            for how in [
                Resume::OptimizerFirst,
                Resume::SchedulerFirst,
                Resume::SchedulerOnly,
            ] {
                let mut opt2 = scheduler_sgd(&base, momentum);
                let mut s2 = match how {
                    Resume::OptimizerFirst => {
                        opt2.load_state_dict_json(&opt_json, MatchBy::Position)
                            .unwrap();
                        build(name, &case["config"], &mut opt2)
                    }
                    Resume::SchedulerFirst => {
                        let s = build(name, &case["config"], &mut opt2);
                        opt2.load_state_dict_json(&opt_json, MatchBy::Position)
                            .unwrap();
                        s
                    }
                    Resume::SchedulerOnly => build(name, &case["config"], &mut opt2),
                };
                s2.load_state_dict_json(&mut opt2, &sched_json)
                    .unwrap_or_else(|e| panic!("{}: load: {e}", case["name"]));
                let rest = run_epochs(&case, &mut opt2, &mut *s2, k..60);
                assert_eq!(
                    rest,
                    whole[k..],
                    "{}: resumed at epoch {k} ({how:?}) left the schedule",
                    case["name"]
                );
                assert_eq!(
                    s2.state_dict().unwrap(),
                    final_state,
                    "{}: resumed at {k} ({how:?}): final state differs",
                    case["name"]
                );
                assert_eq!(s2.get_last_lr(), sched.get_last_lr());
            }
        }
    }
    for want in [
        "LambdaLR",
        "MultiplicativeLR",
        "StepLR",
        "MultiStepLR",
        "ConstantLR",
        "LinearLR",
        "ExponentialLR",
        "PolynomialLR",
        "CosineAnnealingLR",
        "CosineAnnealingWarmRestarts",
        "CyclicLR",
        "OneCycleLR",
        "SequentialLR",
        "ChainedScheduler",
        "ReduceLROnPlateau",
        "SWALR",
    ] {
        assert!(names.contains(want), "no save/load case for {want}");
    }
}

#[test]
fn save_load_continue_with_betas_and_fractional_epochs() {
    // CyclicLR / OneCycleLR on Adam's betas.0, and CosineAnnealingWarmRestarts at fractional
    // epochs: the traces' actions, interrupted at every point.
    for case in load_cases(&fixtures_dir().join("sched/traces.json")) {
        let name = case["scheduler"].as_str().unwrap();
        let defaults = &case["opt_defaults"];
        let key = case["momentum_key"].as_str().unwrap();
        let new_opt = || match case["optimizer"].as_str().unwrap() {
            "SGD" => make_opt::<optarena::SGDAlgorithm>(&case_lrs(&case), defaults),
            "Adam" => make_opt::<optarena::AdamAlgorithm>(&case_lrs(&case), defaults),
            "AdamW" => make_opt::<optarena::AdamWAlgorithm>(&case_lrs(&case), defaults),
            _ => make_opt::<optarena::RAdamAlgorithm>(&case_lrs(&case), defaults),
        };
        let actions: Vec<Option<f64>> = case["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(Value::as_f64)
            .collect();
        let values = |opt: &dyn GroupHyperparams| {
            let mut v = bits(&lrs(opt));
            v.extend((0..2).map(|g| momentum_of(opt, g, key).to_bits()));
            v
        };
        let mut o = new_opt();
        let mut s = build(name, &case["config"], &mut *o);
        let whole: Vec<_> = actions
            .iter()
            .map(|a| {
                s.step_epoch(&mut *o, *a).unwrap();
                values(&*o)
            })
            .collect();
        for k in 0..actions.len() {
            let mut o1 = new_opt();
            let mut s1 = build(name, &case["config"], &mut *o1);
            for a in &actions[..k] {
                s1.step_epoch(&mut *o1, *a).unwrap();
            }
            let saved = s1.state_dict_json().unwrap();
            // A fresh optimizer: the saved state restores lr and betas.0 / momentum.
            let mut o2 = new_opt();
            let mut s2 = build(name, &case["config"], &mut *o2);
            s2.load_state_dict_json(&mut *o2, &saved).unwrap();
            for (i, a) in actions.iter().enumerate().skip(k) {
                s2.step_epoch(&mut *o2, *a).unwrap();
                assert_eq!(
                    values(&*o2),
                    whole[i],
                    "{}: resumed after {k} actions, action {i}",
                    case["name"]
                );
            }
        }
    }
}

#[test]
fn state_dict_json_names_torch_fields_and_round_trips() {
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    let mut s = OneCycleLR::new(&mut opt, OneCycleLRConfig::new(0.1, 10)).unwrap();
    s.step(&mut opt).unwrap();
    let v = s.state_dict().unwrap();
    assert_eq!(v["scheduler"], "OneCycleLR");
    assert_eq!(v["last_epoch"], 1);
    assert_eq!(v["_step_count"], 2);
    assert_eq!(v["total_steps"], 10);
    assert!(v["_schedule_phases"].is_array() && v["base_lrs"].is_array());
    assert_eq!(v["config"]["anneal_strategy"], "cos");
    // JSON text round trip: the same state, bit for bit.
    let text = s.state_dict_json().unwrap();
    let mut opt2 = scheduler_sgd(&[0.1, 0.01], 0.9);
    let mut s2 = OneCycleLR::new(&mut opt2, OneCycleLRConfig::new(0.1, 10)).unwrap();
    s2.load_state_dict_json(&mut opt2, &text).unwrap();
    assert_eq!(s2.state_dict().unwrap(), v);

    // ReduceLROnPlateau's `best` starts infinite: saved as "inf", loaded back.
    let mut p = ReduceLROnPlateau::new(&mut opt, ReduceLROnPlateauConfig::default()).unwrap();
    let v = p.state_dict().unwrap();
    assert_eq!(v["best"], "inf");
    p.load_state_dict(&mut opt, &v).unwrap();
    assert_eq!(p.best(), f64::INFINITY);
    p.step_metric(&mut opt, 0.5).unwrap();
    assert_eq!(p.state_dict().unwrap()["best"], 0.5);
}

// ---------------------------------------------------------------------------------------------
// where torch gets resuming wrong
// ---------------------------------------------------------------------------------------------

/// pytorch/pytorch#29697: torch loads a chainable scheduler's state but leaves the
/// optimizer's lr as the fresh constructor left it, so the resumed run continues from the
/// wrong lr. optarena's `load_state_dict` restores the lr.
#[test]
fn load_state_dict_restores_the_lr_pytorch_29697() {
    // torch's example: SGD(lr=0.1), StepLR(step_size=2), 5 epochs, then a new optimizer and
    // scheduler loading only the scheduler's state.
    let run = |opt: &mut SGD<f64>, s: &mut StepLR, n: usize| {
        (0..n)
            .map(|_| {
                let lr = opt.lr(0).unwrap();
                s.step(opt).unwrap();
                lr
            })
            .collect::<Vec<f64>>()
    };
    let mut opt = scheduler_sgd(&[0.1], 0.0);
    let mut s = StepLR::new(&mut opt, StepLRConfig::new(2)).unwrap();
    let whole = run(&mut opt, &mut s, 10);

    let mut opt1 = scheduler_sgd(&[0.1], 0.0);
    let mut s1 = StepLR::new(&mut opt1, StepLRConfig::new(2)).unwrap();
    run(&mut opt1, &mut s1, 5);
    let saved = s1.state_dict().unwrap();

    let mut opt2 = scheduler_sgd(&[0.1], 0.0);
    let mut s2 = StepLR::new(&mut opt2, StepLRConfig::new(2)).unwrap();
    s2.load_state_dict(&mut opt2, &saved).unwrap();
    let rest = run(&mut opt2, &mut s2, 5);
    // torch 2.15 gives 0.1, 0.01, 0.01, 0.001, 0.001 for epochs 5..10 (two decays lost).
    assert_ne!(rest[0], 0.1);
    assert_eq!(bits(&rest), bits(&whole[5..]));

    // The same with a ConstantLR, whose fresh constructor rescales the lr it finds.
    let mut opt = scheduler_sgd(&[0.1], 0.0);
    let cfg = ConstantLRConfig::new().with_factor(0.5).with_total_iters(4);
    let mut s = ConstantLR::new(&mut opt, cfg.clone()).unwrap();
    s.step(&mut opt).unwrap();
    let saved_opt = opt.state_dict_json().unwrap();
    let saved = s.state_dict_json().unwrap();
    let mut opt2 = scheduler_sgd(&[0.1], 0.0);
    opt2.load_state_dict_json(&saved_opt, MatchBy::Position)
        .unwrap();
    // torch: the constructor multiplies the loaded 0.05 by 0.5 again and load_state_dict
    // leaves 0.025 in place.
    let mut s2 = ConstantLR::new(&mut opt2, cfg).unwrap();
    assert_eq!(opt2.lr(0).unwrap(), 0.025);
    s2.load_state_dict_json(&mut opt2, &saved).unwrap();
    assert_eq!(opt2.lr(0).unwrap(), 0.05);
    for _ in 0..3 {
        s.step(&mut opt).unwrap();
        s2.step(&mut opt2).unwrap();
        assert_eq!(opt.lr(0).unwrap(), opt2.lr(0).unwrap());
    }
    assert_eq!(opt2.lr(0).unwrap(), 0.1);
    // ... and the groups' initial_lr is the saved base, for schedulers attached later.
    assert_eq!(opt2.group_initial_lr(0).unwrap(), Some(0.1));
}

/// pytorch/pytorch#60265: in torch, `last_epoch = k` performs one more step: `last_epoch`
/// becomes `k + 1`, StepLR / MultiStepLR / ConstantLR apply epoch `k + 1`'s change to the
/// restored lr at once, the others keep it but count one epoch too many. optarena builds the
/// scheduler as a fresh one stepped `k` times, from `initial_lr`.
#[test]
fn constructor_last_epoch_means_steps_taken_pytorch_60265() {
    let mut checked = std::collections::BTreeSet::new();
    for case in scheduler_cases() {
        let name = case["scheduler"].as_str().unwrap();
        if ["SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"].contains(&name) {
            continue;
        }
        let (base, momentum) = (case_lrs(&case), case["momentum"].as_f64().unwrap());
        for k in [0usize, 1, 3, 10, 29] {
            // Run A: fresh, stepped k times, then 10 more.
            let mut opt1 = scheduler_sgd(&base, momentum);
            let mut s1 = build(name, &case["config"], &mut opt1);
            run_epochs(&case, &mut opt1, &mut *s1, 0..k);
            let at_k = snapshot(&opt1);
            let opt_json = opt1.state_dict_json().unwrap();
            let initial: Vec<Option<f64>> = (0..base.len())
                .map(|g| opt1.group_initial_lr(g).unwrap())
                .collect();
            let more = run_epochs(&case, &mut opt1, &mut *s1, k..k + 10);

            // Run B: a new process: the optimizer's state loaded, its initial_lr set (torch keeps
            // it in the optimizer's state dict), the scheduler built with last_epoch = k.
            let mut opt2 = scheduler_sgd(&base, momentum);
            opt2.load_state_dict_json(&opt_json, MatchBy::Position)
                .unwrap();
            for (g, x) in initial.iter().enumerate() {
                opt2.set_group_initial_lr(g, *x).unwrap();
            }
            let mut cfg = case["config"].clone();
            cfg["last_epoch"] = json!(k);
            let mut s2 = build(name, &cfg, &mut opt2);
            assert_eq!(s2.last_epoch(), Some(k as i64), "{}", case["name"]);
            assert_eq!(snapshot(&opt2), at_k, "{}: last_epoch={k}", case["name"]);
            let more2 = run_epochs(&case, &mut opt2, &mut *s2, k..k + 10);
            assert_eq!(
                more2, more,
                "{}: continued from last_epoch={k}",
                case["name"]
            );
            checked.insert(name.to_string());
        }
    }
    assert!(checked.len() >= 12, "{checked:?}");

    // torch requires initial_lr for last_epoch >= 0 (a KeyError); so does optarena, and the
    // failed constructor changes nothing.
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    let e = StepLR::new(&mut opt, StepLRConfig::new(2).with_last_epoch(3)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("param 'initial_lr' is not specified in param_groups[0] when resuming"),
        "{e}"
    );
    assert_eq!(lrs(&opt), [0.1, 0.01]);
    assert_eq!(opt.group_initial_lr(0).unwrap(), None);
    // CyclicLR and OneCycleLR take their bases from their options and need none.
    let s = OneCycleLR::new(&mut opt, OneCycleLRConfig::new(0.1, 10).with_last_epoch(4)).unwrap();
    assert_eq!(s.last_epoch(), Some(4));
    let e = StepLR::new(&mut opt, StepLRConfig::new(2).with_last_epoch(-2)).unwrap_err();
    assert!(e.to_string().starts_with("last_epoch must be -1"), "{e}");
}

/// pytorch/pytorch#162591: torch's `SequentialLR(..., last_epoch=k)` initializes the first
/// scheduler whatever milestone `k` has passed. optarena replays the k steps.
#[test]
fn sequential_lr_last_epoch_resumes_on_the_active_child_pytorch_162591() {
    let children = json!([
        ["ConstantLR", {"factor": 0.1, "total_iters": 3}],
        ["ExponentialLR", {"gamma": 0.9}],
        ["CosineAnnealingWarmRestarts", {"T_0": 4}]
    ]);
    let case = json!({"name": "seq", "config": {}, "metrics": null});
    for k in [0usize, 2, 3, 4, 9, 10, 11, 25] {
        let cfg = json!({"schedulers": children, "milestones": [3, 10]});
        let mut opt1 = scheduler_sgd(&[0.1, 0.01], 0.9);
        let mut s1 = build("SequentialLR", &cfg, &mut opt1);
        run_epochs(&case, &mut opt1, &mut *s1, 0..k);
        let at_k = snapshot(&opt1);
        let more = run_epochs(&case, &mut opt1, &mut *s1, k..k + 8);

        let mut opt2 = scheduler_sgd(&[0.1, 0.01], 0.9);
        for (g, lr) in [0.1, 0.01].into_iter().enumerate() {
            opt2.set_group_initial_lr(g, Some(lr)).unwrap();
        }
        let mut cfg2 = cfg.clone();
        cfg2["last_epoch"] = json!(k);
        let mut s2 = build("SequentialLR", &cfg2, &mut opt2);
        assert_eq!(s2.last_epoch(), Some(k as i64));
        assert_eq!(snapshot(&opt2), at_k, "SequentialLR(last_epoch={k})");
        assert_eq!(run_epochs(&case, &mut opt2, &mut *s2, k..k + 8), more);
        assert_eq!(s2.state_dict().unwrap(), s1.state_dict().unwrap());
    }
}

#[test]
fn composite_states_carry_every_child() {
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    let cfg = json!({"schedulers": [
        ["LinearLR", {"start_factor": 0.5, "total_iters": 4}],
        ["CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 2}]
    ]});
    let mut s = build("ChainedScheduler", &cfg, &mut opt);
    for _ in 0..7 {
        s.step(&mut opt).unwrap();
    }
    let v = s.state_dict().unwrap();
    let kids = v["_schedulers"].as_array().unwrap();
    assert_eq!(kids[0]["scheduler"], "LinearLR");
    assert_eq!(kids[0]["last_epoch"], 7);
    assert_eq!(kids[1]["scheduler"], "CosineAnnealingWarmRestarts");
    assert_eq!(kids[1]["T_i"], 6);
    assert_eq!(kids[1]["T_cur"], 4.0);
    // A composite of other children refuses the state and changes nothing.
    let mut opt2 = scheduler_sgd(&[0.1, 0.01], 0.9);
    let other = json!({"schedulers": [
        ["LinearLR", {"start_factor": 0.5, "total_iters": 4}],
        ["CosineAnnealingLR", {"T_max": 3}]
    ]});
    let mut s2 = build("ChainedScheduler", &other, &mut opt2);
    let (before, lr_before) = (s2.state_dict().unwrap(), lrs(&opt2));
    let e = s2.load_state_dict(&mut opt2, &v).unwrap_err();
    assert!(e.to_string().contains("scheduler 1"), "{e}");
    assert_eq!(s2.state_dict().unwrap(), before);
    assert_eq!(lrs(&opt2), lr_before);
}

// ---------------------------------------------------------------------------------------------
// initial_lr, construction, API
// ---------------------------------------------------------------------------------------------

#[test]
fn initial_lr_is_set_once_as_torch_setdefault() {
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    assert_eq!(opt.group_initial_lr(0).unwrap(), None);
    let c = ConstantLR::new(&mut opt, ConstantLRConfig::default()).unwrap();
    assert_eq!(c.base_lrs(), Some(&[0.1, 0.01][..]));
    assert_eq!(opt.group_initial_lr(1).unwrap(), Some(0.01));
    // The second scheduler finds lr = 0.1/3 but takes initial_lr as its base, as torch does.
    let cos = CosineAnnealingLR::new(&mut opt, CosineAnnealingLRConfig::new(10)).unwrap();
    assert_eq!(cos.base_lrs(), Some(&[0.1, 0.01][..]));
    assert_eq!(lrs(&opt), [0.1 * (1.0 / 3.0), 0.01 * (1.0 / 3.0)]);
    // OneCycleLR overwrites it (torch assigns group["initial_lr"]).
    OneCycleLR::new(&mut opt, OneCycleLRConfig::new(0.5, 10)).unwrap();
    assert_eq!(opt.group_initial_lr(0).unwrap(), Some(0.02));
    // ReduceLROnPlateau never touches it.
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    ReduceLROnPlateau::new(&mut opt, ReduceLROnPlateauConfig::default()).unwrap();
    assert_eq!(opt.group_initial_lr(0).unwrap(), None);
}

/// An optimizer that has only `lr` (and `initial_lr`, which every implementor must keep).
struct LrOnly(Vec<f64>, Vec<Option<f64>>);

impl GroupHyperparams for LrOnly {
    fn num_groups(&self) -> usize {
        self.0.len()
    }
    fn group_hyper(&self, group: usize, name: &str) -> optarena::Result<HyperValue> {
        match name {
            "lr" => Ok(HyperValue::Number(self.0[group])),
            _ => Err(Error::InvalidHyperparameter(format!("no {name}"))),
        }
    }
    fn set_group_hyper(
        &mut self,
        group: usize,
        name: &str,
        value: HyperValue,
    ) -> optarena::Result<()> {
        match (name, value) {
            ("lr", HyperValue::Number(x)) if x >= 0.0 => {
                self.0[group] = x;
                Ok(())
            }
            (n, v) => Err(Error::InvalidHyperparameter(format!("bad {n} = {v}"))),
        }
    }
    fn group_initial_lr(&self, group: usize) -> optarena::Result<Option<f64>> {
        Ok(self.1[group])
    }
    fn set_group_initial_lr(
        &mut self,
        group: usize,
        initial_lr: Option<f64>,
    ) -> optarena::Result<()> {
        self.1[group] = initial_lr;
        Ok(())
    }
}

#[test]
fn any_group_hyperparams_implementor_can_be_scheduled() {
    let mut opt = LrOnly(vec![1.0, 0.5], vec![None; 2]);
    let mut s = ExponentialLR::new(&mut opt, ExponentialLRConfig::new(0.5)).unwrap();
    assert_eq!(opt.1, [Some(1.0), Some(0.5)]);
    s.step(&mut opt).unwrap();
    assert_eq!(opt.0, [0.5, 0.25]);
    // A scheduler attached later takes the initial_lr the first one set (torch's setdefault).
    let c = CosineAnnealingLR::new(&mut opt, CosineAnnealingLRConfig::new(4)).unwrap();
    assert_eq!(c.base_lrs(), Some(&[1.0, 0.5][..]));
    // SequentialLR then resets to the groups' initial_lr.
    let a = Box::new(StepLR::new(&mut opt, StepLRConfig::new(3)).unwrap());
    let b = Box::new(ExponentialLR::new(&mut opt, ExponentialLRConfig::new(0.9)).unwrap());
    let seq = SequentialLR::new(&mut opt, vec![a, b], SequentialLRConfig::new(vec![2])).unwrap();
    assert_eq!(seq.get_last_lr(), [1.0, 0.5]);
    // Cycling momentum needs momentum or betas.
    let e = CyclicLR::new(&mut opt, CyclicLRConfig::new(0.1, 1.0)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
    );
    let e = OneCycleLR::new(&mut opt, OneCycleLRConfig::new(0.1, 10)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
    );
    assert_eq!(opt.0, [1.0, 0.5]);
    CyclicLR::new(
        &mut opt,
        CyclicLRConfig::new(0.1, 1.0).with_cycle_momentum(false),
    )
    .unwrap();
    // torch's initial step runs on base_lrs = the initial_lr set above (1.0, 0.5), and only then
    // replaces base_lrs with base_lr: the lr starts at 1.0 and 0.5, as in torch.
    assert_eq!(opt.0, [1.0, 0.5]);
}

#[test]
fn closures_per_group_and_custom_scale_fn() {
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    let mut s = LambdaLR::per_group(
        &mut opt,
        vec![Box::new(|e| 1.0 / (e as f64 + 1.0)), Box::new(|_| 2.0)],
        LambdaLRConfig::default(),
    )
    .unwrap();
    assert_eq!(lrs(&opt), [0.1, 0.02]);
    s.step(&mut opt).unwrap();
    assert_eq!(lrs(&opt), [0.05, 0.02]);

    // A CyclicLR state saved with a custom scale function loads only into one that has one.
    let cfg = CyclicLRConfig::new(0.01, 0.1).with_step_size_up(2.0);
    let mut c = CyclicLR::with_scale_fn(&mut opt, cfg.clone(), |x| 1.0 / x).unwrap();
    c.step(&mut opt).unwrap();
    let saved = c.state_dict().unwrap();
    let mut plain = CyclicLR::new(&mut opt, cfg.clone()).unwrap();
    let e = plain.load_state_dict(&mut opt, &saved).unwrap_err();
    assert!(e.to_string().contains("custom scale_fn"), "{e}");
    let mut custom = CyclicLR::with_scale_fn(&mut opt, cfg, |x| 1.0 / x).unwrap();
    custom.load_state_dict(&mut opt, &saved).unwrap();
    assert_eq!(custom.get_last_lr(), c.get_last_lr());
}

#[test]
fn configs_deserialize_from_torch_keyword_arguments() {
    let c: CosineAnnealingWarmRestartsConfig =
        serde_json::from_value(json!({"T_0": 5, "T_mult": 2})).unwrap();
    assert_eq!((c.t_0, c.t_mult, c.eta_min, c.last_epoch), (5, 2, 0.0, -1));
    let c: CyclicLRConfig =
        serde_json::from_value(json!({"base_lr": [0.1, 0.2], "max_lr": 1.0})).unwrap();
    assert_eq!(c.base_lr, PerGroup::Each(vec![0.1, 0.2]));
    assert_eq!((c.step_size_up, c.mode.as_str()), (2000.0, "triangular"));
    let c: ConstantLRConfig = serde_json::from_value(json!({})).unwrap();
    assert_eq!(c, ConstantLRConfig::default());
    // A missing required option, or one torch does not have, is an error.
    assert!(serde_json::from_value::<StepLRConfig>(json!({"gamma": 0.5})).is_err());
    assert!(
        serde_json::from_value::<StepLRConfig>(json!({"step_size": 2, "verbose": true})).is_err()
    );
}

#[test]
fn step_metric_and_epochs_where_they_do_not_belong() {
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    let mut s = StepLR::new(&mut opt, StepLRConfig::new(2)).unwrap();
    assert!(s.step_metric(&mut opt, 1.0).is_err());
    assert!(s.step_epoch(&mut opt, Some(1.5)).is_err());
    let mut p = ReduceLROnPlateau::new(&mut opt, ReduceLROnPlateauConfig::default()).unwrap();
    let e = p.step(&mut opt).unwrap_err();
    assert!(e.to_string().contains("'metrics'"), "{e}");
    let a = Box::new(ExponentialLR::new(&mut opt, ExponentialLRConfig::new(0.9)).unwrap());
    let mut seq = SequentialLR::new(&mut opt, vec![a], SequentialLRConfig::new(vec![])).unwrap();
    assert!(seq.step_epoch(&mut opt, Some(3.0)).is_err());
    assert_eq!(seq.last_epoch(), Some(0));
    // A state of another scheduler is refused.
    let v = s.state_dict().unwrap();
    let e = seq.load_state_dict(&mut opt, &v).unwrap_err();
    assert!(e.to_string().contains("saved by StepLR"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// a failed call changes nothing
// ---------------------------------------------------------------------------------------------

#[test]
fn stepping_one_cycle_past_total_steps_fails_and_changes_nothing() {
    let mut opt = make_opt::<optarena::AdamAlgorithm>(&[0.1, 0.01], &json!({}));
    let opt = &mut *opt;
    let mut s = OneCycleLR::new(opt, OneCycleLRConfig::new(0.1, 10)).unwrap();
    for _ in 0..10 {
        s.step(opt).unwrap();
    }
    let (state, lr, b1) = (
        s.state_dict().unwrap(),
        lrs(opt),
        momentum_of(opt, 0, "betas"),
    );
    let e = s.step(opt).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Tried to step 11 times. The specified number of total steps is 10"
    );
    assert_eq!(s.state_dict().unwrap(), state);
    assert_eq!(s.last_epoch(), Some(10));
    assert_eq!(lrs(opt), lr);
    assert_eq!(momentum_of(opt, 0, "betas"), b1);
}

#[test]
fn an_invalid_lr_from_a_child_rolls_back_the_whole_chain() {
    let mut opt = scheduler_sgd(&[0.1, 0.01], 0.9);
    let a = Box::new(ExponentialLR::new(&mut opt, ExponentialLRConfig::new(0.5)).unwrap());
    let b = Box::new(
        MultiplicativeLR::new(
            &mut opt,
            |e| if e == 2 { -1.0 } else { 1.0 },
            LambdaLRConfig::default(),
        )
        .unwrap(),
    );
    let mut chain = ChainedScheduler::new(&mut opt, vec![a, b]).unwrap();
    chain.step(&mut opt).unwrap();
    let (state, lr) = (chain.state_dict().unwrap(), lrs(&opt));
    let e = chain.step(&mut opt).unwrap_err();
    assert!(e.to_string().starts_with("Invalid learning rate"), "{e}");
    assert_eq!(chain.state_dict().unwrap(), state);
    assert_eq!(lrs(&opt), lr);
    assert_eq!(chain.schedulers()[0].last_epoch(), Some(1));
}

#[test]
fn a_failed_constructor_changes_nothing() {
    let mut opt = make_opt::<optarena::AdamAlgorithm>(&[0.1, 0.01], &json!({"betas": [0.8, 0.9]}));
    let opt = &mut *opt;
    // base_lr is set and betas.0 cycled before max_lr's length is checked: all undone.
    let cfg = CyclicLRConfig::new(vec![0.5, 0.6], vec![1.0]);
    let e = CyclicLR::new(opt, cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "max_lr must have the same length as optimizer.param_groups. max_lr has 1 values, \
         param_groups has 2."
    );
    assert_eq!(lrs(opt), [0.1, 0.01]);
    assert_eq!(momentum_of(opt, 0, "betas"), 0.8);
    assert_eq!(opt.group_initial_lr(0).unwrap(), None);
    // A lambda returning a negative lr at the initial step.
    let e = LambdaLR::new(opt, |_| -1.0, LambdaLRConfig::default()).unwrap_err();
    assert!(e.to_string().starts_with("Invalid learning rate"), "{e}");
    assert_eq!(lrs(opt), [0.1, 0.01]);
    assert_eq!(opt.group_initial_lr(0).unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// validation: torch's messages
// ---------------------------------------------------------------------------------------------

fn msg<T: std::fmt::Debug>(r: optarena::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn opt2() -> SGD<f64> {
    scheduler_sgd(&[0.1, 0.01], 0.9)
}

#[test]
fn torch_messages_for_invalid_configurations() {
    let o = &mut opt2();
    let lam = || -> LrLambda { Box::new(|_| 1.0) };
    assert_eq!(
        msg(LambdaLR::per_group(
            o,
            vec![lam(), lam(), lam()],
            LambdaLRConfig::default()
        )),
        "Expected 2 lr_lambdas, but got 3"
    );
    assert_eq!(
        msg(MultiplicativeLR::per_group(
            o,
            vec![lam()],
            LambdaLRConfig::default()
        )),
        "Expected 2 lr_lambdas, but got 1"
    );
    for factor in [1.5, -0.1, f64::NAN] {
        let c = ConstantLRConfig::new().with_factor(factor);
        assert_eq!(
            msg(ConstantLR::new(o, c)),
            "Constant multiplicative factor expected to be between 0 and 1."
        );
    }
    for start_factor in [0.0, 1.5, f64::NAN] {
        let c = LinearLRConfig::new().with_start_factor(start_factor);
        assert_eq!(
            msg(LinearLR::new(o, c)),
            "Starting multiplicative factor expected to be greater than 0 and less or equal to 1."
        );
    }
    let c = LinearLRConfig::new().with_end_factor(-0.5);
    assert_eq!(
        msg(LinearLR::new(o, c)),
        "Ending multiplicative factor expected to be between 0 and 1."
    );
    assert_eq!(
        msg(CosineAnnealingWarmRestarts::new(
            o,
            CosineAnnealingWarmRestartsConfig::new(0)
        )),
        "Expected positive integer T_0, but got 0"
    );
    let c = CosineAnnealingWarmRestartsConfig::new(3).with_t_mult(0);
    assert_eq!(
        msg(CosineAnnealingWarmRestarts::new(o, c)),
        "Expected integer T_mult >= 1, but got 0"
    );
    let mut w =
        CosineAnnealingWarmRestarts::new(o, CosineAnnealingWarmRestartsConfig::new(3)).unwrap();
    assert_eq!(
        msg(w.step_epoch(o, Some(-1.0))),
        "Expected non-negative epoch, but got -1"
    );
    assert_eq!(
        msg(w.step_epoch(o, Some(-0.5))),
        "Expected non-negative epoch, but got -0.5"
    );

    // CyclicLR
    let c = CyclicLRConfig::new(vec![0.1, 0.2, 0.3], 1.0);
    assert_eq!(
        msg(CyclicLR::new(o, c)),
        "base_lr must have the same length as optimizer.param_groups. base_lr has 3 values, \
         param_groups has 2."
    );
    let c = CyclicLRConfig::new(0.1, 1.0).with_base_momentum(PerGroup::Each(vec![0.8]));
    assert_eq!(
        msg(CyclicLR::new(o, c)),
        "base_momentum must have the same length as optimizer.param_groups. base_momentum has \
         1 values, param_groups has 2."
    );
    let c = CyclicLRConfig::new(0.1, 1.0).with_mode("triangle");
    assert_eq!(
        msg(CyclicLR::new(o, c.clone())),
        "mode is invalid and scale_fn is None"
    );
    assert!(CyclicLR::with_scale_fn(o, c, |_| 1.0).is_ok());

    // OneCycleLR
    let oc = |f: &dyn Fn(&mut OneCycleLRConfig)| {
        let mut c = OneCycleLRConfig::new(0.1, 100);
        f(&mut c);
        c
    };
    let cases: Vec<(OneCycleLRConfig, &str)> = vec![
        (
            oc(&|c| c.total_steps = Some(0)),
            "Expected positive integer total_steps, but got 0",
        ),
        (
            oc(&|c| {
                c.total_steps = None;
                c.epochs = Some(-1);
                c.steps_per_epoch = Some(10);
            }),
            "Expected positive integer epochs, but got -1",
        ),
        (
            oc(&|c| {
                c.total_steps = None;
                c.epochs = Some(3);
                c.steps_per_epoch = Some(0);
            }),
            "Expected positive integer steps_per_epoch, but got 0",
        ),
        (
            oc(&|c| {
                c.total_steps = None;
                c.epochs = Some(3);
            }),
            "You must define either total_steps OR (epochs AND steps_per_epoch)",
        ),
        (
            oc(&|c| c.pct_start = 1.5),
            "Expected float between 0 and 1 pct_start, but got 1.5",
        ),
        (
            oc(&|c| c.pct_start = f64::NAN),
            "Expected float between 0 and 1 pct_start, but got NaN",
        ),
        (
            oc(&|c| c.anneal_strategy = "cosine".into()),
            "anneal_strategy must be one of 'cos' or 'linear', instead got cosine",
        ),
        (
            oc(&|c| c.max_lr = PerGroup::Each(vec![0.1])),
            "max_lr must have the same length as optimizer.param_groups. max_lr has 1 values, \
             param_groups has 2.",
        ),
        (
            oc(&|c| c.max_momentum = PerGroup::Each(vec![0.9, 0.9, 0.9])),
            "max_momentum must have the same length as optimizer.param_groups. max_momentum has \
             3 values, param_groups has 2.",
        ),
    ];
    for (c, want) in cases {
        assert_eq!(msg(OneCycleLR::new(o, c)), want);
    }

    // ReduceLROnPlateau
    let rp = |f: &dyn Fn(&mut ReduceLROnPlateauConfig)| {
        let mut c = ReduceLROnPlateauConfig::default();
        f(&mut c);
        c
    };
    for (c, want) in [
        (rp(&|c| c.factor = 1.0), "Factor should be < 1.0."),
        (rp(&|c| c.factor = f64::NAN), "Factor should be < 1.0."),
        (
            rp(&|c| c.min_lr = PerGroup::Each(vec![0.0; 3])),
            "expected 2 min_lrs, got 3",
        ),
        (rp(&|c| c.mode = "avg".into()), "mode avg is unknown!"),
        (
            rp(&|c| c.threshold_mode = "pct".into()),
            "threshold mode pct is unknown!",
        ),
    ] {
        assert_eq!(msg(ReduceLROnPlateau::new(o, c)), want);
    }

    // SequentialLR and ChainedScheduler
    assert_eq!(
        msg(SequentialLR::new(
            o,
            vec![],
            SequentialLRConfig::new(vec![])
        )),
        "SequentialLR expects at least one scheduler, but got no scheduler."
    );
    assert_eq!(
        msg(ChainedScheduler::new(o, vec![])),
        "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler."
    );
    let exp = |o: &mut SGD<f64>| -> Box<dyn LrScheduler> {
        Box::new(ExponentialLR::new(o, ExponentialLRConfig::new(0.9)).unwrap())
    };
    let plateau = |o: &mut SGD<f64>| -> Box<dyn LrScheduler> {
        Box::new(ReduceLROnPlateau::new(o, ReduceLROnPlateauConfig::default()).unwrap())
    };
    let kids = vec![exp(o), plateau(o)];
    assert_eq!(
        msg(SequentialLR::new(o, kids, SequentialLRConfig::new(vec![3]))),
        "SequentialLR does not support `ReduceLROnPlateau` scheduler as it requires additional \
         kwargs to be specified when calling `step`, but got one at index 1 in the given \
         schedulers sequence."
    );
    let kids = vec![plateau(o)];
    assert_eq!(
        msg(ChainedScheduler::new(o, kids)),
        "ChainedScheduler does not support `ReduceLROnPlateau` scheduler as it requires \
         additional kwargs to be specified when calling `step`, but got one at index 0 in the \
         given schedulers sequence."
    );
    let kids = vec![exp(o), exp(o)];
    assert_eq!(
        msg(SequentialLR::new(o, kids, SequentialLRConfig::new(vec![]))),
        "Sequential Schedulers expects number of schedulers provided to be one more than the \
         number of milestone points, but got number of schedulers 2 and the number of \
         milestones to be equal to 0"
    );
    let mut other = scheduler_sgd(&[0.1, 0.01, 0.001], 0.9);
    let foreign: Box<dyn LrScheduler> =
        Box::new(ExponentialLR::new(&mut other, ExponentialLRConfig::new(0.9)).unwrap());
    let kids = vec![exp(o), foreign];
    assert!(msg(ChainedScheduler::new(o, kids))
        .starts_with("ChainedScheduler expects all schedulers to belong to the same optimizer"));
}

#[test]
fn optarena_rejects_what_torch_only_fails_on_later() {
    let o = &mut opt2();
    assert_eq!(
        msg(StepLR::new(o, StepLRConfig::new(0))),
        "step_size must be a positive integer, but got 0"
    );
    assert_eq!(
        msg(CosineAnnealingLR::new(o, CosineAnnealingLRConfig::new(0))),
        "T_max must be a positive integer, but got 0"
    );
    let c = ExponentialLRConfig::new(f64::NAN);
    assert_eq!(msg(ExponentialLR::new(o, c)), "Invalid gamma value: NaN");
    let c = CyclicLRConfig::new(0.1, 1.0)
        .with_step_size_up(0.0)
        .with_step_size_down(Some(0.0));
    assert_eq!(msg(CyclicLR::new(o, c)), "float division by zero");
    // ConstantLR(factor=0) divides by zero at total_iters, in torch too.
    let c = ConstantLRConfig::new().with_factor(0.0).with_total_iters(2);
    let mut s = ConstantLR::new(o, c).unwrap();
    s.step(o).unwrap();
    assert_eq!(msg(s.step(o)), "float division by zero");
    assert_eq!(s.last_epoch(), Some(1));
}

#[test]
fn reduce_lr_on_plateau_after_a_group_is_added() {
    let mut b = ArenaBuilder::<f64>::new();
    let p: Vec<_> = (0..3)
        .map(|i| b.zeros(&format!("p{i}"), &[2]).unwrap())
        .collect();
    let arena = b.build();
    let cfg = optarena::SGDConfig::default().with_lr(1.0);
    let new_opt = || {
        SGD::<f64>::new(
            &arena,
            [ParamGroup::new([p[0]]), ParamGroup::new([p[1]])],
            cfg.clone(),
        )
        .unwrap()
    };
    let config = |min_lr: PerGroup| {
        ReduceLROnPlateauConfig::new()
            .with_patience(0)
            .with_min_lr(min_lr)
    };
    // A list of min_lrs no longer fits: torch's RuntimeError.
    let mut opt = new_opt();
    let mut s = ReduceLROnPlateau::new(&mut opt, config(PerGroup::Each(vec![0.0, 0.0]))).unwrap();
    opt.add_param_group(&arena, ParamGroup::new([p[2]]))
        .unwrap();
    s.step_metric(&mut opt, 1.0).unwrap();
    let e = msg(s.step_metric(&mut opt, 2.0));
    assert!(
        e.starts_with("The number of param groups in the `optimizer` (3) differs"),
        "{e}"
    );
    assert_eq!(lrs(&opt), [1.0, 1.0, 1.0]);
    // A single min_lr is extended to the new group.
    let mut opt = new_opt();
    let mut s = ReduceLROnPlateau::new(&mut opt, config(PerGroup::All(0.0))).unwrap();
    opt.add_param_group(&arena, ParamGroup::new([p[2]]))
        .unwrap();
    s.step_metric(&mut opt, 1.0).unwrap();
    s.step_metric(&mut opt, 2.0).unwrap();
    assert_eq!(lrs(&opt), [0.1, 0.1, 0.1]);
    assert_eq!(s.get_last_lr(), [0.1, 0.1, 0.1]);
}

#[test]
fn the_shared_samples_are_in_the_committed_copy() {
    // The schedulers sample beside the repository is the same as the committed copy, so the
    // save/load tests above cover it.
    if let Some(dir) = shared_samples_dir() {
        let a = load_cases(&dir.join("schedulers.json"));
        let b = load_cases(Path::new(&fixtures_dir().join("sample/schedulers.json")));
        assert_eq!(a, b);
    }
}

// ---------------------------------------------------------------------------------------------
// SWALR (torch.optim.swa_utils)
// ---------------------------------------------------------------------------------------------

#[test]
fn swalr_torch_messages_and_nothing_changes() {
    let o = &mut opt2();
    let before = lrs(o);
    assert_eq!(
        msg(SWALR::new(o, SWALRConfig::new(vec![0.1, 0.2, 0.3]))),
        "swa_lr must have the same length as optimizer.param_groups. \
         swa_lr has 3 values, param_groups has 2."
    );
    assert_eq!(
        msg(SWALR::new(o, SWALRConfig::new(0.05).with_anneal_epochs(-1))),
        "anneal_epochs must be equal or greater than 0, got -1"
    );
    assert_eq!(
        msg("exp".parse::<AnnealStrategy>()),
        "anneal_strategy must be one of 'cos' or 'linear', instead got exp"
    );
    let e = serde_json::from_value::<SWALRConfig>(json!({"swa_lr": 0.1, "anneal_strategy": "exp"}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("anneal_strategy must be one of 'cos' or 'linear', instead got exp"),
        "{e}"
    );
    // A negative swa_lr is refused by the optimizer's groups when it is reached.
    let mut s = SWALR::new(o, SWALRConfig::new(0.05).with_anneal_epochs(0)).unwrap();
    assert_eq!(lrs(o), [0.05, 0.05]);
    s.step(o).unwrap();
    assert_eq!(lrs(o), [0.05, 0.05]);
    let o2 = &mut opt2();
    assert!(SWALR::new(o2, SWALRConfig::new(-1.0).with_anneal_epochs(0)).is_err());
    assert_eq!(lrs(o2), before, "a failed constructor changed the lr");
    assert_eq!(o2.group_initial_lr(0).unwrap(), None);
}

#[test]
fn swalr_state_round_trips_and_bad_states_are_refused() {
    let o = &mut opt2();
    let mut s = SWALR::new(
        o,
        SWALRConfig::new(vec![0.05, 0.002])
            .with_anneal_epochs(5)
            .with_anneal_strategy(AnnealStrategy::Linear),
    )
    .unwrap();
    for _ in 0..3 {
        s.step(o).unwrap();
    }
    let v = s.state_dict().unwrap();
    assert_eq!(v["scheduler"], "SWALR");
    assert_eq!(v["config"]["anneal_strategy"], "linear");
    assert_eq!(v["swa_lrs"], json!([0.05, 0.002]));
    assert_eq!(v["_step_count"], 4);
    let o2 = &mut opt2();
    let mut s2 = SWALR::new(o2, SWALRConfig::new(0.5)).unwrap();
    s2.load_state_dict(o2, &v).unwrap();
    assert_eq!(bits(&lrs(o2)), bits(&lrs(o)));
    for _ in 0..4 {
        s.step(o).unwrap();
        s2.step(o2).unwrap();
        assert_eq!(bits(&lrs(o2)), bits(&lrs(o)));
    }
    let fresh = SWALR::new(&mut opt2(), SWALRConfig::new(0.5))
        .unwrap()
        .state_dict()
        .unwrap();
    let mut bad = v.clone();
    bad["config"]["anneal_epochs"] = json!(-2);
    let mut bad2 = v.clone();
    bad2["swa_lrs"] = json!([0.05]);
    let mut bad3 = v.clone();
    bad3["config"]["anneal_strategy"] = json!("step");
    let mut bad4 = v.clone();
    bad4["scheduler"] = json!("LinearLR");
    for b in [bad, bad2, bad3, bad4] {
        let o3 = &mut opt2();
        let mut s3 = SWALR::new(o3, SWALRConfig::new(0.5)).unwrap();
        let before = lrs(o3);
        assert!(s3.load_state_dict(o3, &b).is_err(), "{b}");
        assert_eq!(s3.state_dict().unwrap(), fresh);
        assert_eq!(lrs(o3), before);
    }
}

// ---------------------------------------------------------------------------------------------
// add_param_group after the scheduler was built (scripts/gen_scheduler_extra.py --only add_group)
// ---------------------------------------------------------------------------------------------

/// Every scheduler kind, with a third group added mid-run: the lrs and momentums of every group
/// after each step are torch's, the added group gets no `initial_lr` (as in torch), and where
/// torch raises (a step that needs a per-group value the scheduler does not have for the new
/// group) optarena returns an error that names the scheduler and torch's exception, and
/// changes nothing.
#[test]
fn schedulers_follow_add_param_group_as_torch() {
    let cases = load_cases(&fixtures_dir().join("sched/add_group.json"));
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let (mut carried, mut raised) = (0, 0);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut b = ArenaBuilder::<f64>::new();
        let h: Vec<_> = (0..3)
            .map(|i| b.param(&format!("p{i}"), &[2], &[1.0, -1.0]).unwrap())
            .collect();
        let arena = b.build();
        let mut opt = SGD::new(
            &arena,
            [
                ParamGroup::new([h[0]]).with("lr", 0.1),
                ParamGroup::new([h[1]]).with("lr", 0.01),
            ],
            SGDConfig::default().with_momentum(0.9),
        )
        .unwrap();
        let mut sched = build(
            case["scheduler"].as_str().unwrap(),
            &case["config"],
            &mut opt,
        );
        let check = |opt: &dyn GroupHyperparams, i: usize| {
            let want = case["lrs"][i].as_array().unwrap();
            assert_eq!(opt.num_groups(), want.len(), "{name}: record {i}");
            for g in 0..want.len() {
                let (want_lr, want_m) = (
                    want[g].as_f64().unwrap(),
                    case["momentums"][i][g].as_f64().unwrap(),
                );
                let (lr, m) = (opt.lr(g).unwrap(), momentum_of(opt, g, "momentum"));
                assert!(
                    sched_close(lr, want_lr) && sched_close(m, want_m),
                    "{name}: record {i}, group {g}: lr {lr:e} vs torch {want_lr:e}, momentum \
                     {m:e} vs torch {want_m:e}"
                );
            }
        };
        check(&opt, 0);
        let add_after = case["add_after"].as_u64().unwrap() as usize;
        let metrics = case["metrics"].as_array();
        for (i, a) in case["actions"].as_array().unwrap().iter().enumerate() {
            if i == add_after {
                opt.add_param_group(
                    &arena,
                    ParamGroup::new([h[2]])
                        .with("lr", 0.05)
                        .with("momentum", 0.8),
                )
                .unwrap();
                // torch's add_param_group gives the new group no initial_lr.
                assert!(case["initial_lr_after_add"].is_null(), "{name}");
                assert_eq!(opt.group_initial_lr(2).unwrap(), None, "{name}");
            }
            let before = (lrs(&opt), sched.state_dict().unwrap());
            let r = match metrics {
                Some(m) => sched.step_metric(&mut opt, m[i].as_f64().unwrap()),
                None => sched.step_epoch(&mut opt, a.as_f64()),
            };
            let torch_error = &case["error"];
            if !torch_error.is_null() && torch_error["action"].as_u64() == Some(i as u64) {
                let e = r.expect_err(name).to_string();
                let (ty, msg) = (
                    torch_error["type"].as_str().unwrap(),
                    torch_error["message"].as_str().unwrap(),
                );
                assert!(
                    e.contains(ty) || ty == "RuntimeError",
                    "{name}: action {i}: {e:?} should name torch's {ty}"
                );
                assert!(
                    e.contains(msg),
                    "{name}: action {i}: {e:?} vs torch's {msg:?}"
                );
                // It names the scheduler (or the composite's child) that raised.
                let who = e.split(':').next().unwrap();
                let sched_name = case["scheduler"].as_str().unwrap();
                assert!(
                    e.contains(sched_name)
                        || case["config"].to_string().contains(&format!("\"{who}\"")),
                    "{name}: {e:?} names no scheduler"
                );
                // A failed step changes nothing.
                assert_eq!((lrs(&opt), sched.state_dict().unwrap()), before, "{name}");
                raised += 1;
                break;
            }
            r.unwrap_or_else(|e| panic!("{name}: action {i}: {e}"));
            check(&opt, i + 1);
            if i + 1 == case["actions"].as_array().unwrap().len() {
                carried += 1;
                // The state saved after the add loads into a scheduler on an optimizer with the
                // same three groups and continues the same way.
                let saved = sched.state_dict().unwrap();
                let mut opt2 = SGD::new(
                    &arena,
                    [
                        ParamGroup::new([h[0]]).with("lr", 0.1),
                        ParamGroup::new([h[1]]).with("lr", 0.01),
                    ],
                    SGDConfig::default().with_momentum(0.9),
                )
                .unwrap();
                let mut s2 = build(
                    case["scheduler"].as_str().unwrap(),
                    &case["config"],
                    &mut opt2,
                );
                opt2.add_param_group(
                    &arena,
                    ParamGroup::new([h[2]])
                        .with("lr", 0.05)
                        .with("momentum", 0.8),
                )
                .unwrap();
                s2.load_state_dict(&mut opt2, &saved)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(bits(&lrs(&opt2)), bits(&lrs(&opt)), "{name}: resumed lrs");
                assert_eq!(s2.state_dict().unwrap(), saved, "{name}");
            }
        }
    }
    assert!(
        carried >= 10 && raised >= 10,
        "carried on {carried}, raised {raised}"
    );
}

// ---------------------------------------------------------------------------------------------
// config builders: `new` + one `with_<field>` per option, torch's names on the wire
// ---------------------------------------------------------------------------------------------

/// Serialises `config`, checks the JSON is `expected` (torch's keyword names, unchanged by the
/// builders), and that it reads back to the same config.
fn wire<C>(config: &C, expected: Value)
where
    C: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let v = serde_json::to_value(config).unwrap();
    assert_eq!(v, expected);
    assert_eq!(&serde_json::from_value::<C>(v).unwrap(), config);
}

/// Every `with_<field>` of every scheduler config sets its field: each config is built with a
/// value other than torch's default for every option, and its JSON names all of them.
#[test]
fn every_config_builder_sets_its_field_under_torchs_name() {
    wire(
        &StepLRConfig::new(3)
            .with_step_size(4)
            .with_gamma(0.5)
            .with_last_epoch(2),
        json!({"step_size": 4, "gamma": 0.5, "last_epoch": 2}),
    );
    wire(
        &MultiStepLRConfig::new(vec![1])
            .with_milestones(vec![2, 5])
            .with_gamma(0.3)
            .with_last_epoch(1),
        json!({"milestones": [2, 5], "gamma": 0.3, "last_epoch": 1}),
    );
    wire(
        &ConstantLRConfig::new()
            .with_factor(0.5)
            .with_total_iters(3)
            .with_last_epoch(0),
        json!({"factor": 0.5, "total_iters": 3, "last_epoch": 0}),
    );
    wire(
        &LinearLRConfig::new()
            .with_start_factor(0.25)
            .with_end_factor(0.75)
            .with_total_iters(7)
            .with_last_epoch(2),
        json!({"start_factor": 0.25, "end_factor": 0.75, "total_iters": 7, "last_epoch": 2}),
    );
    wire(
        &ExponentialLRConfig::new(0.9)
            .with_gamma(0.8)
            .with_last_epoch(3),
        json!({"gamma": 0.8, "last_epoch": 3}),
    );
    wire(
        &PolynomialLRConfig::new()
            .with_total_iters(9)
            .with_power(2.0)
            .with_last_epoch(1),
        json!({"total_iters": 9, "power": 2.0, "last_epoch": 1}),
    );
    wire(
        &CosineAnnealingLRConfig::new(10)
            .with_t_max(12)
            .with_eta_min(0.01)
            .with_last_epoch(4),
        json!({"T_max": 12, "eta_min": 0.01, "last_epoch": 4}),
    );
    wire(
        &CosineAnnealingWarmRestartsConfig::new(5)
            .with_t_0(6)
            .with_t_mult(2)
            .with_eta_min(0.001)
            .with_last_epoch(3),
        json!({"T_0": 6, "T_mult": 2, "eta_min": 0.001, "last_epoch": 3}),
    );
    wire(
        &CyclicLRConfig::new(0.5, 2.0)
            .with_base_lr(vec![0.01, 0.02])
            .with_max_lr(0.1)
            .with_step_size_up(3.0)
            .with_step_size_down(Some(5.0))
            .with_mode("exp_range")
            .with_gamma(0.99)
            .with_scale_mode("iterations")
            .with_cycle_momentum(false)
            .with_base_momentum(0.7)
            .with_max_momentum(vec![0.95, 0.9])
            .with_last_epoch(2),
        json!({
            "base_lr": [0.01, 0.02], "max_lr": 0.1, "step_size_up": 3.0, "step_size_down": 5.0,
            "mode": "exp_range", "gamma": 0.99, "scale_mode": "iterations",
            "cycle_momentum": false, "base_momentum": 0.7, "max_momentum": [0.95, 0.9],
            "last_epoch": 2,
        }),
    );
    wire(
        &OneCycleLRConfig::new(1.0, 50)
            .with_max_lr(vec![0.1, 0.2])
            .with_total_steps(None)
            .with_epochs(Some(4))
            .with_steps_per_epoch(Some(25))
            .with_pct_start(0.25)
            .with_anneal_strategy("linear")
            .with_cycle_momentum(false)
            .with_base_momentum(0.8)
            .with_max_momentum(0.9)
            .with_div_factor(10.0)
            .with_final_div_factor(100.0)
            .with_three_phase(true)
            .with_last_epoch(3),
        json!({
            "max_lr": [0.1, 0.2], "total_steps": null, "epochs": 4, "steps_per_epoch": 25,
            "pct_start": 0.25, "anneal_strategy": "linear", "cycle_momentum": false,
            "base_momentum": 0.8, "max_momentum": 0.9, "div_factor": 10.0,
            "final_div_factor": 100.0, "three_phase": true, "last_epoch": 3,
        }),
    );
    wire(
        &ReduceLROnPlateauConfig::new()
            .with_mode("max")
            .with_factor(0.5)
            .with_patience(2)
            .with_threshold(0.01)
            .with_threshold_mode("abs")
            .with_cooldown(1)
            .with_min_lr(vec![0.001, 0.0])
            .with_eps(1e-6),
        json!({
            "mode": "max", "factor": 0.5, "patience": 2, "threshold": 0.01,
            "threshold_mode": "abs", "cooldown": 1, "min_lr": [0.001, 0.0], "eps": 1e-6,
        }),
    );
    wire(
        &SequentialLRConfig::new(vec![1])
            .with_milestones(vec![3, 8])
            .with_last_epoch(5),
        json!({"milestones": [3, 8], "last_epoch": 5}),
    );
    wire(
        &SWALRConfig::new(1.0)
            .with_swa_lr(vec![0.05, 0.002])
            .with_anneal_epochs(4)
            .with_anneal_strategy(AnnealStrategy::Linear)
            .with_last_epoch(1),
        json!({"swa_lr": [0.05, 0.002], "anneal_epochs": 4, "anneal_strategy": "linear",
               "last_epoch": 1}),
    );
    wire(
        &LambdaLRConfig::new().with_last_epoch(6),
        json!({"last_epoch": 6}),
    );
}

/// `new()` of the configs whose every option has a default is torch's defaults: the same as
/// `Default` and as deserialising `{}`; `new(required...)` fills torch's defaults around the
/// required arguments, as deserialising just those does.
#[test]
fn config_constructors_are_torchs_defaults() {
    fn same<C>(config: C, json: Value)
    where
        C: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(config, serde_json::from_value::<C>(json).unwrap());
    }
    same(ConstantLRConfig::new(), json!({}));
    same(LinearLRConfig::new(), json!({}));
    same(PolynomialLRConfig::new(), json!({}));
    same(ReduceLROnPlateauConfig::new(), json!({}));
    same(LambdaLRConfig::new(), json!({}));
    assert_eq!(ConstantLRConfig::new(), ConstantLRConfig::default());
    assert_eq!(LinearLRConfig::new(), LinearLRConfig::default());
    assert_eq!(PolynomialLRConfig::new(), PolynomialLRConfig::default());
    assert_eq!(
        ReduceLROnPlateauConfig::new(),
        ReduceLROnPlateauConfig::default()
    );
    assert_eq!(LambdaLRConfig::new(), LambdaLRConfig::default());
    same(StepLRConfig::new(3), json!({"step_size": 3}));
    same(
        MultiStepLRConfig::new(vec![2, 4]),
        json!({"milestones": [2, 4]}),
    );
    same(ExponentialLRConfig::new(0.9), json!({"gamma": 0.9}));
    same(CosineAnnealingLRConfig::new(10), json!({"T_max": 10}));
    same(CosineAnnealingWarmRestartsConfig::new(5), json!({"T_0": 5}));
    same(
        CyclicLRConfig::new(0.01, 0.1),
        json!({"base_lr": 0.01, "max_lr": 0.1}),
    );
    same(
        OneCycleLRConfig::new(0.1, 100),
        json!({"max_lr": 0.1, "total_steps": 100}),
    );
    same(
        OneCycleLRConfig::from_epochs(0.1, 4, 25),
        json!({"max_lr": 0.1, "epochs": 4, "steps_per_epoch": 25}),
    );
    same(SequentialLRConfig::new(vec![3]), json!({"milestones": [3]}));
    same(SWALRConfig::new(0.05), json!({"swa_lr": 0.05}));
}

/// torch: `OneCycleLR(opt, max_lr=0.1, epochs=4, steps_per_epoch=25)` runs the schedule of
/// `total_steps=100`, bit for bit; `from_epochs` is that form.
#[test]
fn one_cycle_from_epochs_is_total_steps_epochs_times_steps() {
    let run = |config: OneCycleLRConfig| {
        let mut opt = scheduler_sgd(&[0.1, 0.05], 0.9);
        let mut s = OneCycleLR::new(&mut opt, config).unwrap();
        let mut trace = vec![lrs(&opt)];
        // torch raises once `last_epoch` passes `total_steps` (its constructor took step 0).
        for _ in 0..100 {
            s.step(&mut opt).unwrap();
            trace.push(lrs(&opt));
        }
        assert!(s.step(&mut opt).is_err(), "stepped past total_steps = 100");
        trace.into_iter().flat_map(|v| bits(&v)).collect::<Vec<_>>()
    };
    assert_eq!(
        run(OneCycleLRConfig::from_epochs(0.1, 4, 25)),
        run(OneCycleLRConfig::new(0.1, 100))
    );
    let mut opt = scheduler_sgd(&[0.1], 0.9);
    assert_eq!(
        msg(OneCycleLR::new(
            &mut opt,
            OneCycleLRConfig::from_epochs(0.1, 0, 25)
        )),
        "Expected positive integer epochs, but got 0"
    );
}
