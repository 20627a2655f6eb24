//! Param groups over any layout (issue #14): a group whose parameters are interleaved with
//! another group's in the arena (torch's decay / no-decay recipe over a model registered in its
//! natural order) gives every parameter exactly the state and values it gets when the same
//! parameters are registered group by group (one run per group), and when each group is its
//! own optimizer. Checked bit for bit, for elementwise and per-parameter algorithms, on any
//! thread count, with the clip folded into the step, and across checkpoints that move between
//! the two layouts.

use std::collections::BTreeMap;
use std::sync::Arc;

use optarena::optim::*;
use optarena::{
    Algorithm, Arena, ArenaBuilder, ClipNorm, Float, HyperValue, MatchBy, Optimizer, Parallelism,
    ParamGroup, StateDict,
};

/// A small model: per layer a weight (2-D), a bias and a norm weight. The first and third
/// weights are longer than one piece of work (16K elements), so runs are cut.
fn layers() -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    for (l, (r, c)) in [(150, 130), (40, 37), (129, 131), (3, 5)]
        .into_iter()
        .enumerate()
    {
        v.push((format!("h{l}.weight"), vec![r, c]));
        v.push((format!("h{l}.bias"), vec![r]));
        v.push((format!("h{l}.ln.weight"), vec![r]));
    }
    v.push(("ln_f.weight".into(), vec![3]));
    v
}

fn is_decay(shape: &[usize]) -> bool {
    shape.len() >= 2
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Registration order: weight, bias, norm per layer; the groups interleave.
    Natural,
    /// Every weight first, then the rest: each group is one run.
    Grouped,
}

fn value(name: &str, i: usize) -> f64 {
    let h = name
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    (((h as usize).wrapping_add(i * 2654435761) % 1999) as f64 / 1999.0 - 0.5) * 0.2
}

fn build<T: Float>(layout: Layout) -> Arena<T> {
    let all = layers();
    let order: Vec<&(String, Vec<usize>)> = match layout {
        Layout::Natural => all.iter().collect(),
        Layout::Grouped => all
            .iter()
            .filter(|(_, s)| is_decay(s))
            .chain(all.iter().filter(|(_, s)| !is_decay(s)))
            .collect(),
    };
    let mut b = ArenaBuilder::<T>::new();
    for (name, shape) in order {
        b.param_with(name, shape, |i| T::from_f64(value(name, i) + 1.0))
            .unwrap();
    }
    b.build()
}

/// Writes step `t`'s gradients, by name; `h1.bias` and `h2.weight` have none on even steps
/// (skipped, as torch skips `grad is None`), which cuts the runs differently each step.
fn write_grads<T: Float>(arena: &mut Arena<T>, t: usize) {
    arena.zero_grad(true);
    for (name, _) in layers() {
        if t.is_multiple_of(2) && (name == "h1.bias" || name == "h2.weight") {
            continue;
        }
        let g = arena.grad_by_name_mut(&name).unwrap();
        for (i, x) in g.iter_mut().enumerate() {
            *x = T::from_f64(value(&name, i + 31 * t) * (1.0 + t as f64));
        }
    }
}

fn names(pick: impl Fn(&[usize]) -> bool) -> Vec<String> {
    layers()
        .into_iter()
        .filter(|(_, s)| pick(s))
        .map(|(n, _)| n)
        .collect()
}

/// torch's recipe: `[{"params": decay}, {"params": no_decay, "lr": ..., "weight_decay": 0}]`.
fn recipe<T: Float>(no_decay: &[(&str, HyperValue)]) -> Vec<ParamGroup<T>> {
    let mut g2 = ParamGroup::named(names(|s| !is_decay(s)));
    for (k, v) in no_decay {
        g2 = g2.with(k, v.clone());
    }
    vec![ParamGroup::named(names(is_decay)), g2]
}

/// Every parameter's values and state, by name, as bits: layout-independent.
type Snapshot = BTreeMap<String, (Vec<u64>, Option<u64>, BTreeMap<String, Vec<u64>>)>;

fn bits<T: Float>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

