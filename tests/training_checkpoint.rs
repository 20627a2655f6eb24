//! One-call training checkpoints (`checkpoint::TrainingCheckpoint` / `TrainingRestore`): a
//! resumed run continues bit for bit like an unbroken one, in another registration order;
//! every kind of mismatch is an error that names it and leaves every object as it was; a save
//! that fails half-way leaves the previous file.

mod common;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use common::{build_arena, write_grads};
use optarena::checkpoint::training::inspect_training;
use optarena::checkpoint::{SaveTarget, StdFs, TrainingCheckpoint, TrainingRestore};
use optarena::optim::*;
use optarena::schedule::*;
use optarena::{Arena, ClipNorm, GradScaler, LrScheduler, Param, ParamGroup};
use serde_json::{json, Value};

fn scratch(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "optarena-train-ckpt-{}-{n}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![6, 4],
        vec![4],
        vec![5, 6],
        vec![5],
        vec![3, 5],
        vec![3],
    ]
}

/// A whole training run: AdamW over p0..p3 (two groups), SGD-momentum over p4, p5, a
/// warmup-then-cosine schedule on AdamW, StepLR on SGD, a loss scaler.
struct Run {
    arena: Arena<f32>,
    h: Vec<Param<f32>>,
    adamw: AdamW<f32>,
    sgd: SGD<f32>,
    warm_cos: SequentialLR,
    step_lr: StepLR,
    scaler: GradScaler,
}

impl Run {
    /// `reverse`: register each pair of parameters in the other order (a rebuilt model whose
    /// registration order changed; every group stays contiguous).
    fn new(reverse: bool) -> Run {
        let (arena, h) = build_arena::<f32>(&shapes(), 7, if reverse { &[2, 2, 2] } else { &[] });
        let mut adamw = AdamW::new(
            &arena,
            [
                ParamGroup::new([h[0], h[1]]),
                ParamGroup::new([h[2], h[3]]).with("weight_decay", 0.0),
            ],
            AdamWConfig::default().with_lr(0.01),
        )
        .unwrap();
        let mut sgd = SGD::new(
            &arena,
            [ParamGroup::new([h[4], h[5]])],
            SGDConfig::default().with_lr(0.05).with_momentum(0.9),
        )
        .unwrap();
        let warm = LinearLR::new(
            &mut adamw,
            LinearLRConfig::new()
                .with_start_factor(0.1)
                .with_total_iters(3),
        )
        .unwrap();
        let cos = CosineAnnealingLR::new(&mut adamw, CosineAnnealingLRConfig::new(20)).unwrap();
        let warm_cos = SequentialLR::new(
            &mut adamw,
            vec![Box::new(warm), Box::new(cos)],
            SequentialLRConfig::new(vec![3]),
        )
        .unwrap();
        let step_lr = StepLR::new(&mut sgd, StepLRConfig::new(4).with_gamma(0.5)).unwrap();
        let scaler = GradScaler::new(1024.0, 2.0, 0.5, 3).unwrap();
        Run {
            arena,
            h,
            adamw,
            sgd,
            warm_cos,
            step_lr,
            scaler,
        }
    }

    fn step(&mut self, t: u64) {
        write_grads(&mut self.arena, t, &[]);
        // The backward pass of a scaled loss: gradients times the scale (an inf at step 6).
        let s = self.scaler.scale() as f32;
        self.arena.grads_mut().iter_mut().for_each(|g| *g *= s);
        if t == 6 {
            self.arena.grad_mut(self.h[1])[0] = f32::INFINITY;
        }
        self.scaler
            .step_clipped(&mut self.adamw, &mut self.arena, ClipNorm::new(5.0))
            .unwrap();
        self.scaler.update();
        // SGD on the unscaled gradients of its own parameters.
        for &p in &self.h[4..] {
            let g: Vec<f32> = self.arena.grad(p).unwrap().iter().map(|g| g / s).collect();
            self.arena.set_grad(p, &g).unwrap();
        }
        self.sgd.step(&mut self.arena).unwrap();
        self.warm_cos.step(&mut self.adamw).unwrap();
        self.step_lr.step(&mut self.sgd).unwrap();
    }

    fn save(&self, path: &Path, step: u64) -> u64 {
        self.checkpoint(step).save(path).unwrap()
    }

