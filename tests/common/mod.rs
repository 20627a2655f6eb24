//! Test support: the fixture format of `SCHEMA.md` (deterministic inputs, base64 arrays) and
//! runners that replay PyTorch-recorded cases through optarena.
#![allow(dead_code, clippy::single_range_in_vec_init)]

use std::path::{Path, PathBuf};

use base64::Engine;
use optarena::{
    Algorithm, ArenaBuilder, Float, HyperValue, Hyperparams, Optimizer, Parallelism, ParamGroup,
    Subnormals,
};
use serde_json::Value;

pub mod bf16;

/// SCHEMA.md's splitmix64.
pub fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SCHEMA.md's `hashed(seed, t, n)`: exact in f32.
pub fn hashed(seed: u64, t: u64, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let h = splitmix64(
                seed.wrapping_mul(0x100_0000_01B3)
                    .wrapping_add(t.wrapping_mul(0x9E37_79B1))
                    .wrapping_add(i),
            );
            if h & 0xFF == 0 {
                0.0
            } else {
                let unit = (h >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0;
                let k = ((h >> 8) & 7) as i32 - 4;
                unit * 2f64.powi(k)
            }
        })
        .collect()
}

/// Decodes a base64 array of little-endian f32 or f64 into f64 values.
pub fn decode(b64: &str, dtype: &str) -> Vec<f64> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    match dtype {
        "float32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        "float64" => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        // SCHEMA.md's bfloat16 cases: the upper 16 bits of the f32.
        "bfloat16" => bytes
            .chunks_exact(2)
            .map(|c| {
                f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16) as f64
            })
            .collect(),
        other => panic!("unknown dtype {other}"),
    }
}

/// The fixture tolerance of SCHEMA.md for elementwise optimizers.
pub fn elementwise_tol(dtype: &str) -> (f64, f64) {
    match dtype {
        "float32" => (1e-5, 1e-6),
        _ => (1e-12, 1e-13),
    }
}

/// Converts a torch keyword value from JSON.
pub fn hyper_value(v: &Value) -> HyperValue {
    match v {
        Value::Bool(b) => HyperValue::Bool(*b),
        Value::Number(n) => HyperValue::Number(n.as_f64().unwrap()),
        Value::Null => HyperValue::None,
        Value::String(s) => HyperValue::Str(s.clone()),
        Value::Array(a) if a.len() == 2 => match (&a[0], &a[1]) {
            (Value::Null, b) => HyperValue::OptPair(None, b.as_f64().unwrap()),
            (a, b) => HyperValue::Pair(a.as_f64().unwrap(), b.as_f64().unwrap()),
        },
        Value::Array(a) if a.len() == 3 => HyperValue::Triple(
            a[0].as_f64().unwrap(),
            a[1].as_f64().unwrap(),
            a[2].as_f64().unwrap(),
        ),
        other => panic!("unsupported hyperparameter value {other}"),
    }
}

/// torch keywords that only pick an implementation, never change the numbers.
pub const IMPLEMENTATION_SWITCHES: &[&str] = &["foreach", "fused", "capturable", "differentiable"];

/// The outcome of replaying one case.
#[derive(Debug)]
pub enum Outcome {
    /// Every recorded value within tolerance.
    Pass,
    /// Something differs; the message says what.
    Fail(String),
    /// The crate lacks what the case needs; names it.
    Skip(String),
}

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

/// SCHEMA.md's Muon tolerance (`MUON_MIN_COS`, `MUON_NORM_RATIO`): with `d = after − init`,
/// `cos(d_crate, d_torch) >= 0.999` and `|d_crate| / |d_torch|` in `[0.98, 1.02]`.
pub const MUON_MIN_COS: f64 = 0.999;
/// See [`MUON_MIN_COS`].
pub const MUON_NORM_RATIO: (f64, f64) = (0.98, 1.02);

/// The cosine and norm ratio of two changes from `init`: `(cos, |got − init| / |want − init|)`.
pub fn direction_stats(init: &[f64], got: &[f64], want: &[f64]) -> (f64, f64) {
    let (mut dot, mut ng, mut nw) = (0.0, 0.0, 0.0);
    for ((i, g), w) in init.iter().zip(got).zip(want) {
        let (dg, dw) = (g - i, w - i);
        dot += dg * dw;
        ng += dg * dg;
        nw += dw * dw;
    }
    if ng == 0.0 && nw == 0.0 {
        return (1.0, 1.0);
    }
    (dot / (ng.sqrt() * nw.sqrt()), ng.sqrt() / nw.sqrt())
}

