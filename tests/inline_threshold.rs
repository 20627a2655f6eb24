//! A step below the parallel threshold runs on the calling thread even with
//! `Parallelism::Global`: rayon's global pool is never started (its workers would show as new
//! OS threads). A step at or above it does use the pool. One test in its own binary, so no
//! other test's threads interfere with the count.

use optarena::{Adam, AdamConfig, ArenaBuilder, ClipNorm, Parallelism, ParamGroup};

#[cfg(target_os = "linux")]
fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Ten Adam steps (five plain, five with a folded clip) over `n` elements on rayon's global
/// pool, with the given parallel threshold; returns the parameters after them.
fn ten_steps(n: usize, threshold: Option<usize>) -> Vec<f32> {
    let mut b = ArenaBuilder::<f32>::new();
    b.param("w", &[n], &vec![0.5; n]).unwrap();
    let mut arena = b.build();
    arena.grads_mut().fill(1e-3);
    let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default())
        .unwrap()
        .with_parallelism(Parallelism::Global);
    if let Some(t) = threshold {
        opt.set_parallel_threshold(t);
    }
    for _ in 0..5 {
        opt.step(&mut arena).unwrap();
        opt.step_with_options(
            &mut arena,
            optarena::StepOptions::new().clipped(ClipNorm::l2(1e-3)),
        )
        .unwrap();
    }
    arena.params().to_vec()
}

#[cfg(target_os = "linux")]
#[test]
fn small_steps_never_start_the_global_pool_and_large_ones_do() {
    let n = 100_000;
    assert!(n < optarena::parallel::PARALLEL_THRESHOLD);
    let before = os_threads();
    let inline = ten_steps(n, None);
    assert_eq!(
        os_threads(),
        before,
        "a small step started rayon's global pool"
    );
    // The same steps with the threshold at 0 go to the pool, and give the same bits.
    let pooled = ten_steps(n, Some(0));
    // (Asking rayon for its size would itself start the pool, so only the OS threads count.)
    let after = os_threads();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        assert!(
            after > before,
            "a step over the threshold did not use the pool"
        );
    }
    let same = inline
        .iter()
        .zip(&pooled)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "inline and pooled steps differ");
}
