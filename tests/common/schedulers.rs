//! Replaying LR scheduler cases (SCHEMA.md's `schedulers.json`).

use super::*;

/// The `lr_lambda` of a fixture: one expression or one per group.
fn lr_lambdas(v: &Value) -> Result<Vec<optarena::schedule::LrLambda>, String> {
    let one = |s: &Value| -> Result<optarena::schedule::LrLambda, String> {
        let src = s.as_str().ok_or("lr_lambda must be a string")?;
        let e = PyExpr::parse(src, "epoch")?;
        Ok(Box::new(move |epoch| {
            e.eval(epoch as f64).unwrap_or(f64::NAN)
        }))
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        s => Ok(vec![one(s)?]),
    }
}

/// Builds the scheduler `name` with torch keyword arguments `cfg` on `opt`, as torch's
/// constructor would. `Err(Outcome::Skip)` for a scheduler optarena lacks.
pub fn build_scheduler(
    name: &str,
    cfg: &Value,
    opt: &mut dyn optarena::GroupHyperparams,
) -> Result<Box<dyn optarena::LrScheduler>, Outcome> {
    use optarena::schedule::*;
    let fail = |e: String| Outcome::Fail(format!("{name}: {e}"));
    let mut cfg = cfg.as_object().cloned().unwrap_or_default();
    macro_rules! parse {
        ($t:ty) => {
            serde_json::from_value::<$t>(Value::Object(cfg.clone()))
                .map_err(|e| fail(format!("config: {e}")))?
        };
    }
    let built: optarena::Result<Box<dyn optarena::LrScheduler>> = match name {
        "LambdaLR" | "MultiplicativeLR" => {
            let l = cfg
                .remove("lr_lambda")
                .ok_or_else(|| fail("no lr_lambda".into()))?;
            let per_group = l.is_array();
            let lambdas = lr_lambdas(&l).map_err(fail)?;
            let c = parse!(LambdaLRConfig);
            match (name, per_group) {
                ("LambdaLR", true) => {
                    LambdaLR::per_group(opt, lambdas, c).map(|s| Box::new(s) as Box<_>)
                }
                ("LambdaLR", false) => {
                    let f = lambdas.into_iter().next().unwrap();
                    LambdaLR::new(opt, f, c).map(|s| Box::new(s) as Box<_>)
                }
                (_, true) => {
                    MultiplicativeLR::per_group(opt, lambdas, c).map(|s| Box::new(s) as Box<_>)
                }
                (_, false) => {
                    let f = lambdas.into_iter().next().unwrap();
                    MultiplicativeLR::new(opt, f, c).map(|s| Box::new(s) as Box<_>)
                }
            }
        }
        "StepLR" => StepLR::new(opt, parse!(StepLRConfig)).map(|s| Box::new(s) as Box<_>),
        "MultiStepLR" => {
            MultiStepLR::new(opt, parse!(MultiStepLRConfig)).map(|s| Box::new(s) as Box<_>)
        }
        "ConstantLR" => {
            ConstantLR::new(opt, parse!(ConstantLRConfig)).map(|s| Box::new(s) as Box<_>)
        }
        "LinearLR" => LinearLR::new(opt, parse!(LinearLRConfig)).map(|s| Box::new(s) as Box<_>),
        "ExponentialLR" => {
            ExponentialLR::new(opt, parse!(ExponentialLRConfig)).map(|s| Box::new(s) as Box<_>)
        }
        "PolynomialLR" => {
            PolynomialLR::new(opt, parse!(PolynomialLRConfig)).map(|s| Box::new(s) as Box<_>)
        }
        "CosineAnnealingLR" => CosineAnnealingLR::new(opt, parse!(CosineAnnealingLRConfig))
            .map(|s| Box::new(s) as Box<_>),
        "CosineAnnealingWarmRestarts" => {
            CosineAnnealingWarmRestarts::new(opt, parse!(CosineAnnealingWarmRestartsConfig))
                .map(|s| Box::new(s) as Box<_>)
        }
        "CyclicLR" => {
            let scale_fn = match cfg.remove("scale_fn") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    PyExpr::parse(v.as_str().ok_or_else(|| fail("scale_fn".into()))?, "x")
                        .map_err(fail)?,
                ),
            };
            let c = parse!(CyclicLRConfig);
            match scale_fn {
                None => CyclicLR::new(opt, c).map(|s| Box::new(s) as Box<_>),
                Some(e) => CyclicLR::with_scale_fn(opt, c, move |x| e.eval(x).unwrap_or(f64::NAN))
                    .map(|s| Box::new(s) as Box<_>),
            }
        }
        "OneCycleLR" => {
            OneCycleLR::new(opt, parse!(OneCycleLRConfig)).map(|s| Box::new(s) as Box<_>)
        }
        "ReduceLROnPlateau" => ReduceLROnPlateau::new(opt, parse!(ReduceLROnPlateauConfig))
            .map(|s| Box::new(s) as Box<_>),
        "SequentialLR" | "ChainedScheduler" => {
            let list = cfg
                .remove("schedulers")
                .and_then(|v| v.as_array().cloned())
                .ok_or_else(|| fail("no schedulers list".into()))?;
            cfg.remove("optimizer");
            let mut children = Vec::new();
            for pair in &list {
                let (cn, cc) = (pair[0].as_str().unwrap_or("?"), &pair[1]);
                children.push(build_scheduler(cn, cc, opt)?);
            }
            if name == "SequentialLR" {
                SequentialLR::new(opt, children, parse!(SequentialLRConfig))
                    .map(|s| Box::new(s) as Box<_>)
            } else {
                if !cfg.is_empty() {
                    return Err(fail(format!("unknown options {cfg:?}")));
                }
                ChainedScheduler::new(opt, children).map(|s| Box::new(s) as Box<_>)
            }
        }
        "SWALR" => SWALR::new(opt, parse!(SWALRConfig)).map(|s| Box::new(s) as Box<_>),
        other => return Err(Outcome::Skip(format!("scheduler {other}"))),
    };
    built.map_err(|e| fail(format!("construction failed: {e}")))
}