/// Checks SCHEMA.md's Muon tolerance for one parameter at one step.
pub fn direction_check(init: &[f64], got: &[f64], want: &[f64]) -> Result<(), String> {
    let (cos, ratio) = direction_stats(init, got, want);
    if cos >= MUON_MIN_COS && (MUON_NORM_RATIO.0..=MUON_NORM_RATIO.1).contains(&ratio) {
        Ok(())
    } else {
        Err(format!(
            "cos {cos:.6} (>= {MUON_MIN_COS}), norm ratio {ratio:.6} (in {MUON_NORM_RATIO:?})"
        ))
    }
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
        "SGD" => SgdAlgorithm,
        "Adam" => AdamAlgorithm,
        "AdamW" => AdamWAlgorithm,
        "RAdam" => RAdamAlgorithm,
        "NAdam" => NAdamAlgorithm,
        "Adamax" => AdamaxAlgorithm,
        "Adagrad" => AdagradAlgorithm,
        "Adadelta" => AdadeltaAlgorithm,
        "RMSprop" => RMSpropAlgorithm,
        "Rprop" => RpropAlgorithm,
        "ASGD" => AsgdAlgorithm,
        "Adafactor" => AdafactorAlgorithm,
        "Muon" => MuonAlgorithm,
    }
}

/// SCHEMA.md's LBFGS loss tolerance.
pub fn lbfgs_tol(dtype: &str, v: f64) -> f64 {
    match dtype {
        "float32" => 1e-4 * v.abs() + 1e-6,
        _ => 1e-8 * v.abs() + 1e-12,
    }
}

