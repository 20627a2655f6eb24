//! Replays every committed fuzz input (`fuzz/corpus/<target>/*`) through the fuzz targets'
//! bodies on the stable toolchain, so CI keeps every case the fuzzers found, without
//! cargo-fuzz. The bodies live in `fuzz/src/lib.rs`, which the cargo-fuzz binaries use too.
//!
//! `cargo test --release --test fuzz_corpus -- --ignored write_seeds` regenerates the
//! `seed-*` inputs.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod fuzz_bodies;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, body: fn(&[u8])) {
    let dir = corpus(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if let Err(e) = std::panic::catch_unwind(|| body(&data)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("fuzz target `{target}` fails on {name}: {msg}");
        }
    }
    println!(
        "optarena fuzz corpus: {target}: {} inputs replayed",
        files.len()
    );
}

#[test]
fn decode_corpus() {
    replay("decode", fuzz_bodies::decode);
}

#[test]
fn kernels_corpus() {
    replay("kernels", fuzz_bodies::kernels);
}

#[test]
fn api_corpus() {
    replay("api", fuzz_bodies::api);
}

/// Writes the `seed-*` inputs: for each algorithm and dtype, a valid binary checkpoint and a
/// JSON state dict of the standard optimizer (decode), a kernel case (kernels) and a typical
/// call sequence (api).
#[test]
#[ignore]
fn write_seeds() {
    use optarena::optim::*;
    use optarena::{checkpoint, Algorithm, Float};

    fn seeds<T: Float, A: Algorithm>(k: u8, wide: u8) {
        let mut arena = fuzz_bodies::standard_arena_for::<T, A>();
        let mut opt = fuzz_bodies::standard_optimizer::<T, A>(&arena);
        fuzz_bodies::standard_grads(&mut arena, 1);
        opt.step(&mut arena).unwrap();
        let tag = format!("{}-{}", A::NAME, T::DTYPE);
        // decode: [k, wide, mode, by, with_arena, stepped] + payload.
        let mut bin = Vec::new();
        checkpoint::write(&mut bin, &opt, Some(&arena)).unwrap();
        let mut d = vec![k, wide, 1, 0, 1, 1];
        d.extend_from_slice(&bin);
        std::fs::write(corpus("decode").join(format!("seed-bin-{tag}")), d).unwrap();
        let mut d = vec![k, wide, 2, 1, 0, 1];
        d.extend_from_slice(opt.state_dict_json().unwrap().as_bytes());
        std::fs::write(corpus("decode").join(format!("seed-json-{tag}")), d).unwrap();
        // kernels: defaults, step 3, fresh, 37 elements at offset 3, data from a counter.
        let mut d = vec![k, wide];
        d.extend(std::iter::repeat_n(1u8, 16)); // keep defaults
        d.extend([0, 2, 1, 1, 1, 37, 1, 3]);
        d.extend((0..600u32).map(|i| (i * 37 % 251) as u8));
        std::fs::write(corpus("kernels").join(format!("seed-{tag}")), d).unwrap();
        // api: create over all params, steps, save both ways, load, set lr, add group fails.
        let d = vec![
            k, wide, 0, 0, 5, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 5, 6, 2,
            7, 0, 1, 8, 1, 0, 9, 0, 0, 3, 0, 2, 3, 2, 0, 4, 1, 0, 0, 3, 2, 11, 1, 1, 3, 2, 3, 2,
        ];
        std::fs::write(corpus("api").join(format!("seed-{tag}")), d).unwrap();
    }
    for t in ["decode", "kernels", "api"] {
        std::fs::create_dir_all(corpus(t)).unwrap();
    }
    macro_rules! all {
        ($($k:literal: $a:ty),*) => {
            $(seeds::<f32, $a>($k, 0); seeds::<f64, $a>($k, 1);)*
        };
    }
    all!(0: SGDAlgorithm, 1: AdamAlgorithm, 2: AdamWAlgorithm, 3: RAdamAlgorithm,
         4: NAdamAlgorithm, 5: AdamaxAlgorithm, 6: AdagradAlgorithm, 7: AdadeltaAlgorithm,
         8: RMSpropAlgorithm, 9: RpropAlgorithm, 10: ASGDAlgorithm, 11: AdafactorAlgorithm,
         12: MuonAlgorithm);
    // L-BFGS (number 13 in `decode` and `api`): a JSON state dict after two steps, and a
    // sequence of steps, saves, a failing closure, loads and a hyperparameter change.
    fn lbfgs_seeds<T: Float>(wide: u8) {
        let mut arena = fuzz_bodies::standard_arena::<T>();
        let mut opt = LBFGS::new(
            &arena,
            [optarena::ParamGroup::all()],
            LBFGSConfig::default(),
        )
        .unwrap();
        let coeffs = [T::ONE, T::from_f64(0.5)];
        for _ in 0..2 {
            opt.step(&mut arena, |a| fuzz_bodies::quadratic(a, &coeffs, T::ONE))
                .unwrap();
        }
        let tag = format!("LBFGS-{}", T::DTYPE);
        // decode: [13, wide, by, 8 config bytes (keep), steps] + JSON.
        let mut d = vec![13, wide, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2];
        d.extend_from_slice(opt.state_dict_json().unwrap().as_bytes());
        std::fs::write(corpus("decode").join(format!("seed-json-{tag}")), d).unwrap();
        // api: [13, wide, 8 config bytes (keep)], then ops: step (2 coefficients, a), save,
        // try_step failing on call 1, step, load (uncorrupted), set lr, zero_grad, step on
        // another arena.
        let d = vec![
            13, wide, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 3, 5, 2, 4, 2, 1, 1, 0, 3, 9, 7, 5, 0, 0, 0, 6,
            0, 0, 7, 1, 3,
        ];
        std::fs::write(corpus("api").join(format!("seed-{tag}")), d).unwrap();
    }
    // A training checkpoint (arena, AdamW, StepLR, GradScaler) after two steps.
    {
        let (mut arena, mut opt, mut sched, mut scaler) = fuzz_bodies::standard_training();
        for t in 1..=2 {
            fuzz_bodies::standard_training_step(&mut arena, &mut opt, &mut sched, &mut scaler, t);
        }
        let mut d = fuzz_bodies::TRAINING_TAG.to_vec();
        d.push(0);
        checkpoint::TrainingCheckpoint::new(&arena)
            .optimizer("adamw", &opt)
            .scheduler("lr", &sched)
            .scaler(&scaler)
            .step(2)
            .metadata("loader", serde_json::json!({"batch": 2}))
            .write(&mut d)
            .unwrap();
        std::fs::write(corpus("decode").join("seed-training"), d).unwrap();
    }
    lbfgs_seeds::<f32>(0);
    lbfgs_seeds::<f64>(1);
}