fn snapshot<T: Float>(arena: &Arena<T>, dicts: &[StateDict<T>]) -> Snapshot {
    let mut out = Snapshot::new();
    for (name, _) in layers() {
        let values = bits(arena.value_by_name(&name).unwrap());
        out.insert(name, (values, None, BTreeMap::new()));
    }
    for sd in dicts {
        let mut by_index = BTreeMap::new();
        for g in &sd.param_groups {
            for p in &g.params {
                by_index.insert(p.index, p.name.clone());
            }
        }
        for st in &sd.state {
            let e = out.get_mut(&by_index[&st.index]).unwrap();
            e.1 = st.step;
            e.2 = st
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), bits(v)))
                .collect();
        }
    }
    out
}

fn pool(n: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    ))
}

/// `steps` steps of one optimizer over torch's recipe on `layout`; clipped to `clip` if given.
fn run<T: Float, A: Algorithm>(
    layout: Layout,
    config: &A::Config,
    no_decay: &[(&str, HyperValue)],
    par: Parallelism,
    threshold: usize,
    clip: Option<f64>,
    steps: usize,
) -> (Snapshot, Vec<u64>) {
    let mut arena = build::<T>(layout);
    let mut opt = Optimizer::<T, A>::new(&arena, recipe(no_decay), config.clone())
        .unwrap()
        .with_parallelism(par);
    opt.set_parallel_threshold(threshold);
    let mut norms = Vec::new();
    for t in 1..=steps {
        write_grads(&mut arena, t);
        match clip {
            Some(c) => norms.push(
                opt.step_with_options(
                    &mut arena,
                    optarena::StepOptions::new().clipped(ClipNorm::l2(c)),
                )
                .unwrap()
                .total_norm
                .unwrap()
                .to_bits(),
            ),
            None => opt.step(&mut arena).unwrap(),
        }
    }
    (snapshot(&arena, &[opt.state_dict()]), norms)
}

fn same_as_contiguous<T: Float, A: Algorithm>(config: A::Config, no_decay: &[(&str, HyperValue)]) {
    let grouped = run::<T, A>(
        Layout::Grouped,
        &config,
        no_decay,
        Parallelism::Sequential,
        0,
        None,
        4,
    );
    let natural = run::<T, A>(
        Layout::Natural,
        &config,
        no_decay,
        Parallelism::Sequential,
        0,
        None,
        4,
    );
    // Every parameter has state by now (the two skipped on even steps had it from step 1).
    assert!(grouped
        .0
        .values()
        .all(|(_, step, buffers)| { (step.is_some() || !A::TRACKS_STEP) && !buffers.is_empty() }));
    assert_eq!(grouped, natural, "{} {}", A::NAME, T::DTYPE);
    // Folded clipping: the norm is over the groups' runs, in the same parameter order.
    let grouped = run::<T, A>(
        Layout::Grouped,
        &config,
        no_decay,
        Parallelism::Sequential,
        0,
        Some(0.5),
        3,
    );
    let natural = run::<T, A>(
        Layout::Natural,
        &config,
        no_decay,
        Parallelism::Sequential,
        0,
        Some(0.5),
        3,
    );
    assert_eq!(grouped, natural, "{} {} clipped", A::NAME, T::DTYPE);
    // Threads: 1, 2, 3 (the pool forced by a zero threshold), the global pool, inline.
    for (par, threshold) in [
        (pool(1), 0),
        (pool(2), 0),
        (pool(3), 0),
        (pool(2), usize::MAX),
        (Parallelism::Global, 0),
    ] {
        let desc = format!("{par:?} {threshold}");
        let got = run::<T, A>(
            Layout::Natural,
            &config,
            no_decay,
            par,
            threshold,
            Some(0.5),
            3,
        );
        assert_eq!(grouped, got, "{} {} {desc}", A::NAME, T::DTYPE);
    }
}

fn lr(x: f64) -> (&'static str, HyperValue) {
    ("lr", HyperValue::from(x))
}

fn wd0() -> (&'static str, HyperValue) {
    ("weight_decay", HyperValue::from(0.0))
}

