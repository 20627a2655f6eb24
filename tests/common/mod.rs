//! Test support: the fixture format of `SCHEMA.md` (deterministic inputs, base64 arrays) and
//! runners that replay PyTorch-recorded cases through optarena.
#![allow(dead_code, clippy::single_range_in_vec_init)]

use std::path::{Path, PathBuf};

use base64::Engine;
use optarena::{
    Algorithm, ArenaBuilder, Float, HyperValue, Hyperparams, Optimizer, Parallelism, ParamGroup,
};
use serde_json::Value;

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
pub fn run_elementwise<T: Float, A: Algorithm>(case: &Value, parallelism: Parallelism) -> Outcome {
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
        Ok(o) => o.with_parallelism(parallelism),
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
            *dst = T::from_f64(*src);
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
                let got = arena.value(handles[pi]);
                if want.len() != got.len() {
                    return Outcome::Fail(format!("{name}: param {pi} length"));
                }
                for (k, (w, g)) in want.iter().zip(got).enumerate() {
                    let g = g.to_f64();
                    let ok = (g - w).abs() <= rel * w.abs() + abs || (g.is_nan() && w.is_nan());
                    if !ok {
                        return Outcome::Fail(format!(
                            "{name}: step {t}, param {pi}[{k}]: optarena {g:e}, torch {w:e} (diff {:e})",
                            (g - w).abs()
                        ));
                    }
                }
            }
        }
    }
    Outcome::Pass
}

/// Dispatches an elementwise case to the optimizer it names, in its dtype.
pub fn run_elementwise_case(case: &Value, parallelism: Parallelism) -> Outcome {
    macro_rules! dispatch {
        ($($name:literal => $alg:ty),* $(,)?) => {
            match (case["optimizer"].as_str().unwrap(), case["dtype"].as_str().unwrap()) {
                $(
                    ($name, "float32") => run_elementwise::<f32, $alg>(case, parallelism),
                    ($name, "float64") => run_elementwise::<f64, $alg>(case, parallelism),
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
    /// Not a fixture.
    Unknown,
}

/// Recognises a case's kind.
pub fn kind_of(case: &Value) -> Kind {
    if case.get("scheduler").is_some() {
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
        Kind::Lbfgs => Outcome::Skip("LBFGS".into()),
        Kind::Scheduler => Outcome::Skip(format!(
            "scheduler {}",
            case["scheduler"].as_str().unwrap_or("?")
        )),
        Kind::Clip => run_clip_case(case),
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
    use optarena::clip::{clip_grad_norm, clip_grad_value, NormType};
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
    let all = [0..shapes.len()];
    if let Some(max_norm) = case.get("max_norm").and_then(Value::as_f64) {
        let p = match &case["norm_type"] {
            Value::String(s) if s == "inf" => f64::INFINITY,
            v => v.as_f64().unwrap(),
        };
        let norm = match NormType::from_f64(p) {
            Ok(n) => n,
            Err(e) => return Outcome::Fail(format!("{name}: {e}")),
        };
        let total = match clip_grad_norm(
            &mut arena,
            &all,
            max_norm,
            norm,
            false,
            &Parallelism::Global,
        ) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(format!("{name}: {e}")),
        };
        let want = case["total_norm"].as_f64().unwrap();
        if (total - want).abs() > 1e-5 * want.abs() {
            return Outcome::Fail(format!("{name}: total_norm {total}, torch {want}"));
        }
    } else {
        let v = case["clip_value"].as_f64().unwrap();
        if let Err(e) = clip_grad_value(&mut arena, &all, v) {
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
