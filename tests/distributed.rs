//! Data-parallel steps over real MPI ranks: each test launches `mpirun` with 1, 2 or 3 ranks
//! of this same test binary, which then runs the test's rank side. Run with
//! `cargo test --release --features mpi --test distributed` (needs Open MPI:
//! `apt-get install openmpi-bin libopenmpi-dev libclang-dev`).
#![cfg(feature = "mpi")]

use std::process::Command;

use optarena::distributed::{
    load_sharded, CommElem, Communicator, DataParallel, MpiComm, Reduction, ShardedOptimizer,
};
use optarena::optim::{AdafactorAlgorithm, AdamWAlgorithm};
use optarena::schedule::{StepLR, StepLRConfig};
use optarena::{
    Adafactor, AdafactorConfig, AdamW, AdamWConfig, Arena, ArenaBuilder, ClipNorm, Float,
    GradScaler, LrScheduler, ParamGroup, StepOptions, StepOutcome,
};

/// The environment variable that tells a launched process which test's rank side to run.
const CHILD: &str = "OPTARENA_MPI_TEST";

/// In the test process: launches `mpirun -np ranks` of this binary running only `name`, and
/// fails with every rank's output unless all succeed. In a launched rank: returns its
/// communicator, and the caller runs the rank side.
fn launch_or_join(name: &str, ranks: usize) -> Option<MpiComm> {
    launch_or_join_with(name, ranks, &[])
}

