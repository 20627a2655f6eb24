//! Replaying LBFGS cases on SCHEMA.md's test problems.

use super::*;

/// An LBFGS test problem of SCHEMA.md: `f` and its gradient, computed in `T` the way torch's
/// autograd does (up to summation order).
#[derive(Debug, Clone)]
pub enum LBFGSProblem<T> {
    /// `sum 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2`.
    Rosenbrock,
    /// `0.5 sum d x^2 - sum b x`.
    Quadratic {
        /// Diagonal.
        d: Vec<T>,
        /// Linear term.
        b: Vec<T>,
    },
}

impl<T: Float> LBFGSProblem<T> {
    /// The case's problem and `x0`.
    pub fn from_case(case: &Value) -> Result<(Self, Vec<T>), String> {
        let seed = case["seed"].as_u64().ok_or("seed")?;
        let n = case["n"].as_u64().ok_or("n")? as usize;
        let x0_scale = case["x0_scale"].as_f64().ok_or("x0_scale")?;
        let x0 = hashed(seed, 0, n)
            .iter()
            .map(|&v| T::from_f64(v * x0_scale))
            .collect();
        let problem = match case["function"].as_str() {
            Some("rosenbrock") => LBFGSProblem::Rosenbrock,
            Some("quadratic") => {
                let d_offset = case["d_offset"].as_f64().ok_or("d_offset")?;
                LBFGSProblem::Quadratic {
                    d: hashed(seed, 1, n)
                        .iter()
                        .map(|&v| T::from_f64(v.abs() + d_offset))
                        .collect(),
                    b: hashed(seed, 2, n).iter().map(|&v| T::from_f64(v)).collect(),
                }
            }
            other => return Err(format!("function {other:?}")),
        };
        Ok((problem, x0))
    }

    /// Loss at `x`, writing the gradient into `g`.
    pub fn eval(&self, x: &[T], g: &mut [T]) -> T {
        let two = T::from_f64(2.0);
        match self {
            LBFGSProblem::Rosenbrock => {
                let hundred = T::from_f64(100.0);
                g.fill(T::ZERO);
                let mut f = T::ZERO;
                for i in 0..x.len().saturating_sub(1) {
                    let a = x[i + 1] - x[i] * x[i];
                    let b = T::ONE - x[i];
                    f = f + (hundred * (a * a) + b * b);
                    let ga = hundred * (two * a);
                    g[i + 1] = g[i + 1] + ga;
                    g[i] = g[i] - ga * (two * x[i]) - two * b;
                }
                f
            }
            LBFGSProblem::Quadratic { d, b } => {
                let half = T::from_f64(0.5);
                let mut s1 = T::ZERO;
                let mut s2 = T::ZERO;
                for i in 0..x.len() {
                    s1 = s1 + d[i] * x[i] * x[i];
                    s2 = s2 + b[i] * x[i];
                    g[i] = half * (d[i] * x[i]) + (half * x[i]) * d[i] - b[i];
                }
                half * s1 - s2
            }
        }
    }
}

/// Replays one LBFGS case (SCHEMA.md's `lbfgs.json`) in element type `T`.
pub fn run_lbfgs<T: Float>(case: &Value) -> Outcome {
    use optarena::{LBFGSConfig, LBFGS};
    let name = case["name"].as_str().unwrap_or("?");
    let dtype = case["dtype"].as_str().unwrap_or("?");
    let mut config = LBFGSConfig::default();
    if let Some(defaults) = case["defaults"].as_object() {
        for (k, v) in defaults {
            if IMPLEMENTATION_SWITCHES.contains(&k.as_str()) {
                continue;
            }
            if let Err(e) = optarena::Hyperparams::set(&mut config, k, &hyper_value(v)) {
                return Outcome::Fail(format!("{name}: defaults: {e}"));
            }
        }
    }
    let (problem, x0) = match LBFGSProblem::<T>::from_case(case) {
        Ok(p) => p,
        Err(e) => return Outcome::Fail(format!("{name}: bad case: {e}")),
    };
    let mut b = ArenaBuilder::<T>::new();
    let x = b.param("x", &[x0.len()], &x0).unwrap();
    let mut arena = b.build();
    let mut opt = match LBFGS::new(&arena, [ParamGroup::all()], config) {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(format!("{name}: construction failed: {e}")),
    };
    let trajectory = case["compare"].as_str() != Some("outcome");
    let steps = case["steps"].as_array().cloned().unwrap_or_default();
    let last = steps
        .iter()
        .filter_map(|s| s["step"].as_u64())
        .max()
        .unwrap_or(0);
    let mut rec = steps.iter().peekable();
    let mut grad = vec![T::ZERO; x0.len()];
    for t in 1..=last {
        let loss = match opt.step(&mut arena, |a| {
            let f = problem.eval(a.value(x), &mut grad);
            a.set_grad(x, &grad).unwrap();
            f
        }) {
            Ok(l) => l.to_f64(),
            Err(e) => return Outcome::Fail(format!("{name}: step {t} failed: {e}")),
        };
        while let Some(r) = rec.peek() {
            if r["step"].as_u64() != Some(t) {
                break;
            }
            let r = rec.next().unwrap();
            let want = r["loss"].as_f64().unwrap_or(f64::NAN);
            let tol = lbfgs_tol(dtype, want);
            if trajectory {
                // NaN on either side fails.
                let within = (loss - want).abs() <= tol;
                if !within {
                    return Outcome::Fail(format!(
                        "{name}: step {t}: loss optarena {loss:e}, torch {want:e} (diff {:e}, tol {tol:e})",
                        (loss - want).abs()
                    ));
                }
                let evals = r["evals"].as_u64();
                if dtype == "float64" && evals != Some(opt.func_evals()) {
                    return Outcome::Fail(format!(
                        "{name}: step {t}: func_evals optarena {}, torch {evals:?}",
                        opt.func_evals()
                    ));
                }
            } else {
                // NaN fails.
                let at_most = loss <= want + tol;
                if !at_most {
                    return Outcome::Fail(format!(
                        "{name}: after {t} steps: loss optarena {loss:e} > torch {want:e} + {tol:e}"
                    ));
                }
            }
        }
    }
    Outcome::Pass
}

/// Dispatches an LBFGS case by dtype.
pub fn run_lbfgs_case(case: &Value) -> Outcome {
    match case["dtype"].as_str() {
        Some("float32") => run_lbfgs::<f32>(case),
        Some("float64") => run_lbfgs::<f64>(case),
        other => Outcome::Skip(format!("LBFGS ({other:?})")),
    }
}
