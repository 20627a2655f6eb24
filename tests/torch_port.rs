//! The README's training loop, ported from torch (`scripts/gen_torch_port.py`, fixture
//! `tests/fixtures/torch_port.json`): an MLP with torch's decay / no-decay AdamW groups, a
//! warmup then cosine schedule (`SequentialLR` of `LinearLR` and `CosineAnnealingLR`),
//! `clip_grad_norm`, an lr halved by hand, a frozen layer unfrozen by `add_param_group`
//! mid-run, a one-call save, a rebuild in another registration order, a one-call load, and
//! the rest of the run. Every group's lr at every step is torch's; the resumed run ends bit for
//! bit where the unbroken one ends.
//!
//! The model is registered in torch's natural order (fc1.weight, fc1.bias, fc2.weight, ...), so
//! the decay and no-decay groups interleave in the arena; the resumed model is registered in
//! yet another order (fc2 first, and the skip layer between).

use std::path::PathBuf;

use optarena::checkpoint::{TrainingCheckpoint, TrainingRestore};
use optarena::clip::clip_grad_norm;
use optarena::schedule::{
    CosineAnnealingLR, CosineAnnealingLRConfig, LinearLR, LinearLRConfig, LrScheduler,
    SequentialLR, SequentialLRConfig,
};
use optarena::{
    AdamW, AdamWConfig, Arena, ArenaBuilder, ClipNorm, GroupHyperparams, Param, ParamGroup,
};
use serde_json::Value;

const N: usize = 16;
const SAVE_AT: usize = 11;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_port.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// fc1 (4 -> 8), ReLU, fc2 (8 -> 3), plus `skip` (4 -> 3, no bias), frozen at first.
struct Model {
    arena: Arena<f32>,
    fc1_w: Param<f32>,
    fc1_b: Param<f32>,
    fc2_w: Param<f32>,
    fc2_b: Param<f32>,
    skip: Param<f32>,
}

/// Deterministic initial values, by name (so any registration order gives the same model).
fn init(name: &str, len: usize) -> Vec<f32> {
    let salt = name.bytes().map(|b| b as f32).sum::<f32>();
    (0..len)
        .map(|i| (i as f32 * 0.37 + salt).sin() * 0.4)
        .collect()
}

impl Model {
    /// `reordered`: register fc2 before fc1, with the skip layer in the middle; otherwise
    /// torch's natural order, each layer's weight then its bias.
    fn new(reordered: bool) -> Model {
        let mut b = ArenaBuilder::<f32>::new();
        let mut reg = |name: &str, shape: &[usize]| {
            let len = shape.iter().product();
            b.param(name, shape, &init(name, len)).unwrap()
        };
        let (fc1_w, fc2_w, fc1_b, fc2_b, skip);
        if reordered {
            fc2_w = reg("fc2.weight", &[3, 8]);
            fc2_b = reg("fc2.bias", &[3]);
            skip = reg("skip.weight", &[3, 4]);
            fc1_b = reg("fc1.bias", &[8]);
            fc1_w = reg("fc1.weight", &[8, 4]);
        } else {
            fc1_w = reg("fc1.weight", &[8, 4]);
            fc1_b = reg("fc1.bias", &[8]);
            fc2_w = reg("fc2.weight", &[3, 8]);
            fc2_b = reg("fc2.bias", &[3]);
            skip = reg("skip.weight", &[3, 4]);
        }
        Model {
            arena: b.build(),
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
            skip,
        }
    }

