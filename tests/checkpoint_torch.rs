//! A checkpoint PyTorch made (scripts/gen_checkpoint_fixtures.py through
//! scripts/torch_checkpoint.py) resumes in optarena and follows the trajectory torch recorded,
//! within SCHEMA.md's elementwise tolerances.

mod common;

use std::path::PathBuf;

use common::{decode, direction_check, elementwise_tol, hashed};
use optarena::{Algorithm, ArenaBuilder, Float, MatchBy, Optimizer, ParamGroup};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints")
}

/// Loads the case's checkpoint into a fresh arena and optimizer and continues; returns how
/// many values were compared.
fn resume<T: Float, A: Algorithm>(case: &Value) -> usize {
    let name = case["name"].as_str().unwrap();
    let dtype = case["dtype"].as_str().unwrap();
    assert_eq!(dtype, T::DTYPE, "{name}");
    let seed = case["seed"].as_u64().unwrap();
    let k = case["k"].as_u64().unwrap();
    // The model, with placeholder values: the checkpoint holds the real ones.
    let specs: Vec<(String, Vec<usize>)> = case["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let shape = p[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize);
            (p[0].as_str().unwrap().to_string(), shape.collect())
        })
        .collect();
    let mut b = ArenaBuilder::<T>::new();
    for (n, s) in &specs {
        b.param_with(n, s, |_| T::from_f64(123.0)).unwrap();
    }
    let mut arena = b.build();
    // The groups as torch had them (by name); every hyperparameter comes from the checkpoint.
    let info =
        optarena::checkpoint::inspect(dir().join(case["checkpoint"].as_str().unwrap())).unwrap();
    let groups: Vec<ParamGroup<T>> = info
        .meta
        .param_groups
        .iter()
        .map(|g| ParamGroup::named(g.params.iter().map(|p| p.name.clone())))
        .collect();
    let mut opt = Optimizer::<T, A>::new(&arena, groups, A::Config::default()).unwrap();
    opt.load_checkpoint(
        dir().join(case["checkpoint"].as_str().unwrap()),
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_ne!(
        opt.group_config(1).unwrap(),
        &A::Config::default(),
        "{name}"
    );
    // The same state saved by optarena, for the other direction:
    // `scripts/torch_checkpoint.py resume-check tests/fixtures/checkpoints/torch_resume.json
    // target/tmp` loads it into torch and continues on the recorded trajectory.
    let rust_made =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.rust.safetensors"));
    opt.save_checkpoint(&rust_made, Some(&arena)).unwrap();
    let n_total: usize = arena.len();
    let (rtol, atol) = elementwise_tol(dtype);
    // Muon cases: SCHEMA.md's direction and norm test on each parameter's change since the
    // checkpoint (torch's Newton–Schulz products are bf16).
    let direction = case["compare"].as_str() == Some("direction");
    let at_load: Vec<Vec<f64>> = specs
        .iter()
        .map(|(n, _)| {
            let v = arena.value_by_name(n).unwrap();
            v.iter().map(|x| x.to_f64()).collect()
        })
        .collect();
    let mut compared = 0;
    for rec in case["steps"].as_array().unwrap() {
        let t = rec["step"].as_u64().unwrap();
        assert!(t > k);
        let g = hashed(seed, t, n_total);
        let mut at = 0;
        for (n, _) in &specs {
            let p = arena.find(n).unwrap();
            let len = arena.info(p).len;
            let grad: Vec<T> = g[at..at + len].iter().map(|&x| T::from_f64(x)).collect();
            arena.set_grad(p, &grad).unwrap();
            at += len;
        }
        opt.step(&mut arena).unwrap();
        for (pi, ((n, _), b64)) in specs
            .iter()
            .zip(rec["params"].as_array().unwrap())
            .enumerate()
        {
            let want = decode(b64.as_str().unwrap(), dtype);
            let got = arena.value_by_name(n).unwrap();
            assert_eq!(want.len(), got.len());
            if direction {
                let got: Vec<f64> = got.iter().map(|x| x.to_f64()).collect();
                direction_check(&at_load[pi], &got, &want)
                    .unwrap_or_else(|m| panic!("{name}: step {t}, {n}: {m}"));
                compared += got.len();
                continue;
            }
            for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
                let g = g.to_f64();
                assert!(
                    (g - w).abs() <= rtol * w.abs() + atol,
                    "{name}: step {t}, {n}[{i}]: optarena {g}, torch {w}"
                );
                compared += 1;
            }
        }
    }
    compared
}

#[test]
fn torch_made_checkpoints_resume_on_torchs_trajectory() {
    let text = std::fs::read_to_string(dir().join("torch_resume.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut seen = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let n = match (
            case["optimizer"].as_str().unwrap(),
            case["dtype"].as_str().unwrap(),
        ) {
            ("Adam", "float32") => resume::<f32, optarena::AdamAlgorithm>(case),
            ("Adam", "float64") => resume::<f64, optarena::AdamAlgorithm>(case),
            ("SGD", "float32") => resume::<f32, optarena::SGDAlgorithm>(case),
            ("SGD", "float64") => resume::<f64, optarena::SGDAlgorithm>(case),
            ("Muon", "float32") => resume::<f32, optarena::MuonAlgorithm>(case),
            other => panic!("no runner for {other:?}"),
        };
        println!(
            "optarena torch checkpoint: {}: resumed, {n} values within tolerance",
            case["name"]
        );
        seen.push(case["optimizer"].as_str().unwrap().to_string());
    }
    for kind in ["Adam", "SGD", "Muon"] {
        assert!(seen.contains(&kind.to_string()), "no {kind} case");
    }
}
