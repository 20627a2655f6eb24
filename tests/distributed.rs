//! Data-parallel steps over real MPI ranks: each test launches `mpirun` with 1, 2 or 3 ranks
//! of this same test binary, which then runs the test's rank side. Run with
//! `cargo test --release --features mpi --test distributed` (needs Open MPI:
//! `apt-get install openmpi-bin libopenmpi-dev libclang-dev`).
#![cfg(feature = "mpi")]

use std::process::Command;

use optarena::distributed::{Communicator, DataParallel, MpiComm, Reduction};
use optarena::schedule::{StepLR, StepLRConfig};
use optarena::{
    AdamW, AdamWConfig, Arena, ArenaBuilder, ClipNorm, Float, LrScheduler, ParamGroup, StepOptions,
    StepOutcome,
};

/// The environment variable that tells a launched process which test's rank side to run.
const CHILD: &str = "OPTARENA_MPI_TEST";

/// In the test process: launches `mpirun -np ranks` of this binary running only `name`, and
/// fails with every rank's output unless all succeed. In a launched rank: returns its
/// communicator, and the caller runs the rank side.
fn launch_or_join(name: &str, ranks: usize) -> Option<MpiComm> {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        return Some(MpiComm::init().expect("MPI initialises in a launched rank"));
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["-np", &ranks.to_string(), "--oversubscribe"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        // Containers often run as root; Open MPI refuses to without both.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun runs (install openmpi-bin)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name} on {ranks} ranks failed:\n{text}"
    );
    // Every rank ran the test (not zero tests filtered in).
    assert_eq!(
        text.matches("1 passed").count(),
        ranks,
        "{name} on {ranks} ranks:\n{text}"
    );
    None
}

/// A small MLP-shaped arena: two weight matrices and their biases.
fn model<T: Float>() -> Arena<T> {
    let mut b = ArenaBuilder::<T>::new();
    let init = |n: usize, k: f64| -> Vec<T> {
        (0..n)
            .map(|i| T::from_f64(((i as f64) * k).sin() * 0.1))
            .collect()
    };
    b.param("fc1.weight", &[33, 17], &init(33 * 17, 0.37))
        .unwrap();
    b.param("fc1.bias", &[33], &init(33, 0.11)).unwrap();
    b.param("fc2.weight", &[5, 33], &init(5 * 33, 0.53))
        .unwrap();
    b.param("fc2.bias", &[5], &init(5, 0.29)).unwrap();
    b.build()
}

/// Rank `rank`'s gradient of parameter `name` at `step`: different on every rank.
fn grad<T: Float>(rank: usize, step: usize, name: &str, len: usize) -> Vec<T> {
    let salt = name.len() as f64;
    (0..len)
        .map(|i| T::from_f64(((i * 7 + rank * 131 + step * 17) as f64 * 0.013 + salt).cos()))
        .collect()
}

fn set_grads<T: Float>(arena: &mut Arena<T>, rank: usize, step: usize) {
    arena.zero_grad(true);
    for p in arena.handles().collect::<Vec<_>>() {
        let info = arena.info(p).clone();
        arena
            .set_grad(p, &grad(rank, step, &info.name, info.len))
            .unwrap();
    }
}

/// The single-process reference: the same model fed the rank-order average (sum, then
/// division by the world size) of every rank's gradients.
fn set_average_grads<T: Float>(arena: &mut Arena<T>, ranks: usize, step: usize) {
    arena.zero_grad(true);
    for p in arena.handles().collect::<Vec<_>>() {
        let info = arena.info(p).clone();
        let mut sum = grad::<T>(0, step, &info.name, info.len);
        for r in 1..ranks {
            for (a, g) in sum.iter_mut().zip(grad::<T>(r, step, &info.name, info.len)) {
                *a = *a + g;
            }
        }
        if ranks > 1 {
            for a in &mut sum {
                *a = *a / T::from_f64(ranks as f64);
            }
        }
        arena.set_grad(p, &sum).unwrap();
    }
}