/// [`launch_or_join`] with extra environment variables for the ranks.
fn launch_or_join_with(name: &str, ranks: usize, env: &[(&str, String)]) -> Option<MpiComm> {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        return Some(MpiComm::init().expect("MPI initialises in a launched rank"));
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .envs(env.iter().map(|(k, v)| (k, v)))
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
fn replicated_against_single_process<T: Float + CommElem>(comm: MpiComm, options: StepOptions) {
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

/// Runs the same AdamW steps (two groups, StepLR, an lr set by hand) replicated and ZeRO-1
/// sharded on every rank, and in one process on the averaged gradients. Replicated and
/// sharded must agree bit for bit; with `exact_single`, both must also equal the single
/// process bit for bit, else to within `1e-6` relative (a clip's norm is summed in another
/// order there).
fn sharded_against_replicated<T: Float + CommElem>(
    comm: MpiComm,
    options: StepOptions,
    exact_single: bool,
) {
    let n = comm.size();
    let rank = comm.rank();
    let mut dp_arena = model::<T>();
    let mut dp_opt = AdamW::<T>::new(&dp_arena, groups(), AdamWConfig::default()).unwrap();
    let mut dp_sched = StepLR::new(&mut dp_opt, StepLRConfig::new(2)).unwrap();
    let mut dp = DataParallel::new(&comm, &dp_arena, &dp_opt).unwrap();

    let mut z_arena = model::<T>();
    let mut zero = ShardedOptimizer::<_, T, AdamWAlgorithm>::new(
        &comm,
        &z_arena,
        groups(),
        AdamWConfig::default(),
    )
    .unwrap();
    let mut z_sched = StepLR::new(&mut zero, StepLRConfig::new(2)).unwrap();

    let mut ref_arena = model::<T>();
    let mut ref_opt = AdamW::<T>::new(&ref_arena, groups(), AdamWConfig::default()).unwrap();
    let mut ref_sched = StepLR::new(&mut ref_opt, StepLRConfig::new(2)).unwrap();
    for step in 0..6 {
        if step == 3 {
            dp_opt.set_lr(1, 5e-3).unwrap();
            zero.set_lr(1, 5e-3).unwrap();
            ref_opt.set_lr(1, 5e-3).unwrap();
        }
        set_grads(&mut dp_arena, rank, step);
        let dp_report = dp
            .step_with_options(&mut dp_opt, &mut dp_arena, options)
            .unwrap();
        dp_sched.step(&mut dp_opt).unwrap();
        set_grads(&mut z_arena, rank, step);
        let z_report = zero.step_with_options(&mut z_arena, options).unwrap();
        z_sched.step(&mut zero).unwrap();
        set_average_grads(&mut ref_arena, n, step);
        let ref_report = ref_opt.step_with_options(&mut ref_arena, options).unwrap();
        ref_sched.step(&mut ref_opt).unwrap();

        assert_eq!(dp_report, z_report, "rank {rank} step {step}");
        assert_eq!(
            bits(dp_arena.params()),
            bits(z_arena.params()),
            "replicated vs ZeRO-1: rank {rank} of {n}, step {step}"
        );
        if exact_single {
            assert_eq!(dp_report, ref_report, "rank {rank} step {step}");
            assert_eq!(bits(dp_arena.params()), bits(ref_arena.params()));
        } else {
            let (a, b) = (
                dp_report.total_norm.unwrap(),
                ref_report.total_norm.unwrap(),
            );
            assert!((a - b).abs() <= 1e-12 * b.abs(), "norms {a} {b}");
            for (x, y) in dp_arena.params().iter().zip(ref_arena.params()) {
                let (x, y) = (x.to_f64(), y.to_f64());
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{x} vs {y}");
            }
        }
    }
    // Each rank holds the state of its shard only: AdamW's two moments.
    let shard = zero.plan().shard(rank);
    assert_eq!(
        zero.state_bytes(),
        2 * shard.len() * std::mem::size_of::<T>()
    );
}

#[test]
fn sharded_matches_replicated_and_single_process_on_1_2_3_ranks() {
    for ranks in 1..=3 {
        if let Some(comm) = launch_or_join(
            "sharded_matches_replicated_and_single_process_on_1_2_3_ranks",
            ranks,
        ) {
            sharded_against_replicated::<f32>(comm, StepOptions::default(), true);
            return;
        }
    }
}

#[test]
fn sharded_f64_matches_replicated() {
    if let Some(comm) = launch_or_join("sharded_f64_matches_replicated", 2) {
        sharded_against_replicated::<f64>(comm, StepOptions::default(), true);
    }
}

/// Clipping by the global norm: each rank's partial norm of its shard, one all-gather of
/// the parts; replicated and sharded agree bit for bit, and with the single process to
/// rounding.
#[test]
fn global_norm_clip_agrees_across_ranks_and_modes() {
    for ranks in 1..=3 {
        if let Some(comm) = launch_or_join("global_norm_clip_agrees_across_ranks_and_modes", ranks)
        {
            let options = StepOptions {
                clip: Some(ClipNorm::l2(0.05)),
                skip_non_finite: true,
                ..StepOptions::default()
            };
            sharded_against_replicated::<f32>(comm, options, false);
            return;
        }
    }
}

/// Adafactor needs whole parameters: its shards end at parameter boundaries, and it agrees
/// with the replicated run bit for bit.
#[test]
fn per_parameter_algorithms_shard_at_parameter_boundaries() {
    if let Some(comm) = launch_or_join("per_parameter_algorithms_shard_at_parameter_boundaries", 3)
    {
        let rank = comm.rank();
        let mut dp_arena = model::<f32>();
        let mut dp_opt =
            Adafactor::<f32>::new(&dp_arena, [ParamGroup::all()], AdafactorConfig::default())
                .unwrap();
        let mut dp = DataParallel::new(&comm, &dp_arena, &dp_opt).unwrap();
        let mut z_arena = model::<f32>();
        let mut zero = ShardedOptimizer::<_, f32, AdafactorAlgorithm>::new(
            &comm,
            &z_arena,
            [ParamGroup::all()],
            AdafactorConfig::default(),
        )
        .unwrap();
        for r in 0..comm.size() {
            let b = zero.plan().shard(r).start;
            assert!(z_arena.infos().iter().any(|p| p.offset == b) || b == z_arena.len());
        }
        for step in 0..4 {
            set_grads(&mut dp_arena, rank, step);
            dp.step(&mut dp_opt, &mut dp_arena).unwrap();
            set_grads(&mut z_arena, rank, step);
            zero.step(&mut z_arena).unwrap();
            assert_eq!(
                bits(dp_arena.params()),
                bits(z_arena.params()),
                "rank {rank}"
            );
        }
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

        // The same with sharded state.
        let comm = dp.comm();
        let mut arena = model::<f32>();
        let mut zero = ShardedOptimizer::<_, f32, AdamWAlgorithm>::new(
            comm,
            &arena,
            groups(),
            AdamWConfig::default(),
        )
        .unwrap();
        set_grads(&mut arena, rank, 0);
        zero.step_with_options(&mut arena, options).unwrap();
        let before = bits(arena.params());
        let state = zero.shard_optimizer().state_dict();
        set_grads(&mut arena, rank, 1);
        if rank == 0 {
            arena.grad_by_name_mut("fc1.weight").unwrap()[0] = f32::INFINITY;
        }
        assert_eq!(
            zero.step_checked(&mut arena).unwrap(),
            StepOutcome::SkippedNonFinite,
            "rank {rank}"
        );
        assert_eq!(bits(arena.params()), before, "rank {rank}");
        assert_eq!(zero.shard_optimizer().state_dict(), state, "rank {rank}");

        // The GradScaler's found_inf: the same on every rank, for both modes, so every rank's
        // scale backs off alike.
        let mut scaler = GradScaler::default();
        set_grads(&mut arena, rank, 3);
        if rank == 1 {
            arena.grad_by_name_mut("fc1.bias").unwrap()[0] = f32::NAN;
        }
        assert_eq!(
            scaler.step(&mut zero, &mut arena).unwrap(),
            StepOutcome::SkippedNonFinite
        );
        scaler.update();
        assert_eq!(scaler.scale(), 32768.0, "rank {rank}");
        set_grads(&mut arena, rank, 4);
        assert_eq!(
            scaler.step(&mut zero, &mut arena).unwrap(),
            StepOutcome::Applied
        );

        let mut dp_arena = model::<f32>();
        let mut dp_opt = AdamW::<f32>::new(&dp_arena, groups(), AdamWConfig::default()).unwrap();
        let mut dp = DataParallel::new(comm, &dp_arena, &dp_opt).unwrap();
        set_grads(&mut dp_arena, rank, 3);
        if rank == 2 {
            dp_arena.grad_by_name_mut("fc1.bias").unwrap()[0] = f32::INFINITY;
        }
        let mut scaler = GradScaler::default();
        let outcome = scaler
            .step(&mut dp.over(&mut dp_opt), &mut dp_arena)
            .unwrap();
        assert_eq!(outcome, StepOutcome::SkippedNonFinite, "rank {rank}");
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
        let err = DataParallel::new(&comm, &arena, &opt)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("differs between ranks") && err.contains("[1]"),
            "rank {rank}: {err}"
        );
        // Same layout, but rank 2 gives its group another lr: the sharded optimizer refuses.
        let mut b = ArenaBuilder::<f32>::new();
        b.zeros("fc1.weight", &[4, 4]).unwrap();
        b.zeros("fc1.bias", &[4]).unwrap();
        let arena = b.build();
        let lr = if rank == 2 { 1e-2 } else { 1e-3 };
        let err = ShardedOptimizer::<_, f32, AdamWAlgorithm>::new(
            &comm,
            &arena,
            [ParamGroup::all().with("lr", lr)],
            AdamWConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("differs between ranks") && err.contains("[2]"),
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

/// The sharded run of the checkpoint tests: AdamW over two groups.
fn sharded<'c>(
    comm: &'c MpiComm,
    arena: &Arena<f32>,
) -> ShardedOptimizer<&'c MpiComm, f32, AdamWAlgorithm> {
    ShardedOptimizer::new(comm, arena, groups(), AdamWConfig::default()).unwrap()
}

/// The single-process run fed the averages of `worlds[step]` ranks' gradients at each step.
fn reference(worlds: &[usize]) -> Arena<f32> {
    let mut arena = model::<f32>();
    let mut opt = AdamW::<f32>::new(&arena, groups(), AdamWConfig::default()).unwrap();
    for (step, &n) in worlds.iter().enumerate() {
        set_average_grads(&mut arena, n, step);
        opt.step(&mut arena).unwrap();
    }
    arena
}

fn env_usize(name: &str) -> usize {
    std::env::var(name).unwrap().parse().unwrap()
}

/// Saved at world size N after 3 steps, loaded at M (N, M in 1..=3), 3 more steps: bit for
/// bit the single-process run fed N-rank averages, then M-rank ones. At M the same directory
/// also loads into a plain single-process optimizer.
#[test]
fn sharded_checkpoints_reshard_between_1_2_3_ranks() {
    let name = "sharded_checkpoints_reshard_between_1_2_3_ranks";
    if std::env::var(CHILD).as_deref() == Ok(name) {
        let comm = launch_or_join(name, 0).unwrap();
        let (rank, m) = (comm.rank(), comm.size());
        let dir = std::path::PathBuf::from(std::env::var("OPTARENA_CKPT_DIR").unwrap());
        let saved_at = env_usize("OPTARENA_SAVED_AT");
        let mut arena = model::<f32>();
        let mut zero = sharded(&comm, &arena);
        if std::env::var("OPTARENA_PHASE").unwrap() == "save" {
            for step in 0..3 {
                set_grads(&mut arena, rank, step);
                zero.step(&mut arena).unwrap();
            }
            zero.save_sharded(&dir).unwrap();
            return;
        }
        zero.load_sharded(&dir, &mut arena).unwrap();
        assert_eq!(
            bits(arena.params()),
            bits(reference(&[saved_at; 3]).params())
        );
        for step in 3..6 {
            set_grads(&mut arena, rank, step);
            zero.step(&mut arena).unwrap();
        }
        let worlds = [saved_at, saved_at, saved_at, m, m, m];
        let expected = reference(&worlds);
        assert_eq!(
            bits(arena.params()),
            bits(expected.params()),
            "{saved_at} -> {m}, rank {rank}"
        );

        // Into a plain optimizer.
        let mut plain_arena = model::<f32>();
        let mut plain = AdamW::<f32>::new(&plain_arena, groups(), AdamWConfig::default()).unwrap();
        load_sharded(&dir, &mut plain, &mut plain_arena).unwrap();
        for step in 3..6 {
            set_average_grads(&mut plain_arena, m, step);
            plain.step(&mut plain_arena).unwrap();
        }
        assert_eq!(
            bits(plain_arena.params()),
            bits(expected.params()),
            "plain, rank {rank}"
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    for n in 1..=3 {
        let dir = root.path().join(format!("ckpt-{n}"));
        let env = |phase: &str| {
            vec![
                ("OPTARENA_CKPT_DIR", dir.display().to_string()),
                ("OPTARENA_PHASE", phase.to_string()),
                ("OPTARENA_SAVED_AT", n.to_string()),
            ]
        };
        launch_or_join_with(name, n, &env("save"));
        assert!(dir.join("manifest.json").exists());
        for m in 1..=3 {
            launch_or_join_with(name, m, &env("load"));
        }
    }
}

/// A single-process checkpoint (optimizer state and parameters in one file) loads into a
/// sharded run at 2 and 3 ranks and continues bit for bit.
#[test]
fn a_single_process_checkpoint_loads_into_a_sharded_run() {
    let name = "a_single_process_checkpoint_loads_into_a_sharded_run";
    if std::env::var(CHILD).as_deref() == Ok(name) {
        let comm = launch_or_join(name, 0).unwrap();
        let (rank, m) = (comm.rank(), comm.size());
        let path = std::env::var("OPTARENA_CKPT_DIR").unwrap();
        let mut arena = model::<f32>();
        let mut zero = sharded(&comm, &arena);
        zero.load_single(&path, &mut arena).unwrap();
        for step in 3..6 {
            set_grads(&mut arena, rank, step);
            zero.step(&mut arena).unwrap();
        }
        let expected = reference(&[1, 1, 1, m, m, m]);
        assert_eq!(
            bits(arena.params()),
            bits(expected.params()),
            "rank {rank} of {m}"
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("single.safetensors");
    let mut arena = model::<f32>();
    let mut opt = AdamW::<f32>::new(&arena, groups(), AdamWConfig::default()).unwrap();
    for step in 0..3 {
        set_average_grads(&mut arena, 1, step);
        opt.step(&mut arena).unwrap();
    }
    opt.save_checkpoint(&path, Some(&arena)).unwrap();
    for m in [2, 3] {
        launch_or_join_with(
            name,
            m,
            &[("OPTARENA_CKPT_DIR", path.display().to_string())],
        );
    }
}

/// A corrupt manifest, a missing shard file and another model: every rank gets an error and
/// nothing changes.
#[test]
fn a_bad_sharded_checkpoint_is_an_error_on_every_rank() {
    let name = "a_bad_sharded_checkpoint_is_an_error_on_every_rank";
    if std::env::var(CHILD).as_deref() == Ok(name) {
        let comm = launch_or_join(name, 0).unwrap();
        let rank = comm.rank();
        let root = std::path::PathBuf::from(std::env::var("OPTARENA_CKPT_DIR").unwrap());
        let mut arena = model::<f32>();
        let mut zero = sharded(&comm, &arena);
        set_grads(&mut arena, rank, 0);
        zero.step(&mut arena).unwrap();
        let good = root.join("good");
        zero.save_sharded(&good).unwrap();
        // Saving again replaces it atomically.
        zero.save_sharded(&good).unwrap();
        assert!(!root.join("good.tmp").exists() && !root.join("good.old").exists());
        let before = bits(arena.params());
        let state = zero.shard_optimizer().state_dict();
        comm.barrier().unwrap();

        // A flipped byte in the manifest.
        let bad = root.join("bad-manifest");
        if rank == 0 {
            copy_dir(&good, &bad);
            let path = bad.join("manifest.json");
            let mut text = std::fs::read_to_string(&path).unwrap();
            text = text.replacen("\"float32\"", "\"float33\"", 1);
            std::fs::write(&path, text).unwrap();
        }
        comm.barrier().unwrap();
        let err = zero.load_sharded(&bad, &mut arena).unwrap_err().to_string();
        assert!(
            err.contains("checksum")
                || err.contains("rank(s) [0]")
                || err.contains("rank(s) [0, 1]"),
            "rank {rank}: {err}"
        );

        // Rank 1's file missing: only rank 1 (and whoever reads it) fails, all report.
        let missing = root.join("missing");
        if rank == 0 {
            copy_dir(&good, &missing);
            std::fs::remove_file(missing.join("shard-00001.safetensors")).unwrap();
        }
        comm.barrier().unwrap();
        let err = zero
            .load_sharded(&missing, &mut arena)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shard-00001") || err.contains("failed on rank(s) [1]"),
            "rank {rank}: {err}"
        );

        // Another model's checkpoint.
        let mut b = ArenaBuilder::<f32>::new();
        b.zeros("fc1.weight", &[33, 17]).unwrap();
        let mut other_arena = b.build();
        let other = ShardedOptimizer::<_, f32, AdamWAlgorithm>::new(
            &comm,
            &other_arena,
            [ParamGroup::all()],
            AdamWConfig::default(),
        )
        .unwrap();
        let other_dir = root.join("other");
        other.save_sharded(&other_dir).unwrap();
        let err = zero
            .load_sharded(&other_dir, &mut arena)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layout") || err.contains("failed on rank"),
            "rank {rank}: {err}"
        );
        let _ = &mut other_arena;

        assert_eq!(bits(arena.params()), before, "rank {rank}");
        assert_eq!(zero.shard_optimizer().state_dict(), state, "rank {rank}");
        // The good one still loads.
        zero.load_sharded(&good, &mut arena).unwrap();
        return;
    }
    let root = tempfile::tempdir().unwrap();
    launch_or_join_with(
        name,
        2,
        &[("OPTARENA_CKPT_DIR", root.path().display().to_string())],
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