/// Writes the seeds of the tagged inputs (SWALR state decoding).
#[test]
#[ignore]
fn write_swa_seeds() {
    use optarena::schedule::{AnnealStrategy, SWALRConfig, SWALR};
    use optarena::LrScheduler;
    let arena = fuzz_bodies::standard_arena::<f64>();
    let mut opt = fuzz_bodies::standard_optimizer::<f64, optarena::optim::SGDAlgorithm>(&arena);
    let mut s = SWALR::new(
        &mut opt,
        SWALRConfig::new(vec![0.05, 0.002])
            .with_anneal_epochs(4)
            .with_anneal_strategy(AnnealStrategy::Linear),
    )
    .unwrap();
    s.step(&mut opt).unwrap();
    let mut d = fuzz_bodies::SWALR_TAG.to_vec();
    d.extend_from_slice(s.state_dict_json().unwrap().as_bytes());
    std::fs::write(corpus("decode").join("seed-json-SWALR"), d).unwrap();
    // AveragedModel: EMA in f32 after two updates.
    let arena = fuzz_bodies::standard_arena::<f32>();
    let mut m = optarena::AveragedModel::ema(&arena, 0.9).unwrap();
    m.update_parameters(&arena).unwrap();
    m.update_parameters(&arena).unwrap();
    let mut d = fuzz_bodies::AVERAGED_TAG.to_vec();
    d.extend_from_slice(&[0, 3]);
    d.extend_from_slice(m.state_dict_json().unwrap().as_bytes());
    std::fs::write(corpus("decode").join("seed-json-AveragedModel"), d).unwrap();
    // SparseAdam: f32, default options, groups split at 2; a valid sparse step on p0 (rows
    // 0 and 2), one with an out-of-range row, one with a wrong value count, a dense step,
    // a save and a load.
    let mut d = fuzz_bodies::SPARSE_ADAM_TAG.to_vec();
    d.extend_from_slice(&[0, 0, 0, 0, 0, 2]);
    d.extend_from_slice(&[0, 1, 0, 2, 0, 2, 0, 10, 20, 30, 40, 50, 60]);
    d.extend_from_slice(&[1, 1, 0, 1, 7, 0, 10, 20]);
    d.extend_from_slice(&[0, 1, 4, 1, 1, 250, 3, 1, 2, 3]);
    d.extend_from_slice(&[2, 1, 3, 1, 3, 0]);
    std::fs::write(corpus("api").join("seed-SparseAdam"), d).unwrap();
}