    /// Zeroes the gradients (`set_to_none`), then forward and backward of the mean squared
    /// error on the fixed batch; the frozen `skip` gets no gradient.
    fn forward_backward(&mut self, skip_trainable: bool) -> f32 {
        let a = &mut self.arena;
        a.zero_grad(true);
        let (w1, b1, w2, b2, s) = (
            a.value(self.fc1_w).to_vec(),
            a.value(self.fc1_b).to_vec(),
            a.value(self.fc2_w).to_vec(),
            a.value(self.fc2_b).to_vec(),
            a.value(self.skip).to_vec(),
        );
        let (mut gw1, mut gb1, mut gw2, mut gb2, mut gs) = (
            vec![0.0; 32],
            vec![0.0; 8],
            vec![0.0; 24],
            vec![0.0; 3],
            vec![0.0; 12],
        );
        let mut loss = 0.0;
        for i in 0..N {
            let x: Vec<f32> = (0..4).map(|j| (0.3 * i as f32 + j as f32).sin()).collect();
            let y: Vec<f32> = (0..3).map(|j| (0.2 * i as f32 - j as f32).cos()).collect();
            let pre: Vec<f32> = (0..8)
                .map(|r| (0..4).map(|c| w1[r * 4 + c] * x[c]).sum::<f32>() + b1[r])
                .collect();
            let h: Vec<f32> = pre.iter().map(|&v| v.max(0.0)).collect();
            for k in 0..3 {
                let out = (0..8).map(|r| w2[k * 8 + r] * h[r]).sum::<f32>()
                    + b2[k]
                    + (0..4).map(|c| s[k * 4 + c] * x[c]).sum::<f32>();
                let d = out - y[k];
                loss += d * d / (N * 3) as f32;
                let dout = 2.0 * d / (N * 3) as f32;
                gb2[k] += dout;
                for r in 0..8 {
                    gw2[k * 8 + r] += dout * h[r];
                    if pre[r] > 0.0 {
                        let dpre = dout * w2[k * 8 + r];
                        gb1[r] += dpre;
                        for c in 0..4 {
                            gw1[r * 4 + c] += dpre * x[c];
                        }
                    }
                }
                for c in 0..4 {
                    gs[k * 4 + c] += dout * x[c];
                }
            }
        }
        a.set_grad(self.fc1_w, &gw1).unwrap();
        a.set_grad(self.fc1_b, &gb1).unwrap();
        a.set_grad(self.fc2_w, &gw2).unwrap();
        a.set_grad(self.fc2_b, &gb2).unwrap();
        if skip_trainable {
            a.set_grad(self.skip, &gs).unwrap();
        }
        loss
    }
}

/// The training objects of a run, built as the README builds them.
struct Run {
    m: Model,
    opt: AdamW<f32>,
    sched: SequentialLR,
}

impl Run {
    fn new(reordered: bool) -> Run {
        let m = Model::new(reordered);
        // torch: AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        //              lr=3e-3, weight_decay=0.05)
        let mut opt = AdamW::new(
            &m.arena,
            [
                ParamGroup::new([m.fc1_w, m.fc2_w]),
                ParamGroup::new([m.fc1_b, m.fc2_b]).with("weight_decay", 0.0),
            ],
            AdamWConfig::default().with_lr(3e-3).with_weight_decay(0.05),
        )
        .unwrap();
        let warmup = LinearLR::new(
            &mut opt,
            LinearLRConfig::new()
                .with_start_factor(0.1)
                .with_total_iters(4),
        )
        .unwrap();
        let cosine = CosineAnnealingLR::new(
            &mut opt,
            CosineAnnealingLRConfig::new(20).with_eta_min(1e-4),
        )
        .unwrap();
        let sched = SequentialLR::new(
            &mut opt,
            vec![Box::new(warmup), Box::new(cosine)],
            SequentialLRConfig::new(vec![4]),
        )
        .unwrap();
        Run { m, opt, sched }
    }

    fn unfreeze(&mut self) {
        // torch: opt.add_param_group({"params": [skip.weight], "lr": 1e-3, "weight_decay": 0.0})
        self.opt
            .add_param_group(
                &self.m.arena,
                ParamGroup::new([self.m.skip])
                    .with("lr", 1e-3)
                    .with("weight_decay", 0.0),
            )
            .unwrap();
    }

