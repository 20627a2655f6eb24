//! Parity with PyTorch: replays the trajectories `scripts/gen_fixtures.py` recorded with torch
//! (committed under `tests/fixtures/`), the shared samples, and every `*.json` in
//! `$OPTARENA_FIXTURES_DIR` when it is set. Each file prints SCHEMA.md's report line
//! (`cargo test --test parity -- --nocapture` shows them).

mod common;

use std::path::Path;

use common::*;
use optarena::Parallelism;

#[test]
fn hashed_matches_the_schema_check_value() {
    // SCHEMA.md prints the values to 7 significant digits.
    let want = [
        6.380665,
        -0.01529538,
        -0.8362646,
        -0.05153453,
        0.34291106,
        -0.27646607,
    ];
    let got = hashed(12345, 3, 6);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 5e-7 * w.abs(),
            "hashed gave {g}, SCHEMA.md says {w}"
        );
        assert_eq!(*g as f32 as f64, *g, "{g} is not exact in f32");
    }
}

fn assert_dir_passes(dir: &Path) {
    let failures = replay_dir(dir);
    assert!(
        failures.is_empty(),
        "{} case(s) outside tolerance in {}:\n{}",
        failures.len(),
        dir.display(),
        failures.join("\n")
    );
}

#[test]
fn committed_torch_fixtures() {
    assert_dir_passes(&fixtures_dir());
}

#[test]
fn committed_copy_of_shared_samples() {
    assert_dir_passes(&fixtures_dir().join("sample"));
}

#[test]
fn shared_samples_beside_the_repository() {
    match shared_samples_dir() {
        Some(dir) => assert_dir_passes(&dir),
        None => println!("optarena fixtures: ../shared/fixtures/sample not present; its committed copy ran instead"),
    }
}

#[test]
fn extra_fixture_directory_from_the_environment() {
    match std::env::var_os("OPTARENA_FIXTURES_DIR") {
        Some(dir) => assert_dir_passes(Path::new(&dir)),
        None => println!("optarena fixtures: OPTARENA_FIXTURES_DIR not set"),
    }
}

/// The same trajectories on the global pool: identical numbers (the tolerance check is the
/// torch one; bitwise thread-count determinism is tested in tests/determinism.rs).
#[test]
fn sample_cases_on_the_thread_pool() {
    let mut tally = Tally::default();
    for path in json_files(&fixtures_dir().join("sample")) {
        for case in load_cases(&path) {
            if kind_of(&case) == Kind::Elementwise {
                tally.add(run_elementwise_case(&case, Parallelism::Global));
            }
        }
    }
    assert!(tally.checked > 0);
    assert!(tally.failed.is_empty(), "{:#?}", tally.failed);
}