    fn checkpoint(&self, step: u64) -> TrainingCheckpoint<'_, f32> {
        TrainingCheckpoint::new(&self.arena)
            .optimizer("adamw", &self.adamw)
            .optimizer("sgd", &self.sgd)
            .scheduler("warmup_cosine", &self.warm_cos)
            .scheduler("step", &self.step_lr)
            .scaler(&self.scaler)
            .step(step)
            .metadata("loader", json!({"epoch": 1, "batch": step}))
            .metadata("rng", json!([1u64, 2, 3]))
    }

    fn restore(&mut self) -> TrainingRestore<'_, f32> {
        TrainingRestore::new(&mut self.arena)
            .optimizer("adamw", &mut self.adamw)
            .optimizer("sgd", &mut self.sgd)
            .scheduler("warmup_cosine", &mut self.warm_cos)
            .scheduler("step", &mut self.step_lr)
            .scaler(&mut self.scaler)
    }

    /// Everything, comparable: parameters by name (bits), optimizer and scheduler states,
    /// the groups' lr and initial_lr, the scaler.
    fn snapshot(&self) -> Value {
        use optarena::GroupHyperparams;
        let mut params: Vec<(String, Vec<u32>)> = self
            .arena
            .infos()
            .iter()
            .map(|i| {
                let v = self.arena.value_by_name(&i.name).unwrap();
                (i.name.clone(), v.iter().map(|x| x.to_bits()).collect())
            })
            .collect();
        params.sort();
        let groups = |o: &dyn GroupHyperparams| -> Vec<(u64, Option<u64>)> {
            (0..o.num_groups())
                .map(|g| {
                    (
                        o.lr(g).unwrap().to_bits(),
                        o.group_initial_lr(g).unwrap().map(f64::to_bits),
                    )
                })
                .collect()
        };
        json!({
            "params": params,
            "adamw": self.adamw.state_dict(),
            "sgd": self.sgd.state_dict(),
            "warm_cos": self.warm_cos.state_dict().unwrap(),
            "step_lr": self.step_lr.state_dict().unwrap(),
            "groups": [groups(&self.adamw), groups(&self.sgd)],
            "scaler": serde_json::to_value(&self.scaler).unwrap(),
        })
    }
}