    /// Step `t` of the loop; returns every group's lr before it.
    fn step(&mut self, t: usize, halve_at: usize, add_at: usize) -> Vec<f64> {
        if t == halve_at {
            for g in 0..self.opt.num_groups() {
                let lr = self.opt.lr(g).unwrap();
                self.opt.set_lr(g, lr * 0.5).unwrap();
            }
        }
        if t == add_at {
            self.unfreeze();
            assert_eq!(self.opt.group_initial_lr(2).unwrap(), None);
        }
        let lrs = lrs(&self.opt);
        self.m.forward_backward(t >= add_at);
        let mut params = vec![self.m.fc1_w, self.m.fc2_w, self.m.fc1_b, self.m.fc2_b];
        if t >= add_at {
            params.push(self.m.skip);
        }
        clip_grad_norm(&mut self.m.arena, &params, ClipNorm::new(1.0)).unwrap();
        self.opt.step(&mut self.m.arena).unwrap();
        self.sched.step(&mut self.opt).unwrap();
        lrs
    }
}

fn lrs(opt: &dyn GroupHyperparams) -> Vec<f64> {
    (0..opt.num_groups()).map(|g| opt.lr(g).unwrap()).collect()
}

fn check_lrs(t: usize, got: &[f64], want: &Value) {
    let want: Vec<f64> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "step {t}: groups");
    for (g, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs(),
            "step {t}, group {g}: lr {a:e}, torch {b:e}"
        );
    }
}

/// Parameters by name, as bits.
fn params_by_name(a: &Arena<f32>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = a
        .infos()
        .iter()
        .map(|i| {
            let x = a.value_by_name(&i.name).unwrap();
            (i.name.clone(), x.iter().map(|f| f.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_readme_loop_has_torchs_lrs_and_resumes_bitwise() {
    let f = fixture();
    let steps = f["steps"].as_u64().unwrap() as usize;
    let halve_at = f["halve_at"].as_u64().unwrap() as usize;
    let add_at = f["add_at"].as_u64().unwrap() as usize;
    assert_eq!(f["initial_lr_of_added"], "absent");
    assert!(add_at < SAVE_AT && SAVE_AT < steps);

    // The unbroken run.
    let mut unbroken = Run::new(false);
    for t in 0..steps {
        let got = unbroken.step(t, halve_at, add_at);
        check_lrs(t, &got, &f["lrs"][t]);
    }
    check_lrs(steps, &lrs(&unbroken.opt), &f["lrs"][steps]);

    // Interrupted after SAVE_AT steps: one call saves everything.
    let dir = std::env::temp_dir().join(format!("optarena-torch-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.safetensors");
    let mut first = Run::new(false);
    for t in 0..SAVE_AT {
        first.step(t, halve_at, add_at);
    }
    TrainingCheckpoint::new(&first.m.arena)
        .optimizer("adamw", &first.opt)
        .scheduler("lr", &first.sched)
        .step(SAVE_AT as u64)
        .metadata("data", serde_json::json!({"next_step": SAVE_AT}))
        .save(&path)
        .unwrap();
    drop(first);

    // A fresh process: the model registered in another order, the same code builds the
    // optimizer and the schedule, the layer unfrozen before the save is added again, and
    // one call restores it all.
    let mut resumed = Run::new(true);
    resumed.unfreeze();
    let loaded = TrainingRestore::new(&mut resumed.m.arena)
        .optimizer("adamw", &mut resumed.opt)
        .scheduler("lr", &mut resumed.sched)
        .load(&path)
        .unwrap();
    assert_eq!(loaded.step, SAVE_AT as u64);
    assert_eq!(loaded.metadata["data"]["next_step"], SAVE_AT);
    for t in SAVE_AT..steps {
        let got = resumed.step(t, halve_at, add_at);
        check_lrs(t, &got, &f["lrs"][t]);
    }
    check_lrs(steps, &lrs(&resumed.opt), &f["lrs"][steps]);
    assert_eq!(
        params_by_name(&resumed.m.arena),
        params_by_name(&unbroken.m.arena),
        "the resumed run ends bit for bit where the unbroken one ends"
    );
    assert_eq!(
        resumed.sched.state_dict().unwrap(),
        unbroken.sched.state_dict().unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