/// An LBFGS test problem of SCHEMA.md: `f` and its gradient, computed in `T` the way torch's
/// autograd does (up to summation order).
#[derive(Debug, Clone)]
pub enum LbfgsProblem<T> {
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

impl<T: Float> LbfgsProblem<T> {
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
            Some("rosenbrock") => LbfgsProblem::Rosenbrock,
            Some("quadratic") => {
                let d_offset = case["d_offset"].as_f64().ok_or("d_offset")?;
                LbfgsProblem::Quadratic {
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
            LbfgsProblem::Rosenbrock => {
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
            LbfgsProblem::Quadratic { d, b } => {
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
    use optarena::{Lbfgs, LbfgsConfig};
    let name = case["name"].as_str().unwrap_or("?");
    let dtype = case["dtype"].as_str().unwrap_or("?");
    let mut config = LbfgsConfig::default();
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
    let (problem, x0) = match LbfgsProblem::<T>::from_case(case) {
        Ok(p) => p,
        Err(e) => return Outcome::Fail(format!("{name}: bad case: {e}")),
    };
    let mut b = ArenaBuilder::<T>::new();
    let x = b.param("x", &[x0.len()], &x0).unwrap();
    let mut arena = b.build();
    let mut opt = match Lbfgs::new(&arena, [ParamGroup::all()], config) {
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

/// The kind of a fixture file, recognised from its cases' fields (SCHEMA.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Elementwise optimizer trajectories.
    Elementwise,
    /// LBFGS runs.
    Lbfgs,
    /// LR scheduler sequences.
    Scheduler,
    /// Gradient clipping.
    Clip,
    /// `AveragedModel` updates (SCHEMA.md's `averaged.json`).
    Averaged,
    /// `SparseAdam` trajectories (`"sparse_rows": true`, SCHEMA.md's `sparse_adam.json`).
    SparseRows,
    /// Not a fixture.
    Unknown,
}

/// Recognises a case's kind.
pub fn kind_of(case: &Value) -> Kind {
    if case.get("averaged").is_some() && case.get("updates").is_some() {
        Kind::Averaged
    } else if case.get("sparse_rows").and_then(Value::as_bool) == Some(true) {
        Kind::SparseRows
    } else if case.get("scheduler").is_some() {
        Kind::Scheduler
    } else if case.get("function").is_some() {
        Kind::Lbfgs
    } else if case.get("optimizer").is_some() && case.get("groups").is_some() {
        Kind::Elementwise
    } else if case.get("shapes").is_some()
        && (case.get("max_norm").is_some() || case.get("clip_value").is_some())
    {
        Kind::Clip
    } else {
        Kind::Unknown
    }
}

/// Every `*.json` file in `dir`, sorted.
pub fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read fixture directory {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    v
}

/// Loads a fixture file's cases.
pub fn load_cases(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    v["cases"].as_array().cloned().unwrap_or_default()
}

/// Tallies of one file's replay.
#[derive(Debug, Default)]
pub struct Tally {
    /// Cases that ran.
    pub checked: usize,
    /// Cases outside tolerance, with messages.
    pub failed: Vec<String>,
    /// Cases skipped, with what they needed.
    pub skipped: Vec<String>,
}

impl Tally {
    /// Adds one outcome.
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Pass => self.checked += 1,
            Outcome::Fail(m) => {
                self.checked += 1;
                self.failed.push(m);
            }
            Outcome::Skip(what) => self.skipped.push(what),
        }
    }

    /// SCHEMA.md's report line for a file.
    pub fn line(&self, file: &str) -> String {
        let mut s = format!(
            "optarena fixtures: {file}: checked {}, failed {}, skipped {}",
            self.checked,
            self.failed.len(),
            self.skipped.len()
        );
        if !self.skipped.is_empty() {
            let mut names = self.skipped.clone();
            names.sort();
            names.dedup();
            s.push_str(&format!(" ({})", names.join(", ")));
        }
        s
    }
}

/// Replays every case of one file with the given kind runner(s).
pub fn replay_file(path: &Path, runner: &dyn Fn(Kind, &Value) -> Outcome) -> Tally {
    let mut tally = Tally::default();
    for case in load_cases(path) {
        let kind = kind_of(&case);
        tally.add(runner(kind, &case));
    }
    tally
}

/// The repository's own fixture directory.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The shared sample directory beside the repository, if present.
pub fn shared_samples_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sample");
    p.is_dir().then_some(p)
}

/// Replays a case of any kind with what the crate has; kinds not implemented yet are skipped
/// by name.
pub fn run_any(kind: Kind, case: &Value) -> Outcome {
    match kind {
        Kind::Elementwise => run_elementwise_case(case, Parallelism::Sequential),
        Kind::Lbfgs => run_lbfgs_case(case),
        Kind::Scheduler => run_scheduler_case(case),
        Kind::Clip => run_clip_case(case),
        Kind::Averaged => run_averaged_case(case, Parallelism::Sequential),
        Kind::SparseRows => run_sparse_case(case, false),
        Kind::Unknown => Outcome::Skip("unrecognised case".into()),
    }
}

/// Replays every file of `dir`, prints SCHEMA.md's line for each, and returns the failures.
pub fn replay_dir(dir: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    for path in json_files(dir) {
        let tally = replay_file(&path, &run_any);
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        println!("{}", tally.line(&file));
        failures.extend(tally.failed);
    }
    failures
}

/// A small deterministic generator for test data (not the fixture hash).
pub struct Rng(pub u64);

impl Rng {
    /// Next value in [-1, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(1);
        (splitmix64(self.0) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    /// `n` values in [-scale, scale).
    pub fn vec<T: Float>(&mut self, n: usize, scale: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(self.next_f64() * scale))
            .collect()
    }
}

/// Builds an arena of `shapes` split into `groups` (counts of consecutive params), with
/// deterministic initial values; returns it with the handles.
pub fn build_arena<T: Float>(
    shapes: &[Vec<usize>],
    seed: u64,
    reverse_within: &[usize],
) -> (optarena::Arena<T>, Vec<optarena::Param<T>>) {
    let mut rng = Rng(seed);
    let values: Vec<Vec<T>> = shapes
        .iter()
        .map(|s| rng.vec(s.iter().product(), 1.0))
        .collect();
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    // Reverse registration order inside each block listed (for by-name loading tests).
    let mut at = 0;
    for &len in reverse_within {
        order[at..at + len].reverse();
        at += len;
    }
    let mut b = ArenaBuilder::<T>::new();
    let mut handles = vec![None; shapes.len()];
    for &i in &order {
        handles[i] = Some(b.param(&format!("p{i}"), &shapes[i], &values[i]).unwrap());
    }
    (b.build(), handles.into_iter().map(Option::unwrap).collect())
}

/// Writes deterministic gradients for step `t` into every parameter (by name, so the values do
/// not depend on registration order). `skip` names parameters left without a gradient.
pub fn write_grads<T: Float>(arena: &mut optarena::Arena<T>, t: u64, skip: &[usize]) {
    arena.zero_grad(true);
    let infos: Vec<_> = arena.infos().to_vec();
    for info in infos {
        let i: usize = info.name[1..].parse().unwrap();
        if skip.contains(&i) {
            continue;
        }
        let mut rng = Rng(t * 1_000_003 + i as u64 * 7919);
        let g: Vec<T> = rng.vec(info.len, 1.5);
        let p = arena.find(&info.name).unwrap();
        arena.set_grad(p, &g).unwrap();
    }
}

/// Replays a `clip.json` case (always f32): `clip_grad_norm_` or `clip_grad_value_` on
/// `hashed(seed, 1, n_total)` gradients.
pub fn run_clip_case(case: &Value) -> Outcome {
    use optarena::clip::{clip_grad_norm_all, clip_grad_value_all, ClipNorm, NormType};
    let name = case["name"].as_str().unwrap_or("?");
    let seed = case["seed"].as_u64().unwrap();
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
    let mut b = ArenaBuilder::<f32>::new();
    for (i, s) in shapes.iter().enumerate() {
        b.zeros(&format!("p{i}"), s).unwrap();
    }
    let mut arena = b.build();
    let g = hashed(seed, 1, n_total);
    for (dst, src) in arena.grads_mut().iter_mut().zip(&g) {
        *dst = *src as f32;
    }
    if let Some(max_norm) = case.get("max_norm").and_then(Value::as_f64) {
        let p = match &case["norm_type"] {
            Value::String(s) if s == "inf" => f64::INFINITY,
            v => v.as_f64().unwrap(),
        };
        let norm = match NormType::from_f64(p) {
            Ok(n) => n,
            Err(e) => return Outcome::Fail(format!("{name}: {e}")),
        };
        let total = match clip_grad_norm_all(&mut arena, ClipNorm::new(max_norm).norm_type(norm)) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(format!("{name}: {e}")),
        };
        let want = case["total_norm"].as_f64().unwrap();
        if (total - want).abs() > 1e-5 * want.abs() {
            return Outcome::Fail(format!("{name}: total_norm {total}, torch {want}"));
        }
    } else {
        let v = case["clip_value"].as_f64().unwrap();
        if let Err(e) = clip_grad_value_all(&mut arena, v) {
            return Outcome::Fail(format!("{name}: {e}"));
        }
    }
    let want: Vec<f64> = case["grads"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| decode(b.as_str().unwrap(), "float32"))
        .collect();
    for (k, (w, g)) in want.iter().zip(arena.grads()).enumerate() {
        let g = *g as f64;
        if (g - w).abs() > 1e-6 * w.abs() {
            return Outcome::Fail(format!("{name}: grad[{k}] {g:e}, torch {w:e}"));
        }
    }
    Outcome::Pass
}

// ---------------------------------------------------------------------------------------------
// Schedulers (SCHEMA.md's `schedulers.json`)
// ---------------------------------------------------------------------------------------------

/// A Python arithmetic expression of one variable (`"0.95**epoch"`, `"0.9"`, `"epoch // 30"`),
/// as fixtures write `lr_lambda` and `scale_fn`: numbers, the variable, `+ - * / // % **`,
/// parentheses, `min`, `max`, `abs`, `math.cos`, `math.exp`, `math.sqrt`, `math.pi`.
#[derive(Debug, Clone)]
pub struct PyExpr {
    tokens: Vec<String>,
    var: String,
}

impl PyExpr {
    /// Tokenizes `src`; `var` names the variable (`epoch`, `x`).
    pub fn parse(src: &str, var: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        let chars: Vec<char> = src.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_whitespace() {
                i += 1;
            } else if c.is_ascii_digit() || c == '.' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || chars[i] == '.'
                        || chars[i] == 'e'
                        || chars[i] == 'E'
                        || ((chars[i] == '-' || chars[i] == '+')
                            && matches!(chars[i - 1], 'e' | 'E')))
                {
                    i += 1;
                }
                tokens.push(chars[start..i].iter().collect());
            } else if c.is_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
                tokens.push(chars[start..i].iter().collect());
            } else if (c == '*' || c == '/') && chars.get(i + 1) == Some(&c) {
                tokens.push(format!("{c}{c}"));
                i += 2;
            } else if "+-*/%(),".contains(c) {
                tokens.push(c.to_string());
                i += 1;
            } else {
                return Err(format!("unsupported character {c:?} in {src:?}"));
            }
        }
        let e = PyExpr {
            tokens,
            var: var.to_string(),
        };
        e.eval(0.0)?;
        Ok(e)
    }

    /// Evaluates with the variable set to `x`.
    pub fn eval(&self, x: f64) -> Result<f64, String> {
        let mut p = ExprParser {
            t: &self.tokens,
            i: 0,
            var: &self.var,
            x,
        };
        let v = p.sum()?;
        if p.i != self.tokens.len() {
            return Err(format!("trailing tokens in {:?}", self.tokens));
        }
        Ok(v)
    }
}