fn groups<T: Float>() -> Vec<ParamGroup<T>> {
    vec![
        ParamGroup::named(["fc1.weight", "fc1.bias"]),
        ParamGroup::named(["fc2.weight", "fc2.bias"]).with("weight_decay", 0.0),
    ]
}

fn bits<T: Float>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

/// Runs `steps` data-parallel AdamW steps (two groups, a StepLR schedule, an lr set by hand)
/// on every rank and the same on the averaged gradients in one process; both must agree bit
/// for bit on every rank.
fn replicated_against_single_process<T: Float + optarena::distributed::CommElem>(
    comm: MpiComm,
    options: StepOptions,
) {
    let n = comm.size();
    let rank = comm.rank();
    let mut arena = model::<T>();
    let mut opt = AdamW::<T>::new(&arena, groups(), AdamWConfig::default()).unwrap();
    let mut sched = StepLR::new(&mut opt, StepLRConfig::new(2)).unwrap();
    let mut dp = DataParallel::new(comm, &arena, &opt).unwrap();

    let mut ref_arena = model::<T>();
    let mut ref_opt = AdamW::<T>::new(&ref_arena, groups(), AdamWConfig::default()).unwrap();
    let mut ref_sched = StepLR::new(&mut ref_opt, StepLRConfig::new(2)).unwrap();
    for step in 0..6 {
        if step == 3 {
            opt.set_lr(1, 5e-3).unwrap();
            ref_opt.set_lr(1, 5e-3).unwrap();
        }
        set_grads(&mut arena, rank, step);
        let report = dp.step_with_options(&mut opt, &mut arena, options).unwrap();
        sched.step(&mut opt).unwrap();
        set_average_grads(&mut ref_arena, n, step);
        let ref_report = ref_opt.step_with_options(&mut ref_arena, options).unwrap();
        ref_sched.step(&mut ref_opt).unwrap();
        assert_eq!(report, ref_report, "rank {rank} step {step}");
        assert_eq!(
            bits(arena.params()),
            bits(ref_arena.params()),
            "rank {rank} of {n}, step {step}"
        );
    }
}

#[test]
fn replicated_matches_single_process_on_1_2_3_ranks() {
    for ranks in 1..=3 {
        if let Some(comm) =
            launch_or_join("replicated_matches_single_process_on_1_2_3_ranks", ranks)
        {
            replicated_against_single_process::<f32>(comm, StepOptions::default());
            return;
        }
    }
}

#[test]
fn replicated_f64_matches_single_process() {
    if let Some(comm) = launch_or_join("replicated_f64_matches_single_process", 3) {
        replicated_against_single_process::<f64>(comm, StepOptions::default());
    }
}

/// Clipping by the global norm: every rank computes the norm of the same averaged
/// gradients, so the clip (and the reported norm) is the single process's on every rank.
#[test]
fn global_norm_clip_is_the_same_on_every_rank() {
    if let Some(comm) = launch_or_join("global_norm_clip_is_the_same_on_every_rank", 2) {
        let options = StepOptions {
            clip: Some(ClipNorm::l2(0.05)),
            ..StepOptions::default()
        };
        replicated_against_single_process::<f32>(comm, options);
    }
}

/// A NaN on one rank only: every rank's checked step skips, and nothing changes anywhere.
#[test]
fn a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank() {
    if let Some(comm) = launch_or_join(
        "a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank",
        3,
    ) {
        let rank = comm.rank();
        let mut arena = model::<f32>();
        let mut opt = AdamW::<f32>::new(&arena, groups(), AdamWConfig::default()).unwrap();
        let mut dp = DataParallel::new(comm, &arena, &opt).unwrap();
        let options = StepOptions {
            skip_non_finite: true,
            ..StepOptions::default()
        };
        set_grads(&mut arena, rank, 0);
        dp.step_with_options(&mut opt, &mut arena, options).unwrap();
        let before = bits(arena.params());
        set_grads(&mut arena, rank, 1);
        if rank == 2 {
            arena.grad_by_name_mut("fc2.bias").unwrap()[3] = f32::NAN;
        }
        let report = dp.step_with_options(&mut opt, &mut arena, options).unwrap();
        assert_eq!(report.outcome, StepOutcome::SkippedNonFinite, "rank {rank}");
        assert_eq!(bits(arena.params()), before, "rank {rank}");
        // The next finite step applies everywhere.
        set_grads(&mut arena, rank, 2);
        let report = dp.step_with_options(&mut opt, &mut arena, options).unwrap();
        assert_eq!(report.outcome, StepOutcome::Applied, "rank {rank}");
    }
}

