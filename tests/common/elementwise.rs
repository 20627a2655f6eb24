//! Replaying elementwise optimizer cases.

use super::*;

/// Replays one elementwise case with optimizer algorithm `A` in element type `T`.
///
/// `subnormals` is the optimizer's mode. `scaled_abs` scales SCHEMA.md's absolute term, which
/// assumes values of order one, by the largest magnitude of each recorded tensor (for cases
/// whose values are far smaller, such as the subnormal fixture's, where it would hide
/// everything).
pub fn run_elementwise<T: Float, A: Algorithm>(
    case: &Value,
    parallelism: Parallelism,
    subnormals: Subnormals,
    scaled_abs: bool,
) -> Outcome {
    let name = case["name"].as_str().unwrap_or("?");
    let dtype = case["dtype"].as_str().unwrap();
    let seed = case["seed"].as_u64().unwrap();
    let mut defaults = A::Config::default();
    for (k, v) in case["defaults"].as_object().unwrap() {
        if IMPLEMENTATION_SWITCHES.contains(&k.as_str()) {
            continue;
        }
        if let Err(e) = defaults.set(k, &hyper_value(v)) {
            return Outcome::Fail(format!("{name}: defaults: {e}"));
        }
    }
    let groups_json = case["groups"].as_array().unwrap();
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    let mut group_of: Vec<usize> = Vec::new();
    for (gi, g) in groups_json.iter().enumerate() {
        for s in g["shapes"].as_array().unwrap() {
            shapes.push(
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            );
            group_of.push(gi);
        }
    }
    let n_total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    // Optional powers of two scaling the inputs (the subnormal fixture's extension of the
    // format; see scripts/gen_fixtures.py).
    let param_scale = case["param_scale"].as_f64().unwrap_or(1.0);
    let grad_scale = case["grad_scale"].as_f64().unwrap_or(1.0);
    let init: Vec<f64> = hashed(seed, 0, n_total)
        .iter()
        .map(|x| x * param_scale)
        .collect();
    // SCHEMA.md's Muon cases compare each step's change of every parameter by direction
    // and norm, from the initial values as the case's dtype holds them.
    let direction = case["compare"].as_str() == Some("direction");
    let init32: Vec<f64> = init.iter().map(|&x| T::from_f64(x).to_f64()).collect();
    let mut offsets = Vec::new();
    let mut b = ArenaBuilder::<T>::new();
    let mut handles = Vec::new();
    let mut at = 0;
    for (i, s) in shapes.iter().enumerate() {
        let len: usize = s.iter().product();
        offsets.push(at);
        let vals: Vec<T> = init[at..at + len].iter().map(|&x| T::from_f64(x)).collect();
        handles.push(b.param(&format!("p{i}"), s, &vals).unwrap());
        at += len;
    }
    let mut arena = b.build();
    let groups: Vec<ParamGroup<T>> = groups_json
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let mut pg = ParamGroup::new(
                handles
                    .iter()
                    .zip(&group_of)
                    .filter(|(_, &og)| og == gi)
                    .map(|(h, _)| *h),
            );
            for (k, v) in g["overrides"].as_object().unwrap() {
                if !IMPLEMENTATION_SWITCHES.contains(&k.as_str()) {
                    pg = pg.with(k, hyper_value(v));
                }
            }
            pg
        })
        .collect();
    let mut opt = match Optimizer::<T, A>::new(&arena, groups, defaults) {
        Ok(o) => o.with_parallelism(parallelism).with_subnormals(subnormals),
        Err(e) => return Outcome::Fail(format!("{name}: construction failed: {e}")),
    };
    let (rel, abs) = elementwise_tol(dtype);
    let steps = case["steps"].as_array().unwrap();
    let last = steps
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    let mut rec = steps.iter().peekable();
    for t in 1..=last {
        let g = hashed(seed, t, n_total);
        for (dst, src) in arena.grads_mut().iter_mut().zip(&g) {
            *dst = T::from_f64(*src * grad_scale);
        }
        if let Err(e) = opt.step(&mut arena) {
            return Outcome::Fail(format!("{name}: step {t} failed: {e}"));
        }
        while let Some(r) = rec.peek() {
            if r["step"].as_u64().unwrap() != t {
                break;
            }
            let r = rec.next().unwrap();
            for (pi, b64) in r["params"].as_array().unwrap().iter().enumerate() {
                let want = decode(b64.as_str().unwrap(), dtype);
                let abs = if scaled_abs {
                    abs * want.iter().fold(0.0f64, |m, w| m.max(w.abs()))
                } else {
                    abs
                };
                let got = arena.value(handles[pi]);
                if want.len() != got.len() {
                    return Outcome::Fail(format!("{name}: param {pi} length"));
                }
                if direction {
                    let start = offsets[pi];
                    let got: Vec<f64> = got.iter().map(|g| g.to_f64()).collect();
                    if let Err(m) = direction_check(&init32[start..start + got.len()], &got, &want)
                    {
                        return Outcome::Fail(format!(
                            "{name} ({subnormals:?}): step {t}, param {pi}: {m}"
                        ));
                    }
                    continue;
                }
                for (k, (w, g)) in want.iter().zip(got).enumerate() {
                    let g = g.to_f64();
                    let ok = (g - w).abs() <= rel * w.abs() + abs || (g.is_nan() && w.is_nan());
                    if !ok {
                        return Outcome::Fail(format!(
                            "{name} ({subnormals:?}): step {t}, param {pi}[{k}]: optarena {g:e}, torch {w:e} (diff {:e})",
                            (g - w).abs()
                        ));
                    }
                }
            }
        }
    }
    Outcome::Pass
}

