//! Replaying SparseAdam cases (SCHEMA.md's `sparse_adam.json`).

use super::*;

/// Replays one `"sparse_rows": true` case in its dtype; `reference` uses the scalar kernel.
pub fn run_sparse_case(case: &Value, reference: bool) -> Outcome {
    match (case["optimizer"].as_str(), case["dtype"].as_str()) {
        (Some("SparseAdam"), Some("float32")) => run_sparse_adam::<f32>(case, reference),
        (Some("SparseAdam"), Some("float64")) => run_sparse_adam::<f64>(case, reference),
        (o, d) => Outcome::Skip(format!("sparse rows {o:?} ({d:?})")),
    }
}

/// The sparse gradient of step `t` of a SparseAdam case: for each parameter, the kept rows
/// that are not all zero and their values (SCHEMA.md).
pub fn sparse_grads(seed: u64, t: u64, shapes: &[Vec<usize>]) -> Vec<(Vec<usize>, Vec<f64>)> {
    let n_total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let n_rows: usize = shapes.iter().map(|s| s[0]).sum();
    let dense = hashed(seed, t, n_total);
    let keep = hashed(seed, 10_000 + t, n_rows);
    let (mut at, mut row0) = (0, 0);
    let mut out = Vec::new();
    for s in shapes {
        let len: usize = s.iter().product();
        let cols = len / s[0];
        let (mut rows, mut vals) = (Vec::new(), Vec::new());
        for r in 0..s[0] {
            let v = &dense[at + r * cols..at + (r + 1) * cols];
            if keep[row0 + r] > 0.0 && v.iter().any(|&x| x != 0.0) {
                rows.push(r);
                vals.extend_from_slice(v);
            }
        }
        out.push((rows, vals));
        at += len;
        row0 += s[0];
    }
    out
}

fn run_sparse_adam<T: Float>(case: &Value, reference: bool) -> Outcome {
    use optarena::{GroupHyperparams, SparseAdam, SparseAdamConfig, SparseGrad};
    let name = case["name"].as_str().unwrap_or("?");
    let dtype = case["dtype"].as_str().unwrap();
    let seed = case["seed"].as_u64().unwrap();
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    let mut group_specs = Vec::new();
    for g in case["groups"].as_array().unwrap() {
        let mut cfg = case["defaults"].as_object().cloned().unwrap_or_default();
        for (k, v) in g["overrides"].as_object().unwrap() {
            cfg.insert(k.clone(), v.clone());
        }
        let cfg: SparseAdamConfig = match serde_json::from_value(Value::Object(cfg)) {
            Ok(c) => c,
            Err(e) => return Outcome::Fail(format!("{name}: options: {e}")),
        };
        let first = shapes.len();
        for s in g["shapes"].as_array().unwrap() {
            shapes.push(
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            );
        }
        group_specs.push((first..shapes.len(), cfg));
    }
    let n_total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let init = hashed(seed, 0, n_total);
    let mut b = ArenaBuilder::<T>::new();
    let mut handles = Vec::new();
    let mut at = 0;
    for (i, s) in shapes.iter().enumerate() {
        let len: usize = s.iter().product();
        let vals: Vec<T> = init[at..at + len].iter().map(|&x| T::from_f64(x)).collect();
        handles.push(b.param(&format!("p{i}"), s, &vals).unwrap());
        at += len;
    }
    let mut arena = b.build();
    let groups = group_specs
        .into_iter()
        .map(|(r, c)| (handles[r].to_vec(), c));
    let mut opt = match SparseAdam::new(&arena, groups) {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(format!("{name}: construction failed: {e}")),
    };
    // An LR scheduler driving the groups (`"lr_scheduler"`, which optarena's generator adds to
    // SCHEMA.md's format): stepped after every optimizer step, each step's lrs and betas[0]
    // checked before it runs.
    let mut sched = match case.get("lr_scheduler") {
        None => None,
        Some(s) => {
            let sname = s["name"].as_str().unwrap_or("?");
            match build_scheduler(sname, &s["config"], &mut opt) {
                Ok(s) => Some(s),
                Err(o) => return o,
            }
        }
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
        let sparse: Vec<(Vec<usize>, Vec<T>)> = sparse_grads(seed, t, &shapes)
            .into_iter()
            .map(|(r, v)| (r, v.into_iter().map(T::from_f64).collect()))
            .collect();
        let grads: Vec<SparseGrad<'_, T>> = handles
            .iter()
            .zip(&sparse)
            .map(|(&h, (r, v))| SparseGrad::new(h, r, v))
            .collect();
        if let Some(r) = steps.iter().find(|r| r["step"].as_u64() == Some(t)) {
            for (key, hyper) in [("lrs", "lr"), ("beta1s", "betas")] {
                let Some(want) = r.get(key).and_then(Value::as_array) else {
                    continue;
                };
                for (g, w) in want.iter().enumerate() {
                    let w = w.as_f64().unwrap();
                    let got = match opt.group_hyper(g, hyper) {
                        Ok(optarena::HyperValue::Number(x)) => x,
                        Ok(optarena::HyperValue::Pair(b1, _)) => b1,
                        other => {
                            return Outcome::Fail(format!("{name}: group {g} {hyper}: {other:?}"))
                        }
                    };
                    // torch's formulas in torch's order: equal, or within an ulp or two.
                    if (got - w).abs() > 4.0 * f64::EPSILON * w.abs() {
                        return Outcome::Fail(format!(
                            "{name}: step {t}, group {g} {hyper}: optarena {got:e}, torch {w:e}"
                        ));
                    }
                }
            }
        }
        let r = if reference {
            opt.step_sparse_reference(&mut arena, &grads)
        } else {
            opt.step_sparse(&mut arena, &grads)
        };
        if let Err(e) = r {
            return Outcome::Fail(format!("{name}: step {t} failed: {e}"));
        }
        if let Some(s) = sched.as_mut() {
            if let Err(e) = s.step(&mut opt) {
                return Outcome::Fail(format!("{name}: scheduler step {t} failed: {e}"));
            }
        }
        while let Some(r) = rec.peek() {
            if r["step"].as_u64().unwrap() != t {
                break;
            }
            let r = rec.next().unwrap();
            for (pi, b64) in r["params"].as_array().unwrap().iter().enumerate() {
                let want = decode(b64.as_str().unwrap(), dtype);
                let got = arena.value(handles[pi]);
                if want.len() != got.len() {
                    return Outcome::Fail(format!("{name}: param {pi} length"));
                }
                for (k, (w, g)) in want.iter().zip(got).enumerate() {
                    let g = g.to_f64();
                    if !((g - w).abs() <= rel * w.abs() + abs || (g.is_nan() && w.is_nan())) {
                        return Outcome::Fail(format!(
                            "{name}: step {t}, param {pi}[{k}]: optarena {g:e}, torch {w:e}"
                        ));
                    }
                }
            }
        }
    }
    Outcome::Pass
}
