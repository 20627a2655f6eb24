//! `AveragedModel` beyond the torch fixtures (`tests/fixtures/averaged.json`, replayed by
//! `tests/parity.rs`): fused pass = scalar reference bitwise, any thread count, swapping the
//! averaged weights in and out, checkpoints, and every error leaving things as they were.

mod common;

use std::sync::Arc;

use common::*;
use optarena::{Arena, ArenaBuilder, AverageFn, AveragedModel, Error, Float, Parallelism};

fn arena<T: Float>(lens: &[usize], seed: u64) -> Arena<T> {
    let mut b = ArenaBuilder::<T>::new();
    let mut rng = Rng(seed);
    for (i, &n) in lens.iter().enumerate() {
        b.param(&format!("p{i}"), &[n], &rng.vec::<T>(n, 2.0))
            .unwrap();
    }
    b.build()
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn pool(n: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    ))
}

fn kinds() -> Vec<AverageFn> {
    vec![
        AverageFn::Swa,
        AverageFn::ema(0.999).unwrap(),
        AverageFn::ema(0.7).unwrap(),
        AverageFn::ema(0.3).unwrap(),
        AverageFn::ema(0.0).unwrap(),
        AverageFn::ema(1.0).unwrap(),
    ]
}

/// Runs `updates` updates of the arena's parameters moved by a counter, fused on `par` (with
/// threshold 0, so the pool is really used) or by the reference.
fn run<T: Float>(
    lens: &[usize],
    avg: AverageFn,
    par: Option<Parallelism>,
    updates: u64,
) -> Vec<u64> {
    let mut a = arena::<T>(lens, 7);
    let mut m = AveragedModel::with_avg_fn(&a, avg).unwrap();
    let reference = par.is_none();
    if let Some(p) = par {
        m = m.with_parallelism(p);
        m.set_parallel_threshold(0);
    }
    let mut rng = Rng(99);
    for _ in 0..updates {
        for x in a.params_mut() {
            *x = *x + rng.vec::<T>(1, 0.5)[0];
        }
        if reference {
            m.update_parameters_reference(&a).unwrap();
        } else {
            m.update_parameters(&a).unwrap();
        }
    }
    assert_eq!(m.n_averaged(), updates);
    bits(m.averaged())
}

#[test]
fn fused_equals_reference_bitwise_for_any_thread_count() {
    for lens in [
        vec![1],
        vec![3, 5, 7],
        vec![16 * 1024 + 9, 31],
        vec![40_000, 17, 8],
    ] {
        for avg in kinds() {
            let want = run::<f32>(&lens, avg, None, 6);
            for par in [
                Parallelism::Sequential,
                Parallelism::Global,
                pool(1),
                pool(2),
                pool(3),
            ] {
                assert_eq!(
                    run::<f32>(&lens, avg, Some(par), 6),
                    want,
                    "{lens:?} {avg:?}"
                );
            }
            let want = run::<f64>(&lens, avg, None, 6);
            assert_eq!(
                run::<f64>(&lens, avg, Some(pool(2)), 6),
                want,
                "{lens:?} {avg:?}"
            );
        }
    }
}

#[test]
fn torch_fixtures_on_a_pool_of_three_threads() {
    let cases = load_cases(&fixtures_dir().join("averaged.json"));
    assert!(cases.len() >= 10);
    for case in cases {
        let o = match case["dtype"].as_str().unwrap_or("float32") {
            "float32" => run_averaged::<f32>(&case, pool(3), 0),
            _ => run_averaged::<f64>(&case, pool(3), 0),
        };
        assert!(matches!(o, Outcome::Pass), "{o:?}");
    }
}