/// Replays an elementwise case in both subnormal modes (flushed, the default, and preserved);
/// it passes only if both do.
pub fn run_elementwise_case(case: &Value, parallelism: Parallelism) -> Outcome {
    let flushed = run_elementwise_case_in(case, parallelism.clone(), Subnormals::Flush, false);
    if !matches!(flushed, Outcome::Pass) {
        return flushed;
    }
    run_elementwise_case_in(case, parallelism, Subnormals::Preserve, false)
}

/// Dispatches an elementwise case to the optimizer it names, in its dtype.
pub fn run_elementwise_case_in(
    case: &Value,
    parallelism: Parallelism,
    subnormals: Subnormals,
    scaled_abs: bool,
) -> Outcome {
    if case["dtype"].as_str() == Some("bfloat16") {
        return bf16::replay_case(case, parallelism, subnormals).outcome;
    }
    macro_rules! dispatch {
        ($($name:literal => $alg:ty),* $(,)?) => {
            match (case["optimizer"].as_str().unwrap(), case["dtype"].as_str().unwrap()) {
                $(
                    ($name, "float32") => run_elementwise::<f32, $alg>(
                        case, parallelism, subnormals, scaled_abs,
                    ),
                    ($name, "float64") => run_elementwise::<f64, $alg>(
                        case, parallelism, subnormals, scaled_abs,
                    ),
                )*
                (other, dtype) => Outcome::Skip(format!("{other} ({dtype})")),
            }
        };
    }
    use optarena::optim::*;
    dispatch! {
        "SGD" => SGDAlgorithm,
        "Adam" => AdamAlgorithm,
        "AdamW" => AdamWAlgorithm,
        "RAdam" => RAdamAlgorithm,
        "NAdam" => NAdamAlgorithm,
        "Adamax" => AdamaxAlgorithm,
        "Adagrad" => AdagradAlgorithm,
        "Adadelta" => AdadeltaAlgorithm,
        "RMSprop" => RMSpropAlgorithm,
        "Rprop" => RpropAlgorithm,
        "ASGD" => ASGDAlgorithm,
        "Adafactor" => AdafactorAlgorithm,
        "Muon" => MuonAlgorithm,
    }
}