struct ExprParser<'a> {
    t: &'a [String],
    i: usize,
    var: &'a str,
    x: f64,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&str> {
        self.t.get(self.i).map(String::as_str)
    }
    fn next(&mut self) -> Result<&str, String> {
        let t = self.t.get(self.i).ok_or("unexpected end of expression")?;
        self.i += 1;
        Ok(t)
    }
    fn sum(&mut self) -> Result<f64, String> {
        let mut v = self.term()?;
        while let Some(op @ ("+" | "-")) = self.peek() {
            let plus = op == "+";
            self.i += 1;
            let r = self.term()?;
            v = if plus { v + r } else { v - r };
        }
        Ok(v)
    }
    fn term(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        while let Some(op @ ("*" | "/" | "//" | "%")) = self.peek() {
            let op = op.to_string();
            self.i += 1;
            let r = self.unary()?;
            v = match op.as_str() {
                "*" => v * r,
                "/" => v / r,
                "//" => (v / r).floor(),
                _ => v - r * (v / r).floor(),
            };
        }
        Ok(v)
    }
    fn unary(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some("-") => {
                self.i += 1;
                Ok(-self.unary()?)
            }
            Some("+") => {
                self.i += 1;
                self.unary()
            }
            _ => self.power(),
        }
    }
    fn power(&mut self) -> Result<f64, String> {
        let base = self.atom()?;
        if self.peek() == Some("**") {
            self.i += 1;
            let exp = self.unary()?;
            return Ok(base.powf(exp));
        }
        Ok(base)
    }
    fn atom(&mut self) -> Result<f64, String> {
        let tok = self.next()?.to_string();
        if tok == "(" {
            let v = self.sum()?;
            return match self.next()? {
                ")" => Ok(v),
                t => Err(format!("expected ), got {t}")),
            };
        }
        if let Ok(v) = tok.parse::<f64>() {
            return Ok(v);
        }
        if tok == self.var {
            return Ok(self.x);
        }
        match tok.as_str() {
            "math.pi" => return Ok(std::f64::consts::PI),
            "math.e" => return Ok(std::f64::consts::E),
            _ => {}
        }
        if self.peek() != Some("(") {
            return Err(format!("unknown name {tok}"));
        }
        self.i += 1;
        let mut args = vec![self.sum()?];
        while self.peek() == Some(",") {
            self.i += 1;
            args.push(self.sum()?);
        }
        match self.next()? {
            ")" => {}
            t => return Err(format!("expected ), got {t}")),
        }
        let one = |f: fn(f64) -> f64| -> Result<f64, String> {
            match args.as_slice() {
                [a] => Ok(f(*a)),
                _ => Err(format!("{tok} takes one argument")),
            }
        };
        match tok.as_str() {
            "min" => Ok(args.iter().copied().fold(f64::INFINITY, f64::min)),
            "max" => Ok(args.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            "abs" => one(f64::abs),
            "float" => one(|a| a),
            "int" => one(f64::trunc),
            "math.cos" => one(f64::cos),
            "math.sin" => one(f64::sin),
            "math.exp" => one(f64::exp),
            "math.sqrt" => one(f64::sqrt),
            "math.log" => one(f64::ln),
            "math.floor" => one(f64::floor),
            other => Err(format!("unknown function {other}")),
        }
    }
}

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
pub fn scheduler_sgd(lrs: &[f64], momentum: f64) -> optarena::Sgd<f64> {
    let mut b = ArenaBuilder::<f64>::new();
    let handles: Vec<_> = (0..lrs.len())
        .map(|i| b.param(&format!("p{i}"), &[3], &[1.0, -2.0, 0.5]).unwrap())
        .collect();
    let arena = b.build();
    let groups = handles
        .iter()
        .zip(lrs)
        .map(|(h, &lr)| ParamGroup::new([*h]).with("lr", lr));
    let config = optarena::SgdConfig {
        momentum,
        ..Default::default()
    };
    optarena::Sgd::new(&arena, groups, config).unwrap()
}

/// SCHEMA.md's scheduler tolerance: `1e-12` relative.
pub fn sched_close(got: f64, want: f64) -> bool {
    got == want || (got - want).abs() <= 1e-12 * want.abs()
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
            let got = opt.group_lr(g).unwrap();
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

// ---------------------------------------------------------------------------------------------
// AveragedModel (SCHEMA.md's `averaged.json`)

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

// ---------------------------------------------------------------------------------------------
// SparseAdam (SCHEMA.md's `sparse_adam.json`)

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
