//! Replaying `AveragedModel` cases (SCHEMA.md's `averaged.json`).

use super::*;

/// Replays one `averaged.json` case in its dtype (`"dtype"` absent: float32).
pub fn run_averaged_case(case: &Value, parallelism: Parallelism) -> Outcome {
    match case["dtype"].as_str().unwrap_or("float32") {
        "float32" => run_averaged::<f32>(case, parallelism, usize::MAX),
        "float64" => run_averaged::<f64>(case, parallelism, usize::MAX),
        other => Outcome::Skip(format!("AveragedModel ({other})")),
    }
}

/// The arena of an `averaged.json` case (`hashed(seed, 0, n_total)` over `shapes`).
pub fn averaged_arena<T: Float>(case: &Value) -> (optarena::Arena<T>, usize) {
    let shapes: Vec<Vec<usize>> = case["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let n_total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let init = hashed(case["seed"].as_u64().unwrap(), 0, n_total);
    let mut b = ArenaBuilder::<T>::new();
    let mut at = 0;
    for (i, s) in shapes.iter().enumerate() {
        let len: usize = s.iter().product();
        let vals: Vec<T> = init[at..at + len].iter().map(|&x| T::from_f64(x)).collect();
        b.param(&format!("p{i}"), s, &vals).unwrap();
        at += len;
    }
    (b.build(), n_total)
}

/// Replays an `averaged.json` case; `threshold` is the update's parallel threshold.
pub fn run_averaged<T: Float>(case: &Value, parallelism: Parallelism, threshold: usize) -> Outcome {
    let name = case["name"].as_str().unwrap_or("?");
    let dtype = case["dtype"].as_str().unwrap_or("float32");
    let seed = case["seed"].as_u64().unwrap();
    let (mut arena, n_total) = averaged_arena::<T>(case);
    let avg = match case["averaged"].as_str() {
        Some("swa") => Ok(optarena::AveragedModel::new(&arena)),
        Some("ema") => {
            optarena::AveragedModel::ema(&arena, case["decay"].as_f64().unwrap_or(0.999))
        }
        other => return Outcome::Skip(format!("AveragedModel {other:?}")),
    };
    let mut avg = match avg {
        Ok(a) => a.with_parallelism(parallelism),
        Err(e) => return Outcome::Fail(format!("{name}: construction failed: {e}")),
    };
    avg.set_parallel_threshold(threshold);
    let (rel, abs) = elementwise_tol(dtype);
    let handles: Vec<_> = arena.handles().collect();
    let mut t_done = 0;
    for rec in case["updates"].as_array().unwrap() {
        let t = rec["step"].as_u64().unwrap();
        while t_done < t {
            t_done += 1;
            let v = hashed(seed, t_done, n_total);
            for (d, s) in arena.params_mut().iter_mut().zip(&v) {
                *d = T::from_f64(*s);
            }
            if let Err(e) = avg.update_parameters(&arena) {
                return Outcome::Fail(format!("{name}: update {t_done} failed: {e}"));
            }
        }
        for (pi, b64) in rec["params"].as_array().unwrap().iter().enumerate() {
            let want = decode(b64.as_str().unwrap(), dtype);
            let got = avg.value(&arena, handles[pi]).unwrap();
            if want.len() != got.len() {
                return Outcome::Fail(format!("{name}: param {pi} length"));
            }
            for (k, (w, g)) in want.iter().zip(got).enumerate() {
                let g = g.to_f64();
                if !((g - w).abs() <= rel * w.abs() + abs || (g.is_nan() && w.is_nan())) {
                    return Outcome::Fail(format!(
                        "{name}: update {t}, param {pi}[{k}]: optarena {g:e}, torch {w:e}"
                    ));
                }
            }
        }
    }
    Outcome::Pass
}