#[test]
fn interleaved_groups_match_contiguous_ones_bit_for_bit() {
    same_as_contiguous::<f32, AdamWAlgorithm>(AdamWConfig::default(), &[wd0(), lr(3e-3)]);
    same_as_contiguous::<f64, AdamWAlgorithm>(AdamWConfig::default().with_amsgrad(true), &[wd0()]);
    same_as_contiguous::<f32, SGDAlgorithm>(
        SGDConfig::default()
            .with_lr(0.1)
            .with_momentum(0.9)
            .with_nesterov(true)
            .with_weight_decay(0.01),
        &[wd0()],
    );
    same_as_contiguous::<f32, ASGDAlgorithm>(ASGDConfig::default(), &[lr(0.02)]);
    same_as_contiguous::<f32, NAdamAlgorithm>(NAdamConfig::default(), &[lr(0.01)]);
    same_as_contiguous::<f32, RpropAlgorithm>(RpropConfig::default(), &[lr(0.02)]);
    same_as_contiguous::<f32, AdagradAlgorithm>(AdagradConfig::default(), &[lr(0.02)]);
    // Per-parameter, with shaped state (row_var / col_var / variance).
    same_as_contiguous::<f32, AdafactorAlgorithm>(AdafactorConfig::default(), &[wd0(), lr(0.02)]);
}

/// Each group as its own optimizer over the natural layout (Muon for the matrices, AdamW for
/// the rest) gives what one optimizer per group gives over the grouped layout.
#[test]
fn muon_for_matrices_and_adamw_for_the_rest_over_any_layout() {
    let go = |layout: Layout| {
        let mut arena = build::<f32>(layout);
        let mut muon = Muon::new(
            &arena,
            [ParamGroup::named(names(is_decay))],
            MuonConfig::default(),
        )
        .unwrap();
        let mut adamw = AdamW::new(
            &arena,
            [ParamGroup::named(names(|s| !is_decay(s))).with("weight_decay", 0.0)],
            AdamWConfig::default(),
        )
        .unwrap();
        let runs = (
            muon.group_params(0).unwrap().to_vec(),
            adamw.group_params(0).unwrap().to_vec(),
        );
        for t in 1..=3 {
            write_grads(&mut arena, t);
            muon.step(&mut arena).unwrap();
            adamw.step(&mut arena).unwrap();
        }
        (
            snapshot(&arena, &[muon.state_dict(), adamw.state_dict()]),
            runs,
        )
    };
    let (grouped, runs_g) = go(Layout::Grouped);
    let (natural, runs_n) = go(Layout::Natural);
    assert_eq!(grouped, natural);
    assert_eq!(runs_g.0, std::slice::from_ref(&(0..4)));
    assert_eq!(runs_g.1, std::slice::from_ref(&(4..13)));
    // Natural: weights at 0, 3, 6, 9; the rest in runs between them.
    assert_eq!(runs_n.0, [0..1, 3..4, 6..7, 9..10]);
    assert_eq!(runs_n.1, [1..3, 4..6, 7..9, 10..13]);
}

/// One optimizer with two interleaved groups equals two optimizers, one per group.
#[test]
fn two_groups_equal_two_optimizers() {
    let config = AdamWConfig::default();
    let one = run::<f32, AdamWAlgorithm>(
        Layout::Natural,
        &config,
        &[wd0()],
        Parallelism::Sequential,
        0,
        None,
        4,
    );
    let mut arena = build::<f32>(Layout::Natural);
    let groups = recipe::<f32>(&[wd0()]);
    let mut opts: Vec<AdamW<f32>> = groups
        .into_iter()
        .map(|g| AdamW::new(&arena, [g], config.clone()).unwrap())
        .collect();
    for t in 1..=4 {
        write_grads(&mut arena, t);
        for o in &mut opts {
            o.step(&mut arena).unwrap();
        }
    }
    let dicts: Vec<_> = opts.iter().map(|o| o.state_dict()).collect();
    assert_eq!(one.0, snapshot(&arena, &dicts));
}

