//! Errors keep what caused them: an I/O failure its `io::Error` (kind and source chain), a
//! JSON failure its `serde_json::Error`; and each kind of failure has its own variant.

use std::error::Error as _;
use std::io::ErrorKind;

use optarena::checkpoint::{self, TrainingCheckpoint};
use optarena::clip::{clip_grad_norm_all, ClipNorm};
use optarena::schedule::{LrScheduler, StepLR, StepLRConfig};
use optarena::{ArenaBuilder, Error, MatchBy, ParamGroup, SGDConfig, SGD};

fn sgd() -> (optarena::Arena<f32>, SGD<f32>) {
    let mut b = ArenaBuilder::<f32>::new();
    b.param("w", &[3], &[1.0, -2.0, 0.5]).unwrap();
    let arena = b.build();
    let opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::new().with_lr(0.1)).unwrap();
    (arena, opt)
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("optarena-errors-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn io_error_keeps_its_kind_and_source() {
    let (mut arena, mut opt) = sgd();
    let missing = temp_dir("missing").join("no-such-checkpoint.safetensors");
    let e = checkpoint::load(&missing, &mut opt, Some(&mut arena), MatchBy::Name).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_eq!(e.io_kind(), Some(ErrorKind::NotFound));
    let source = e.source().expect("an i/o error has a source");
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("the source is the io::Error itself");
    assert_eq!(io.kind(), ErrorKind::NotFound);
    // The message names the path and what was being done.
    assert!(e.to_string().contains("opening `"), "{e}");
    assert!(
        e.to_string().contains("no-such-checkpoint.safetensors"),
        "{e}"
    );
}

#[test]
fn saving_over_a_directory_is_an_io_error_of_that_kind() {
    let (_arena, opt) = sgd();
    let dir = temp_dir("isdir");
    let e = checkpoint::save(&dir, &opt, None).unwrap_err();
    assert_eq!(e.io_kind(), Some(ErrorKind::IsADirectory), "{e}");
    assert!(e.to_string().contains("it is a directory"), "{e}");
    let e = checkpoint::save(format!("{}/", dir.display()), &opt, None).unwrap_err();
    assert_eq!(e.io_kind(), Some(ErrorKind::InvalidInput), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_error_keeps_the_serde_json_error() {
    let (_arena, mut opt) = sgd();
    let mut sched = StepLR::new(&mut opt, StepLRConfig::new(2)).unwrap();
    let e = sched
        .load_state_dict_json(&mut opt, "{ not json")
        .unwrap_err();
    assert!(matches!(e, Error::Serde { .. }), "{e:?}");
    assert_eq!(e.io_kind(), None);
    let json = e
        .source()
        .and_then(|s| s.downcast_ref::<serde_json::Error>())
        .expect("the source is serde_json's error");
    assert!(json.is_syntax(), "{json}");
    assert_eq!(json.line(), 1);
}

#[test]
fn micro_batch_count_has_its_own_variant() {
    let e = optarena::StepOptions::new().accumulated(0).unwrap_err();
    assert!(
        matches!(e, Error::InvalidMicroBatchCount { count: 0 }),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "Invalid micro-batch count: 0");
}

#[test]
fn non_finite_total_norm_has_its_own_variant() {
    let (mut arena, _opt) = sgd();
    let w = arena.find("w").unwrap();
    arena.set_grad(w, &[1.0, f32::INFINITY, 0.0]).unwrap();
    let e =
        clip_grad_norm_all(&mut arena, ClipNorm::new(1.0).error_if_nonfinite(true)).unwrap_err();
    match e {
        Error::NonFiniteTotalNorm { order } => assert_eq!(order, 2.0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn training_checkpoint_names_have_their_own_variant() {
    let (arena, opt) = sgd();
    let e = TrainingCheckpoint::new(&arena)
        .optimizer("main", &opt)
        .optimizer("main", &opt)
        .write(&mut Vec::new())
        .unwrap_err();
    assert!(matches!(e, Error::CheckpointName(_)), "{e:?}");
    assert!(e.to_string().contains("two optimizers named `main`"), "{e}");
}