/// An SGD optimizer with one parameter per group, the given lrs, and `momentum`: the
/// optimizer of SCHEMA.md's scheduler cases.
pub fn scheduler_sgd(lrs: &[f64], momentum: f64) -> optarena::SGD<f64> {
    let mut b = ArenaBuilder::<f64>::new();
    let handles: Vec<_> = (0..lrs.len())
        .map(|i| b.param(&format!("p{i}"), &[3], &[1.0, -2.0, 0.5]).unwrap())
        .collect();
    let arena = b.build();
    let groups = handles
        .iter()
        .zip(lrs)
        .map(|(h, &lr)| ParamGroup::new([*h]).with("lr", lr));
    let config = optarena::SGDConfig::default().with_momentum(momentum);
    optarena::SGD::new(&arena, groups, config).unwrap()
}

/// Replays one `schedulers.json` case.
pub fn run_scheduler_case(case: &Value) -> Outcome {
    use optarena::GroupHyperparams;
    let name = case["name"].as_str().unwrap_or("?");
    let sched_name = case["scheduler"].as_str().unwrap_or("?");
    let base_lrs: Vec<f64> = case["base_lrs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_else(|| vec![0.1, 0.01]);
    let momentum = case["momentum"].as_f64().unwrap_or(0.0);
    let mut opt = scheduler_sgd(&base_lrs, momentum);
    // swalr.json's recipe cases (scripts/gen_fixtures.py): a warm-up scheduler built first and
    // stepped for `warmup.epochs` epochs, then the case's scheduler.
    let mut warmup = match case.get("warmup") {
        Some(w) => {
            let wn = w["scheduler"].as_str().unwrap_or("?");
            match build_scheduler(wn, &w["config"], &mut opt) {
                Ok(s) => Some((s, w["epochs"].as_u64().unwrap_or(0) as usize)),
                Err(Outcome::Fail(m)) => return Outcome::Fail(format!("{name}: {m}")),
                Err(o) => return o,
            }
        }
        None => None,
    };
    let mut sched = match build_scheduler(sched_name, &case["config"], &mut opt) {
        Ok(s) => s,
        Err(Outcome::Fail(m)) => return Outcome::Fail(format!("{name}: {m}")),
        Err(o) => return o,
    };
    let lrs = case["lrs"].as_array().cloned().unwrap_or_default();
    let moms = case["momentums"].as_array().cloned();
    let metrics = case["metrics"].as_array().cloned();
    for (e, want) in lrs.iter().enumerate() {
        for (g, w) in want.as_array().unwrap().iter().enumerate() {
            let w = w.as_f64().unwrap();
            let got = opt.lr(g).unwrap();
            if !sched_close(got, w) {
                return Outcome::Fail(format!(
                    "{name}: epoch {e}, group {g}: lr optarena {got:e}, torch {w:e}"
                ));
            }
        }
        if let Some(m) = moms
            .as_ref()
            .and_then(|m| m.get(e))
            .and_then(Value::as_array)
        {
            for (g, w) in m.iter().enumerate() {
                let Some(w) = w.as_f64() else { continue };
                let got = match opt.group_hyper(g, "momentum") {
                    Ok(HyperValue::Number(x)) => x,
                    other => return Outcome::Fail(format!("{name}: momentum {other:?}")),
                };
                if !sched_close(got, w) {
                    return Outcome::Fail(format!(
                        "{name}: epoch {e}, group {g}: momentum optarena {got:e}, torch {w:e}"
                    ));
                }
            }
        }
        let r = match metrics.as_ref().and_then(|m| m.get(e)) {
            Some(Value::Number(x)) => sched.step_metric(&mut opt, x.as_f64().unwrap()),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("nan") => {
                sched.step_metric(&mut opt, f64::NAN)
            }
            _ => match warmup.as_mut() {
                Some((w, epochs)) if e < *epochs => w.step(&mut opt),
                _ => sched.step(&mut opt),
            },
        };
        if let Err(err) = r {
            return Outcome::Fail(format!("{name}: step after epoch {e} failed: {err}"));
        }
    }
    Outcome::Pass
}