/// Ranks that built different layouts get the same clear error, and none hangs.
#[test]
fn a_layout_mismatch_is_an_error_on_every_rank() {
    if let Some(comm) = launch_or_join("a_layout_mismatch_is_an_error_on_every_rank", 3) {
        let rank = comm.rank();
        let mut b = ArenaBuilder::<f32>::new();
        b.zeros("fc1.weight", &[4, 4]).unwrap();
        // Rank 1 names its bias differently.
        b.zeros(if rank == 1 { "fc1.b" } else { "fc1.bias" }, &[4])
            .unwrap();
        let arena = b.build();
        let opt = AdamW::<f32>::new(&arena, [ParamGroup::all()], AdamWConfig::default()).unwrap();
        let err = DataParallel::new(comm, &arena, &opt)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("differs between ranks") && err.contains("[1]"),
            "rank {rank}: {err}"
        );
    }
}

/// A parameter that only some ranks gave a gradient gets the average with zeros for the
/// others; one that no rank gave a gradient keeps none and is not updated.
#[test]
fn gradient_presence_is_agreed_across_ranks() {
    if let Some(comm) = launch_or_join("gradient_presence_is_agreed_across_ranks", 2) {
        let rank = comm.rank();
        let mut arena = model::<f32>();
        let mut opt = AdamW::<f32>::new(&arena, groups(), AdamWConfig::default()).unwrap();
        let mut dp = DataParallel::new(comm, &arena, &opt).unwrap();
        set_grads(&mut arena, rank, 0);
        let fc2b = arena.find("fc2.bias").unwrap();
        let fc1b = arena.find("fc1.bias").unwrap();
        arena.clear_grad(fc2b);
        if rank == 1 {
            arena.clear_grad(fc1b);
        }
        let before_fc2b = arena.value(fc2b).to_vec();
        dp.average_gradients(&mut arena).unwrap();
        assert!(!arena.has_grad(fc2b));
        let expected: Vec<f32> = grad::<f32>(0, 0, "fc1.bias", 33)
            .iter()
            .map(|g| (g + 0.0) / 2.0)
            .collect();
        assert_eq!(arena.grad(fc1b).unwrap(), &expected[..], "rank {rank}");
        opt.step(&mut arena).unwrap();
        assert_eq!(arena.value(fc2b), &before_fc2b[..]);
    }
}

/// MPI's own reduce-scatter: the same average up to the order of the sum (bitwise here with
/// two ranks, where a sum of two terms has one order).
#[test]
fn mpi_reduction_on_two_ranks_matches_the_rank_ordered_one() {
    if let Some(comm) = launch_or_join("mpi_reduction_on_two_ranks_matches_the_rank_ordered_one", 2)
    {
        let rank = comm.rank();
        let mut arena = model::<f32>();
        let opt = AdamW::<f32>::new(&arena, groups(), AdamWConfig::default()).unwrap();
        let mut dp = DataParallel::new(comm, &arena, &opt)
            .unwrap()
            .with_reduction(Reduction::Mpi);
        set_grads(&mut arena, rank, 0);
        dp.average_gradients(&mut arena).unwrap();
        let mut reference = model::<f32>();
        set_average_grads(&mut reference, 2, 0);
        assert_eq!(bits(arena.grads()), bits(reference.grads()), "rank {rank}");
    }
}