/// Writes the seeds of the binary `AveragedModel` and `SparseAdam` checkpoint decoders (tags
/// `AVGBIN:` and `SPABIN:`) and a `SparseAdam` call sequence with binary saves and loads and
/// hyperparameter changes by name.
#[test]
#[ignore]
fn write_checkpoint_seeds() {
    use optarena::{checkpoint, AveragedModel};
    // AveragedModel: EMA in f32 after two updates (flags: EMA, make checksums right); SWA in
    // f64 saved from the reversed arena, loaded into the standard one (flags: f64, update).
    let arena = fuzz_bodies::standard_arena::<f32>();
    let mut m = AveragedModel::ema(&arena, 0.9).unwrap();
    m.update_parameters(&arena).unwrap();
    m.update_parameters(&arena).unwrap();
    let mut d = fuzz_bodies::AVERAGED_BIN_TAG.to_vec();
    d.push(0b01010);
    checkpoint::averaged::write(&mut d, &m).unwrap();
    std::fs::write(corpus("decode").join("seed-bin-AveragedModel-float32"), d).unwrap();
    let arena = fuzz_bodies::reversed_arena::<f64>();
    let mut m = AveragedModel::new(&arena);
    m.update_parameters(&arena).unwrap();
    let mut d = fuzz_bodies::AVERAGED_BIN_TAG.to_vec();
    d.push(0b00101);
    checkpoint::averaged::write(&mut d, &m).unwrap();
    std::fs::write(corpus("decode").join("seed-bin-AveragedModel-float64"), d).unwrap();
    // SparseAdam: f32 with the arena's values after a step (flags: with arena, checksums);
    // f64 state only, saved from the reversed arena (flags: f64, step first, reversed).
    let mut arena = fuzz_bodies::standard_arena::<f32>();
    let mut opt = fuzz_bodies::standard_sparse_adam(&arena);
    fuzz_bodies::standard_sparse_step(&mut opt, &mut arena);
    let mut d = fuzz_bodies::SPARSE_ADAM_BIN_TAG.to_vec();
    d.push(0b01010);
    checkpoint::sparse_adam::write(&mut d, &opt, Some(&arena)).unwrap();
    std::fs::write(corpus("decode").join("seed-bin-SparseAdam-float32"), d).unwrap();
    let mut arena = fuzz_bodies::reversed_arena::<f64>();
    let mut opt = fuzz_bodies::standard_sparse_adam(&arena);
    fuzz_bodies::standard_sparse_step(&mut opt, &mut arena);
    fuzz_bodies::standard_sparse_step(&mut opt, &mut arena);
    let mut d = fuzz_bodies::SPARSE_ADAM_BIN_TAG.to_vec();
    d.push(0b10101);
    checkpoint::sparse_adam::write(&mut d, &opt, None).unwrap();
    std::fs::write(corpus("decode").join("seed-bin-SparseAdam-float64"), d).unwrap();
    // api: f32, default options, groups split at 2; a sparse step on p0 (rows 0 and 2), a
    // binary save with the arena, the same step again, lr 0.5 on group 1, betas (1.0, 0.9) on
    // group 0 (refused), a load of the save, a load with byte 200 changed and the checksums
    // made right, a save with another arena's values (refused).
    let step = [0, 1, 0, 0, 2, 0, 2, 0, 110, 90, 120, 80];
    let mut d = fuzz_bodies::SPARSE_ADAM_TAG.to_vec();
    d.extend_from_slice(&[0, 0, 0, 0, 0, 2]);
    d.extend_from_slice(&step);
    d.extend_from_slice(&[4, 1, 1, 0]);
    d.extend_from_slice(&step);
    d.extend_from_slice(&[5, 1, 0, 4]);
    d.extend_from_slice(&[5, 0, 1, 2, 5]);
    d.extend_from_slice(&[4, 1, 0, 0, 0]);
    d.extend_from_slice(&[4, 1, 0, 1, 200, 7, 1]);
    d.extend_from_slice(&[4, 1, 1, 255]);
    std::fs::write(corpus("api").join("seed-SparseAdam-checkpoints"), d).unwrap();
}

