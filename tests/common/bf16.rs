//! SCHEMA.md's bfloat16 cases (`"dtype": "bfloat16"`): torch's `fused=True` step on bf16
//! parameters, replayed through `Optimizer::step_half` with bf16 parameters, gradients and
//! state (round to nearest even).

use half::bf16;
use optarena::mixed::{HalfBuffer, ParamRounding};
use optarena::{
    Algorithm, ArenaBuilder, Hyperparams, Optimizer, Parallelism, ParamGroup, StatePrecision,
    StepOptions, Subnormals,
};
use serde_json::Value;

use super::{decode, hashed, hyper_value, Outcome, IMPLEMENTATION_SWITCHES};

/// SCHEMA.md's bf16 tolerance: `2^-7 * |torch| + 1e-5` (two bf16 units in the last place).
pub fn bf16_tol(torch: f64) -> f64 {
    (2f64).powi(-7) * torch.abs() + 1e-5
}

/// What one replay found: the outcome, and how many recorded values were compared and how
/// many of them equal torch's bit for bit.
#[derive(Debug)]
pub struct Bf16Replay {
    pub outcome: Outcome,
    pub compared: usize,
    pub exact: usize,
}

/// Replays one bf16 case with algorithm `A`.
pub fn replay<A: Algorithm>(
    case: &Value,
    parallelism: Parallelism,
    subnormals: Subnormals,
) -> Bf16Replay {
    let mut r = Bf16Replay {
        outcome: Outcome::Pass,
        compared: 0,
        exact: 0,
    };
    let fail = |m: String| Bf16Replay {
        outcome: Outcome::Fail(m),
        compared: 0,
        exact: 0,
    };
    let name = case["name"].as_str().unwrap_or("?");
    let seed = case["seed"].as_u64().unwrap();
    let mut defaults = A::Config::default();
    for (k, v) in case["defaults"].as_object().unwrap() {
        if IMPLEMENTATION_SWITCHES.contains(&k.as_str()) {
            continue;
        }
        if let Err(e) = defaults.set(k, &hyper_value(v)) {
            return fail(format!("{name}: defaults: {e}"));
        }
    }
    let groups_json = case["groups"].as_array().unwrap();
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    let mut group_of = Vec::new();
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
    // torch's `.to(torch.bfloat16)` of the f32 inputs: round to nearest even.
    let round = |x: f64| bf16::from_f32(x as f32);
    let init = hashed(seed, 0, n_total);
    let mut b = ArenaBuilder::<f32>::new();
    let mut handles = Vec::new();
    let mut at = 0;
    for (i, s) in shapes.iter().enumerate() {
        let len: usize = s.iter().product();
        let vals: Vec<f32> = init[at..at + len]
            .iter()
            .map(|&x| round(x).to_f32())
            .collect();
        handles.push(b.param(&format!("p{i}"), s, &vals).unwrap());
        at += len;
    }
    // The f32 arena only lays the parameters out: the optimizer and the bf16 buffers are
    // built from it, and it is dropped before the first step.
    let arena = b.build();
    let groups: Vec<ParamGroup<f32>> = groups_json
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
    let mut opt = match Optimizer::<f32, A>::new(&arena, groups, defaults) {
        Ok(o) => o.with_parallelism(parallelism).with_subnormals(subnormals),
        Err(e) => return fail(format!("{name}: construction failed: {e}")),
    };
    if let Err(e) = opt.set_state_precision(StatePrecision::Bf16) {
        return fail(format!("{name}: bf16 state: {e}"));
    }
    let mut params = HalfBuffer::<bf16>::copy_of(&arena);
    let mut grads = HalfBuffer::<bf16>::gradients(&arena);
    drop(arena);
    let steps = case["steps"].as_array().unwrap();
    let last = steps
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    let mut rec = steps.iter().peekable();
    for t in 1..=last {
        let g = hashed(seed, t, n_total);
        for (dst, src) in grads.as_mut_slice().iter_mut().zip(&g) {
            *dst = round(*src);
        }
        if let Err(e) = opt.step_half(
            &mut params,
            &grads,
            ParamRounding::Nearest,
            StepOptions::default(),
        ) {
            return fail(format!("{name}: step {t} failed: {e}"));
        }
        while let Some(s) = rec.peek() {
            if s["step"].as_u64().unwrap() != t {
                break;
            }
            let s = rec.next().unwrap();
            for (pi, b64) in s["params"].as_array().unwrap().iter().enumerate() {
                let want = decode(b64.as_str().unwrap(), "bfloat16");
                let got = params.value(handles[pi]);
                if want.len() != got.len() {
                    return fail(format!("{name}: param {pi} length"));
                }
                for (k, (w, g)) in want.iter().zip(got).enumerate() {
                    let gf = g.to_f64();
                    r.compared += 1;
                    if gf.to_bits() == w.to_bits() {
                        r.exact += 1;
                    }
                    let ok = (gf - w).abs() <= bf16_tol(*w) || (gf.is_nan() && w.is_nan());
                    if !ok && matches!(r.outcome, Outcome::Pass) {
                        r.outcome = Outcome::Fail(format!(
                            "{name} ({subnormals:?}): step {t}, param {pi}[{k}]: optarena {gf:e}, \
                             torch {w:e} (diff {:e})",
                            (gf - w).abs()
                        ));
                    }
                }
            }
        }
    }
    r
}

/// Dispatches a bf16 case to the optimizer it names.
pub fn replay_case(case: &Value, parallelism: Parallelism, subnormals: Subnormals) -> Bf16Replay {
    use optarena::optim::*;
    macro_rules! dispatch {
        ($($name:literal => $alg:ty),* $(,)?) => {
            match case["optimizer"].as_str().unwrap() {
                $($name => replay::<$alg>(case, parallelism, subnormals),)*
                other => Bf16Replay {
                    outcome: Outcome::Skip(format!("{other} (bfloat16)")),
                    compared: 0,
                    exact: 0,
                },
            }
        };
    }
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
    }
}