#[test]
fn first_update_copies_and_swa_is_the_mean() {
    let mut a = arena::<f64>(&[4], 1);
    let mut m = AveragedModel::new(&a);
    let mut sum = [0.0f64; 4];
    for k in 1..=4 {
        let vals: Vec<f64> = (0..4).map(|i| (i * k) as f64 * 0.25).collect();
        a.params_mut().copy_from_slice(&vals);
        for (s, v) in sum.iter_mut().zip(&vals) {
            *s += v;
        }
        m.update_parameters(&a).unwrap();
        if k == 1 {
            assert_eq!(m.averaged(), &vals[..]);
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / 4.0).collect();
    assert_eq!(m.averaged(), &mean[..]);
    // EMA: the first update copies too, then decay · avg + (1 − decay) · param.
    let mut e = AveragedModel::ema(&a, 0.5).unwrap();
    a.params_mut().copy_from_slice(&[2.0, 4.0, 6.0, 8.0]);
    e.update_parameters(&a).unwrap();
    assert_eq!(e.averaged(), [2.0, 4.0, 6.0, 8.0]);
    a.params_mut().copy_from_slice(&[0.0; 4]);
    e.update_parameters(&a).unwrap();
    assert_eq!(e.averaged(), [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn swap_into_twice_restores_and_swapped_state_refuses_what_would_be_wrong() {
    let mut a = arena::<f32>(&[5, 3], 2);
    let mut m = AveragedModel::new(&a);
    let initial = a.params().to_vec();
    for x in a.params_mut() {
        *x += 1.0;
    }
    m.update_parameters(&a).unwrap();
    for x in a.params_mut() {
        *x += 1.0;
    }
    m.update_parameters(&a).unwrap();
    let training = a.params().to_vec();
    let averaged = m.averaged().to_vec();
    assert_eq!(
        averaged,
        initial.iter().map(|x| x + 1.5).collect::<Vec<_>>()
    );
    let grads_before = a.grads().to_vec();
    m.swap_into(&mut a).unwrap();
    assert!(m.is_swapped());
    assert_eq!(a.params(), &averaged[..]);
    assert_eq!(a.grads(), &grads_before[..]);
    for e in [
        m.update_parameters(&a).unwrap_err(),
        m.state_dict().unwrap_err(),
        m.copy_into(&mut a).unwrap_err(),
        m.value_by_name("p0").unwrap_err(),
    ] {
        assert!(e.to_string().contains("swapped into the arena"), "{e}");
    }
    assert_eq!(m.n_averaged(), 2);
    m.swap_into(&mut a).unwrap();
    assert!(!m.is_swapped());
    assert_eq!(a.params(), &training[..]);
    assert_eq!(m.averaged(), &averaged[..]);
    m.copy_into(&mut a).unwrap();
    assert_eq!(a.params(), &averaged[..]);
    assert_eq!(m.value_by_name("p1").unwrap(), &averaged[5..]);
}

#[test]
fn another_arena_is_an_error_and_changes_nothing() {
    let a = arena::<f32>(&[5, 3], 3);
    let mut m = AveragedModel::new(&a);
    m.update_parameters(&a).unwrap();
    let before = (bits(m.averaged()), m.n_averaged());
    let mut shorter = arena::<f32>(&[5, 2], 3);
    let mut renamed = {
        let mut b = ArenaBuilder::<f32>::new();
        b.zeros("p0", &[5]).unwrap();
        b.zeros("q1", &[3]).unwrap();
        b.build()
    };
    let mut reshaped = {
        let mut b = ArenaBuilder::<f32>::new();
        b.zeros("p0", &[5]).unwrap();
        b.zeros("p1", &[1, 3]).unwrap();
        b.build()
    };
    for other in [&mut shorter, &mut renamed, &mut reshaped] {
        let snapshot = other.params().to_vec();
        for e in [
            m.update_parameters(other).unwrap_err(),
            m.swap_into(other).unwrap_err(),
            m.copy_into(other).unwrap_err(),
        ] {
            assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
            assert!(e.to_string().contains("AveragedModel"), "{e}");
        }
        assert_eq!(other.params(), &snapshot[..]);
        assert_eq!((bits(m.averaged()), m.n_averaged()), before);
    }
    assert!(renamed.params().iter().all(|&x| x == 0.0));
    // A handle of another arena is an error, not a panic.
    let foreign = arena::<f32>(&[5, 3], 3);
    let h = foreign.handles().next().unwrap();
    assert!(m.value(&a, h).is_err());
    assert!(m.value(&foreign, h).is_ok());
    // The same layout built again (a resumed run) is accepted.
    let again = arena::<f32>(&[5, 3], 3);
    m.update_parameters(&again).unwrap();
}

#[test]
fn ema_decay_outside_0_1_gets_torchs_message() {
    let a = arena::<f32>(&[2], 4);
    for d in [-0.1, 1.5, f64::NAN] {
        let e = AveragedModel::ema(&a, d).unwrap_err().to_string();
        assert!(
            e.ends_with(&format!(
                "Invalid decay value {d:?} provided. Please provide a value in [0,1] range."
            )),
            "{e}"
        );
    }
    assert!(AveragedModel::with_avg_fn(&a, AverageFn::Ema { decay: 2.0 }).is_err());
}

#[test]
fn state_round_trips_and_continues_bitwise() {
    for avg in kinds() {
        let mut a = arena::<f32>(&[16 * 1024 + 3, 7], 5);
        let mut m = AveragedModel::with_avg_fn(&a, avg).unwrap();
        let mut rng = Rng(5);
        let step = |a: &mut Arena<f32>, m: &mut AveragedModel<f32>, rng: &mut Rng| {
            let d = rng.vec::<f32>(a.len(), 0.5);
            for (x, y) in a.params_mut().iter_mut().zip(d) {
                *x += y;
            }
            m.update_parameters(a).unwrap();
        };
        for _ in 0..3 {
            step(&mut a, &mut m, &mut rng);
        }
        let json = m.state_dict_json().unwrap();
        let rebuilt = arena::<f32>(&[16 * 1024 + 3, 7], 5);
        let mut m2 = AveragedModel::new(&rebuilt);
        m2.load_state_dict_json(&json).unwrap();
        assert_eq!(m2.avg_fn(), avg);
        assert_eq!(m2.n_averaged(), 3);
        assert_eq!(bits(m2.averaged()), bits(m.averaged()));
        for _ in 0..2 {
            step(&mut a, &mut m, &mut rng);
            m2.update_parameters(&a).unwrap();
        }
        assert_eq!(bits(m2.averaged()), bits(m.averaged()));
        assert_eq!(m2.state_dict().unwrap(), m.state_dict().unwrap());
    }
}

#[test]
fn non_finite_values_save_and_load() {
    let mut a = arena::<f64>(&[3], 6);
    let mut m = AveragedModel::new(&a);
    a.params_mut()
        .copy_from_slice(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
    m.update_parameters(&a).unwrap();
    let json = m.state_dict_json().unwrap();
    let mut m2 = AveragedModel::new(&a);
    m2.load_state_dict_json(&json).unwrap();
    assert_eq!(bits(m2.averaged()), bits(m.averaged()));
}

#[test]
fn bad_states_are_refused_and_change_nothing() {
    let a = arena::<f32>(&[4, 2], 8);
    let mut m = AveragedModel::ema(&a, 0.9).unwrap();
    m.update_parameters(&a).unwrap();
    let good: serde_json::Value = serde_json::from_str(&m.state_dict_json().unwrap()).unwrap();
    assert_eq!(good["avg"], "ema");
    assert_eq!(good["decay"], 0.9);
    assert_eq!(good["n_averaged"], 1);
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "the state does not store parameter `p1`",
            Box::new(|v| {
                v["averaged"].as_object_mut().unwrap().remove("p1");
            }),
        ),
        (
            "(2 values), the state has 3",
            Box::new(|v| v["averaged"]["p1"] = serde_json::json!([1, 2, 3])),
        ),
        (
            "which this model does not have",
            Box::new(|v| v["averaged"]["zz"] = serde_json::json!([1])),
        ),
        (
            "saved as float64",
            Box::new(|v| v["dtype"] = "float64".into()),
        ),
        (
            "Invalid decay value 1.5",
            Box::new(|v| v["decay"] = 1.5.into()),
        ),
        ("state format 9", Box::new(|v| v["format"] = 9.into())),
        ("saved by \"Adam\"", Box::new(|v| v["kind"] = "Adam".into())),
        ("unknown variant", Box::new(|v| v["avg"] = "mean".into())),
        ("expected u64", Box::new(|v| v["n_averaged"] = (-1).into())),
    ];
    let b = arena::<f32>(&[4, 2], 9);
    let mut fresh = AveragedModel::new(&b);
    let before = (fresh.state_dict().unwrap(), fresh.avg_fn());
    for (want, edit) in edits {
        let mut v = good.clone();
        edit(&mut v);
        let e = fresh.load_state_dict_json(&v.to_string()).unwrap_err();
        assert!(matches!(e, Error::StateDict(_)), "{e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert_eq!((fresh.state_dict().unwrap(), fresh.avg_fn()), before);
    }
    fresh.load_state_dict_json(&good.to_string()).unwrap();
    assert_eq!(fresh.state_dict().unwrap(), m.state_dict().unwrap());
}

fn kernel_levels<T: Float>(level: optarena::SimdLevel) {
    use optarena::kernels::average::*;
    let mut rng = Rng(11);
    for n in 0..68 {
        for off in 0..3 {
            let a0 = rng.vec::<T>(n + off, 3.0);
            let p = rng.vec::<T>(n + off, 3.0);
            for count in [0u64, 1, 2, 6, 1000] {
                let (mut f, mut r) = (a0.clone(), a0.clone());
                swa_fused(level, &mut f[off..], &p[off..], count);
                swa_reference(&mut r[off..], &p[off..], count);
                assert_eq!(bits(&f), bits(&r), "swa n={n} off={off} count={count}");
                for decay in [0.999, 0.75, 0.5, 0.2, 0.0, 1.0] {
                    let (mut f, mut r) = (a0.clone(), a0.clone());
                    ema_fused(level, &mut f[off..], &p[off..], count, decay);
                    ema_reference(&mut r[off..], &p[off..], count, decay);
                    assert_eq!(bits(&f), bits(&r), "ema n={n} off={off} decay={decay}");
                }
            }
        }
    }
}

#[test]
fn kernels_equal_reference_at_every_simd_level_length_and_offset() {
    for level in optarena::SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
    {
        kernel_levels::<f32>(level);
        kernel_levels::<f64>(level);
    }
}