/// The binary seeds of `AveragedModel` and `SparseAdam` are valid checkpoints that load into
/// the models their flags describe (so the fuzzer starts from the success path).
#[test]
fn checkpoint_seeds_load() {
    use optarena::{checkpoint, AveragedModel};
    let read = |name: &str, tag: &[u8]| -> (u8, Vec<u8>) {
        let d = std::fs::read(corpus("decode").join(name)).unwrap();
        let rest = d.strip_prefix(tag).expect("tagged");
        (rest[0], rest[1..].to_vec())
    };
    let (flags, b) = read(
        "seed-bin-AveragedModel-float32",
        fuzz_bodies::AVERAGED_BIN_TAG,
    );
    assert_eq!(flags & 0b10011, 0b00010);
    let mut m = AveragedModel::ema(&fuzz_bodies::standard_arena::<f32>(), 0.9).unwrap();
    checkpoint::averaged::read(&mut &b[..], b.len() as u64, &mut m).unwrap();
    assert_eq!(m.n_averaged(), 2);
    let (flags, b) = read(
        "seed-bin-AveragedModel-float64",
        fuzz_bodies::AVERAGED_BIN_TAG,
    );
    assert_eq!(flags & 0b10011, 0b00001);
    let mut m = AveragedModel::new(&fuzz_bodies::standard_arena::<f64>());
    checkpoint::averaged::read(&mut &b[..], b.len() as u64, &mut m).unwrap();
    assert_eq!(m.n_averaged(), 1);
    let (flags, b) = read(
        "seed-bin-SparseAdam-float32",
        fuzz_bodies::SPARSE_ADAM_BIN_TAG,
    );
    assert_eq!(flags & 0b10011, 0b00010);
    let mut a = fuzz_bodies::standard_arena::<f32>();
    let mut o = fuzz_bodies::standard_sparse_adam(&a);
    checkpoint::sparse_adam::read(&mut &b[..], b.len() as u64, &mut o, Some(&mut a)).unwrap();
    let (flags, b) = read(
        "seed-bin-SparseAdam-float64",
        fuzz_bodies::SPARSE_ADAM_BIN_TAG,
    );
    assert_eq!(flags & 0b10011, 0b10001);
    let a = fuzz_bodies::reversed_arena::<f64>();
    let mut o = fuzz_bodies::standard_sparse_adam(&a);
    checkpoint::sparse_adam::read(&mut &b[..], b.len() as u64, &mut o, None).unwrap();
    let p0 = a.find("p0").unwrap();
    assert_eq!(o.step_count(p0), Some(2));
}

/// Without cargo-fuzz (nightly): random byte mutations of the `AveragedModel` and `SparseAdam`
/// seeds (binary checkpoints and API sequences) through the target bodies, which assert that
/// nothing panics and every failed call changes nothing. `OPTARENA_MUTATIONS` sets the count
/// per seed (default 2000).
#[test]
#[ignore]
fn mutate_checkpoint_seeds() {
    let n: u64 = std::env::var("OPTARENA_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    type Body = fn(&[u8]);
    let seeds: [(&str, &str, Body); 6] = [
        (
            "decode",
            "seed-bin-AveragedModel-float32",
            fuzz_bodies::decode,
        ),
        (
            "decode",
            "seed-bin-AveragedModel-float64",
            fuzz_bodies::decode,
        ),
        ("decode", "seed-bin-SparseAdam-float32", fuzz_bodies::decode),
        ("decode", "seed-bin-SparseAdam-float64", fuzz_bodies::decode),
        ("api", "seed-SparseAdam", fuzz_bodies::api),
        ("api", "seed-SparseAdam-checkpoints", fuzz_bodies::api),
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (target, name, body) in seeds {
        let seed = std::fs::read(corpus(target).join(name)).unwrap();
        let tag = seed.iter().position(|&b| b == b':').unwrap() + 1;
        for i in 0..n {
            let mut d = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = tag + (next() as usize) % (d.len() - tag);
                match next() % 3 {
                    0 => d[at] = next() as u8,
                    1 => d[at] ^= 1 << (next() % 8),
                    _ => d.truncate(at.max(tag + 1)),
                }
            }
            if std::panic::catch_unwind(|| body(&d)).is_err() {
                let out = std::env::temp_dir().join(format!("optarena-crash-{name}-{i}"));
                std::fs::write(&out, &d).unwrap();
                panic!("{target} fails on a mutation of {name}: {}", out.display());
            }
        }
    }
}