#[test]
fn resume_is_bitwise_an_unbroken_run_in_another_registration_order() {
    let dir = scratch("resume");
    let path = dir.join("run.safetensors");
    let mut unbroken = Run::new(false);
    for t in 1..=12 {
        unbroken.step(t);
    }

    let mut first = Run::new(false);
    for t in 1..=5 {
        first.step(t);
    }
    let bytes = first.save(&path, 5);
    assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
    let info = inspect_training(&path).unwrap();
    assert_eq!(info.meta.optimizers.len(), 2);
    assert_eq!(info.meta.schedulers[0].scheduler, "SequentialLR");
    assert!(info.tensors.iter().any(|t| t.name == "param.p3"));
    assert!(info
        .tensors
        .iter()
        .any(|t| t.name == "optim.adamw.state.0.exp_avg"));

    // Rebuilt in another registration order, fresh optimizers and schedulers, one call.
    let mut resumed = Run::new(true);
    assert_ne!(resumed.snapshot(), first.snapshot());
    let loaded = resumed.restore().load(&path).unwrap();
    assert_eq!(loaded.step, 5);
    assert_eq!(loaded.metadata["loader"], json!({"epoch": 1, "batch": 5}));
    assert_eq!(loaded.metadata["rng"], json!([1, 2, 3]));
    assert_eq!(loaded.bytes, bytes);
    // The restored state is the saved one (parameters by name, in the other order).
    let (a, b) = (resumed.snapshot(), first.snapshot());
    assert_eq!(a["params"], b["params"]);
    assert_eq!(a["warm_cos"], b["warm_cos"]);
    assert_eq!(a["scaler"], b["scaler"]);
    assert_eq!(a["groups"], b["groups"]);
    for t in 6..=12 {
        resumed.step(t);
    }
    let (a, b) = (resumed.snapshot(), unbroken.snapshot());
    assert_eq!(a["params"], b["params"], "parameters, bit for bit");
    assert_eq!(a["warm_cos"], b["warm_cos"]);
    assert_eq!(a["step_lr"], b["step_lr"]);
    assert_eq!(a["groups"], b["groups"]);
    assert_eq!(a["scaler"], b["scaler"]);
    // The optimizer states agree buffer by buffer, by name (numbering follows registration).
    for (x, y) in [("adamw", "adamw"), ("sgd", "sgd")] {
        let by_name = |v: &Value| -> Vec<(String, Value)> {
            let sd = &v[x];
            let mut names = std::collections::BTreeMap::new();
            for g in sd["param_groups"].as_array().unwrap() {
                for p in g["params"].as_array().unwrap() {
                    names.insert(
                        p["index"].to_string(),
                        p["name"].as_str().unwrap().to_string(),
                    );
                }
            }
            let mut out: Vec<(String, Value)> = sd["state"]
                .as_array()
                .unwrap()
                .iter()
                .map(|st| {
                    let mut st = st.clone();
                    let k = st["index"].to_string();
                    st.as_object_mut().unwrap().remove("index");
                    (names[&k].clone(), st)
                })
                .collect();
            out.sort_by(|p, q| p.0.cmp(&q.0));
            out
        };
        assert_eq!(by_name(&a), by_name(&b), "{y} state");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `load`, expects an error containing `want`, and checks that nothing changed.
fn fails_cleanly(run: &mut Run, want: &str, load: impl FnOnce(&mut Run) -> optarena::Result<()>) {
    let before = run.snapshot();
    let e = load(run).expect_err(want);
    assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
    assert_eq!(
        run.snapshot(),
        before,
        "a failed load ({want}) changed something"
    );
}

#[test]
fn every_mismatch_is_an_error_and_changes_nothing() {
    let dir = scratch("mismatch");
    let path = dir.join("run.safetensors");
    let mut saved = Run::new(false);
    for t in 1..=4 {
        saved.step(t);
    }
    saved.save(&path, 4);
    let mut run = Run::new(false);
    run.step(1);

    // An optimizer name the file does not have.
    fails_cleanly(&mut run, "no optimizer named `adam`", |r| {
        TrainingRestore::new(&mut r.arena)
            .optimizer("adamw", &mut r.adamw)
            .optimizer("adam", &mut r.sgd)
            .scheduler("warmup_cosine", &mut r.warm_cos)
            .scheduler("step", &mut r.step_lr)
            .scaler(&mut r.scaler)
            .load(&path)
            .map(drop)
    });
    // The wrong kind under a saved name.
    fails_cleanly(
        &mut run,
        "optimizer `sgd` was saved from SGD, this is AdamW",
        |r| {
            TrainingRestore::new(&mut r.arena)
                .optimizer("sgd", &mut r.adamw)
                .optimizer("adamw", &mut r.sgd)
                .scheduler("warmup_cosine", &mut r.warm_cos)
                .scheduler("step", &mut r.step_lr)
                .scaler(&mut r.scaler)
                .load(&path)
                .map(drop)
        },
    );
    // A saved optimizer left out.
    fails_cleanly(
        &mut run,
        "holds optimizer `sgd` (SGD), which was not given",
        |r| {
            TrainingRestore::new(&mut r.arena)
                .optimizer("adamw", &mut r.adamw)
                .scheduler("warmup_cosine", &mut r.warm_cos)
                .scheduler("step", &mut r.step_lr)
                .scaler(&mut r.scaler)
                .load(&path)
                .map(drop)
        },
    );
    // Schedulers: a kind mismatch, a missing name, one left out.
    fails_cleanly(
        &mut run,
        "scheduler `step` was saved from StepLR, this is SequentialLR",
        |r| {
            TrainingRestore::new(&mut r.arena)
                .optimizer("adamw", &mut r.adamw)
                .optimizer("sgd", &mut r.sgd)
                .scheduler("step", &mut r.warm_cos)
                .scheduler("warmup_cosine", &mut r.step_lr)
                .scaler(&mut r.scaler)
                .load(&path)
                .map(drop)
        },
    );
    fails_cleanly(&mut run, "holds scheduler `step` (StepLR)", |r| {
        TrainingRestore::new(&mut r.arena)
            .optimizer("adamw", &mut r.adamw)
            .optimizer("sgd", &mut r.sgd)
            .scheduler("warmup_cosine", &mut r.warm_cos)
            .scaler(&mut r.scaler)
            .load(&path)
            .map(drop)
    });
    // The scaler left out.
    fails_cleanly(&mut run, "holds a GradScaler but none was given", |r| {
        TrainingRestore::new(&mut r.arena)
            .optimizer("adamw", &mut r.adamw)
            .optimizer("sgd", &mut r.sgd)
            .scheduler("warmup_cosine", &mut r.warm_cos)
            .scheduler("step", &mut r.step_lr)
            .load(&path)
            .map(drop)
    });
    // An optimizer built on another arena.
    let mut other = Run::new(false);
    fails_cleanly(&mut run, "was built for another arena", |r| {
        TrainingRestore::new(&mut r.arena)
            .optimizer("adamw", &mut other.adamw)
            .optimizer("sgd", &mut r.sgd)
            .scheduler("warmup_cosine", &mut r.warm_cos)
            .scheduler("step", &mut r.step_lr)
            .scaler(&mut r.scaler)
            .load(&path)
            .map(drop)
    });

    // The wrong model: a parameter renamed, or of another shape.
    for (shapes_changed, want) in [
        (None, "which the arena does not have"),
        (
            Some(vec![3, 4]),
            "has shape [3, 5] in the checkpoint and [3, 4] in the arena",
        ),
    ] {
        let mut b = optarena::ArenaBuilder::<f32>::new();
        let s = shapes();
        for (i, shape) in s.iter().enumerate() {
            let name = match (i, &shapes_changed) {
                (4, None) => "renamed".to_string(),
                _ => format!("p{i}"),
            };
            let shape = match (i, &shapes_changed) {
                (4, Some(x)) => x.clone(),
                _ => shape.clone(),
            };
            b.zeros(&name, &shape).unwrap();
        }
        let mut arena = b.build();
        let before: Vec<f32> = arena.params().to_vec();
        let e = TrainingRestore::new(&mut arena)
            .load(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
        assert_eq!(arena.params(), &before[..]);
    }

    // A flipped byte anywhere (header, checksums, data) and a truncated file.
    let good = std::fs::read(&path).unwrap();
    let bad_path = dir.join("bad.safetensors");
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let data = 8 + header_len + 8;
    let mut positions = vec![
        3,
        9,
        8 + header_len / 2,
        8 + header_len + 2,
        8 + header_len + 6,
    ];
    positions.extend((data..good.len()).step_by((good.len() - data) / 23 + 1));
    positions.push(good.len() - 1);
    for at in positions {
        let mut bytes = good.clone();
        bytes[at] ^= 0x20;
        std::fs::write(&bad_path, &bytes).unwrap();
        let before = run.snapshot();
        let e = run.restore().load(&bad_path).unwrap_err();
        assert!(
            matches!(
                e,
                optarena::Error::Checkpoint(_) | optarena::Error::StateDict(_)
            ),
            "byte {at}: {e}"
        );
        assert_eq!(run.snapshot(), before, "byte {at}");
    }
    for len in [0, 7, 8, 100, data, data + 5, good.len() / 2, good.len() - 1] {
        std::fs::write(&bad_path, &good[..len]).unwrap();
        let before = run.snapshot();
        let e = run.restore().load(&bad_path).unwrap_err().to_string();
        assert!(
            e.contains("truncated") || e.contains("too short") || e.contains("does not parse"),
            "{len} bytes: {e}"
        );
        assert_eq!(run.snapshot(), before);
    }
    // An optimizer checkpoint is not a training checkpoint, and the reverse.
    saved
        .adamw
        .save_checkpoint(&bad_path, Some(&saved.arena))
        .unwrap();
    fails_cleanly(
        &mut run,
        "this is an optimizer checkpoint, not a training checkpoint",
        |r| r.restore().load(&bad_path).map(drop),
    );
    let e = run
        .adamw
        .load_checkpoint(&path, None, optarena::MatchBy::Name)
        .unwrap_err();
    assert!(
        e.to_string().contains("this is a training checkpoint"),
        "{e}"
    );
    // After all that, the good file still loads.
    run.restore().load(&path).unwrap();
    assert_eq!(run.snapshot()["params"], saved.snapshot()["params"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_scheduler_that_fails_to_load_puts_the_earlier_ones_back() {
    let dir = scratch("sched-rollback");
    let path = dir.join("run.safetensors");
    let build = |custom: bool| {
        let mut r = Run::new(false);
        let config = CyclicLRConfig::new(0.01, 0.1).with_step_size_up(2.0);
        let cyc = if custom {
            CyclicLR::with_scale_fn(&mut r.sgd, config, |x: f64| 1.0 / x).unwrap()
        } else {
            CyclicLR::new(&mut r.sgd, config).unwrap()
        };
        (r, cyc)
    };
    let (mut a, mut cyc_a) = build(false);
    for t in 1..=3 {
        a.step(t);
        cyc_a.step(&mut a.sgd).unwrap();
    }
    TrainingCheckpoint::new(&a.arena)
        .optimizer("adamw", &a.adamw)
        .optimizer("sgd", &a.sgd)
        .scheduler("warmup_cosine", &a.warm_cos)
        .scheduler("step", &a.step_lr)
        .scheduler("cyclic", &cyc_a)
        .scaler(&a.scaler)
        .save(&path)
        .unwrap();
    let (mut b, mut cyc_b) = build(true);
    b.step(1);
    let before = (b.snapshot(), cyc_b.state_dict().unwrap());
    let e = TrainingRestore::new(&mut b.arena)
        .optimizer("adamw", &mut b.adamw)
        .optimizer("sgd", &mut b.sgd)
        .scheduler("warmup_cosine", &mut b.warm_cos)
        .scheduler("step", &mut b.step_lr)
        .scheduler("cyclic", &mut cyc_b)
        .scaler(&mut b.scaler)
        .load(&path)
        .unwrap_err();
    assert!(e.to_string().contains("scheduler `cyclic`"), "{e}");
    assert_eq!((b.snapshot(), cyc_b.state_dict().unwrap()), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The real file system, with a write that fails after `fail_after` bytes.
struct FailAfter(usize);

struct FailingFile {
    file: std::fs::File,
    left: usize,
}

impl Write for FailingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("injected write failure"));
        }
        let n = self.file.write(&buf[..buf.len().min(self.left)])?;
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl SaveTarget for FailAfter {
    type File = FailingFile;
    fn create_new(&self, path: &Path) -> io::Result<FailingFile> {
        Ok(FailingFile {
            file: StdFs.create_new(path)?,
            left: self.0,
        })
    }
    fn sync_file(&self, f: &mut FailingFile) -> io::Result<()> {
        StdFs.sync_file(&mut f.file)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }
}

#[test]
fn a_save_that_fails_half_way_leaves_the_old_file() {
    let dir = scratch("crash");
    let path = dir.join("run.safetensors");
    let mut run = Run::new(false);
    for t in 1..=3 {
        run.step(t);
    }
    let size = run.save(&path, 3) as usize;
    let old = run.snapshot();
    run.step(4);
    let mut failed = 0;
    for n in [0, 1, 8, 100, size / 3, size / 2, size - 8, size - 1] {
        let e = run
            .checkpoint(4)
            .save_with(&FailAfter(n), &path)
            .unwrap_err();
        assert!(e.to_string().contains("injected write failure"), "{e}");
        failed += 1;
        // The old file is there, whole, and nothing else.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["run.safetensors"]);
        let mut fresh = Run::new(true);
        assert_eq!(fresh.restore().load(&path).unwrap().step, 3);
        assert_eq!(fresh.snapshot()["params"], old["params"]);
        assert_eq!(fresh.snapshot()["groups"], old["groups"]);
    }
    assert_eq!(failed, 8);
    // Names must be unique; an optimizer on another arena cannot be saved with this one.
    let e = run
        .checkpoint(4)
        .optimizer("adamw", &run.adamw)
        .save(&path)
        .unwrap_err();
    assert!(
        e.to_string().contains("two optimizers named `adamw`"),
        "{e}"
    );
    let other = Run::new(false);
    let e = TrainingCheckpoint::new(&run.arena)
        .optimizer("adamw", &other.adamw)
        .save(&path)
        .unwrap_err();
    assert!(e.to_string().contains("built for another arena"), "{e}");
    assert_eq!(inspect_training(&path).unwrap().meta.step, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A least-squares loss over every parameter (by name, so any registration order gives the
/// same function); writes the gradients.
fn quadratic(arena: &mut Arena<f64>) -> f64 {
    arena.zero_grad(true);
    let mut loss = 0.0;
    for info in arena.infos().to_vec() {
        let p = arena.find(&info.name).unwrap();
        let w = arena.value(p).to_vec();
        let k = info.name[1..].parse::<f64>().unwrap() + 1.0;
        let g: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(j, x)| {
                let target = (j as f64 * 0.3).sin();
                loss += k * (x - target) * (x - target) + 0.1 * x.powi(4);
                2.0 * k * (x - target) + 0.4 * x.powi(3)
            })
            .collect();
        arena.set_grad(p, &g).unwrap();
    }
    loss
}

#[test]
fn lbfgs_resumes_bitwise_from_a_training_checkpoint() {
    let dir = scratch("lbfgs");
    let path = dir.join("run.safetensors");
    let build = |reverse: bool| {
        let (arena, _) = build_arena::<f64>(&shapes(), 3, if reverse { &[6] } else { &[] });
        let opt = LBFGS::new(
            &arena,
            [ParamGroup::all()],
            LBFGSConfig::default()
                .with_max_iter(4)
                .with_history_size(5)
                .with_line_search_fn(LineSearch::StrongWolfe),
        )
        .unwrap();
        (arena, opt)
    };
    let (mut a, mut oa) = build(false);
    for _ in 0..6 {
        oa.step(&mut a, quadratic).unwrap();
    }
    let (mut b, mut ob) = build(false);
    for _ in 0..3 {
        ob.step(&mut b, quadratic).unwrap();
    }
    TrainingCheckpoint::new(&b)
        .optimizer("lbfgs", &ob)
        .step(3)
        .save(&path)
        .unwrap();
    let info = inspect_training(&path).unwrap();
    assert!(info.meta.optimizers[0].state_dict.is_some());
    let by_name = |x: &Arena<f64>| -> Vec<(String, Vec<u64>)> {
        let mut v: Vec<_> = x
            .infos()
            .iter()
            .map(|i| {
                let vals = x.value_by_name(&i.name).unwrap();
                (i.name.clone(), vals.iter().map(|f| f.to_bits()).collect())
            })
            .collect();
        v.sort();
        v
    };
    // Rebuilt with the parameters registered in reverse order: the state is matched by name
    // (L-BFGS's dot products over the flat vector then sum in another order, so the run goes
    // on within rounding of the unbroken one, not bit for bit).
    let (mut d, mut od) = build(true);
    // The wrong kind under the saved name is refused before anything changes.
    let mut sgd = SGD::new(&d, [ParamGroup::all()], SGDConfig::default()).unwrap();
    let before = d.params().to_vec();
    let e = TrainingRestore::new(&mut d)
        .optimizer("lbfgs", &mut sgd)
        .load(&path)
        .unwrap_err();
    assert!(
        e.to_string().contains("saved from LBFGS, this is SGD"),
        "{e}"
    );
    assert_eq!(d.params(), &before[..]);
    TrainingRestore::new(&mut d)
        .optimizer("lbfgs", &mut od)
        .load(&path)
        .unwrap();
    assert_eq!(by_name(&d), by_name(&b));
    assert_eq!(
        (od.func_evals(), od.n_iter()),
        (ob.func_evals(), ob.n_iter())
    );
    for _ in 3..6 {
        od.step(&mut d, quadratic).unwrap();
    }
    for ((n1, x), (n2, y)) in by_name(&d).iter().zip(by_name(&a)) {
        assert_eq!(*n1, n2);
        for (x, y) in x.iter().zip(&y) {
            let (x, y) = (f64::from_bits(*x), f64::from_bits(*y));
            assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{n1}: {x} vs {y}");
        }
    }
    // Rebuilt in the same order: bit for bit.
    let (mut c, mut oc) = build(false);
    TrainingRestore::new(&mut c)
        .optimizer("lbfgs", &mut oc)
        .load(&path)
        .unwrap();
    for _ in 3..6 {
        oc.step(&mut c, quadratic).unwrap();
    }
    assert_eq!(by_name(&c), by_name(&a), "L-BFGS resumed bit for bit");
    assert_eq!(oc.func_evals(), oa.func_evals());
    assert_eq!(oc.n_iter(), oa.n_iter());
    std::fs::remove_dir_all(&dir).unwrap();
}