/// torch numbers a state dict's parameters in the order its groups list them: group 0's
/// parameters (here in arena order), then group 1's. A state saved from one layout loads by
/// name into the other, by JSON and by binary checkpoint, and both continue bit for bit.
#[test]
fn state_moves_between_layouts() {
    let config = AdamWConfig::default();
    let no_decay = [wd0(), lr(2e-3)];
    let uninterrupted = run::<f32, AdamWAlgorithm>(
        Layout::Grouped,
        &config,
        &no_decay,
        Parallelism::Sequential,
        0,
        None,
        6,
    );
    let dir = std::env::temp_dir().join(format!("optarena-fragmented-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [
        (Layout::Natural, Layout::Grouped),
        (Layout::Grouped, Layout::Natural),
    ] {
        for binary in [false, true] {
            let mut a = build::<f32>(from);
            let mut opt = AdamW::new(&a, recipe(&no_decay), config.clone()).unwrap();
            for t in 1..=3 {
                write_grads(&mut a, t);
                opt.step(&mut a).unwrap();
            }
            let sd = opt.state_dict();
            let listed: Vec<Vec<&str>> = sd
                .param_groups
                .iter()
                .map(|g| g.params.iter().map(|p| p.name.as_str()).collect())
                .collect();
            assert_eq!(
                listed[0],
                ["h0.weight", "h1.weight", "h2.weight", "h3.weight"]
            );
            assert_eq!(listed[1][..3], ["h0.bias", "h0.ln.weight", "h1.bias"]);
            let numbers: Vec<usize> = sd
                .param_groups
                .iter()
                .flat_map(|g| g.params.iter().map(|p| p.index))
                .collect();
            assert_eq!(numbers, (0..13).collect::<Vec<_>>());

            let mut b = build::<f32>(to);
            // The groups listed in another order of parameters: matched by name anyway.
            let groups = vec![
                ParamGroup::named(names(is_decay).into_iter().rev()),
                ParamGroup::named(names(|s| !is_decay(s))),
            ];
            let mut opt2 = AdamW::new(&b, groups, AdamWConfig::default()).unwrap();
            if binary {
                let path = dir.join(format!("{from:?}.safetensors"));
                opt.save_checkpoint(&path, Some(&a)).unwrap();
                opt2.load_checkpoint(&path, Some(&mut b), MatchBy::Name)
                    .unwrap();
            } else {
                opt2.load_state_dict(&sd, MatchBy::Name).unwrap();
                for (name, _) in layers() {
                    b.value_by_name_mut(&name)
                        .unwrap()
                        .copy_from_slice(a.value_by_name(&name).unwrap());
                }
            }
            assert_eq!(opt2.lr(1).unwrap(), 2e-3);
            for t in 4..=6 {
                write_grads(&mut b, t);
                opt2.step(&mut b).unwrap();
            }
            assert_eq!(
                snapshot(&b, &[opt2.state_dict()]),
                uninterrupted.0,
                "{from:?} -> {to:?} binary {binary}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `zero_grad` touches only the optimizer's parameters (as torch's does), over every run;
/// `find_non_finite_grad` and the checked step see a parameter inside any run.
#[test]
fn zero_grad_and_non_finite_checks_cover_every_run() {
    let mut arena = build::<f32>(Layout::Natural);
    // Only the layers' biases: runs with gaps, and parameters outside the optimizer.
    let biases: Vec<String> = layers()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".bias"))
        .collect();
    let mut opt = SGD::new(
        &arena,
        [ParamGroup::named(biases.clone())],
        SGDConfig::default(),
    )
    .unwrap();
    assert_eq!(opt.group_params(0).unwrap(), &[1..2, 4..5, 7..8, 10..11]);
    write_grads(&mut arena, 1);
    opt.zero_grad(&mut arena, false).unwrap();
    for (name, _) in layers() {
        let g = arena.grad_by_name(&name).unwrap();
        if biases.contains(&name) {
            assert!(g.unwrap().iter().all(|&x| x == 0.0), "{name}");
        } else {
            assert!(
                g.unwrap().iter().any(|&x| x != 0.0),
                "{name} is not the optimizer's"
            );
        }
    }
    opt.zero_grad(&mut arena, true).unwrap();
    for name in &biases {
        assert!(arena.grad_by_name(name).unwrap().is_none(), "{name}");
    }
    write_grads(&mut arena, 1);
    // A NaN outside the group is not the optimizer's business; one inside the last run is.
    arena.grad_by_name_mut("h3.ln.weight").unwrap()[0] = f32::NAN;
    assert_eq!(opt.find_non_finite_grad(&arena), None);
    arena.grad_by_name_mut("h3.bias").unwrap()[1] = f32::INFINITY;
    assert_eq!(opt.find_non_finite_grad(&arena), Some("h3.bias"));
    let before = arena.params().to_vec();
    assert_eq!(
        opt.step_with_options(
            &mut arena,
            optarena::StepOptions::new().skipping_non_finite()
        )
        .unwrap()
        .outcome,
        optarena::StepOutcome::SkippedNonFinite
    );
    assert_eq!(arena.params(), &before[..]);
}
