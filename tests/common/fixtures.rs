//! Reading fixture files (SCHEMA.md): base64 arrays, torch keyword values, case kinds, and
//! replaying a file or a directory with a tally.

use super::*;

/// Decodes a base64 array of little-endian f32, f64 or bf16 into f64 values.
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

/// The kind of a fixture file, recognised from its cases' fields (SCHEMA.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// `LBFGS` is torch's spelling, kept verbatim as the crate's types do (README's "Naming").
#[allow(clippy::upper_case_acronyms)]
pub enum Kind {
    /// Elementwise optimizer trajectories.
    Elementwise,
    /// LBFGS runs.
    LBFGS,
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
        Kind::LBFGS
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
        Kind::LBFGS => run_lbfgs_case(case),
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
