//! What a fragmented param group costs: torch's decay / no-decay recipe over GPT-2 small
//! registered in its natural order (the two groups interleave: 49 runs each) against the same
//! parameters registered group by group (one run per group), and against one group of
//! everything (the layout every other benchmark uses). AdamW, f32.
//!
//! The machine this runs on is shared, so the cases are timed *interleaved*: each round steps
//! every case once, in a rotating order, and the report gives each case's median and minimum
//! over the rounds and the median over rounds of each case's ratio to the one-group case in the
//! same round (paired, so drift in the machine's load cancels).
//!
//! ```sh
//! cargo run --release --example fragmented_groups -- 20          # rounds (default 20)
//! cargo run --release --example fragmented_groups -- 20 small    # the no-decay part only
//! ```
//!
//! A second part times the no-decay group alone (GPT-2 small's 98 biases and LayerNorm
//! weights, 0.1M elements: 49 runs of 768 to 3,840 elements interleaved, or one run), on the
//! calling thread: the case where a per-run cost would show if there were one. A last case
//! keeps the 49 runs but shrinks the weights between them to 16 elements, which separates the
//! runs' own cost (the same compact data in 49 pieces) from the cost of their data lying
//! scattered through a 500 MB arena.

use std::time::Instant;

use optarena::optim::*;
use optarena::{Arena, ArenaBuilder, Parallelism, ParamGroup};

#[path = "../benches/benchmarks/gpt2_layout.rs"]
mod gpt2_layout;
use gpt2_layout::gpt2_small as gpt2;

fn decays(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// The arena of `shapes`, in the given order, with gradients.
fn arena(shapes: &[&(String, Vec<usize>)]) -> Arena<f32> {
    let mut b = ArenaBuilder::<f32>::new();
    for (name, shape) in shapes {
        b.param_with(name, shape, |i| ((i % 1000) as f32 * 1e-3).sin())
            .unwrap();
    }
    let mut a = b.build();
    a.grads_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, g)| *g = ((i % 777) as f32 * 3e-3).cos() * 1e-2);
    a
}

/// torch's recipe over the parameters `pick` selects (every one when it always says yes).
fn recipe(
    shapes: &[(String, Vec<usize>)],
    pick: impl Fn(&[usize]) -> bool,
) -> Vec<ParamGroup<f32>> {
    let names = |d: bool| {
        shapes
            .iter()
            .filter(|(_, s)| pick(s) && decays(s) == d)
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
    };
    let (decay, rest) = (names(true), names(false));
    let mut groups = Vec::new();
    if !decay.is_empty() {
        groups.push(ParamGroup::named(decay));
    }
    if !rest.is_empty() {
        groups.push(ParamGroup::named(rest).with("weight_decay", 0.0));
    }
    groups
}

struct Case {
    name: &'static str,
    arena: Arena<f32>,
    opt: AdamW<f32>,
    times: Vec<f64>,
}

impl Case {
    fn new(
        name: &'static str,
        order: &[&(String, Vec<usize>)],
        groups: Vec<ParamGroup<f32>>,
        par: &Parallelism,
    ) -> Case {
        let mut arena = arena(order);
        let mut opt = AdamW::new(&arena, groups, AdamWConfig::default())
            .unwrap()
            .with_parallelism(par.clone());
        for _ in 0..3 {
            opt.step(&mut arena).unwrap(); // state, and every page touched
        }
        Case {
            name,
            arena,
            opt,
            times: Vec::new(),
        }
    }

    fn runs(&self) -> usize {
        (0..self.opt.num_groups())
            .map(|i| self.opt.group_params(i).unwrap().len())
            .sum()
    }

    /// Elements the optimizer steps.
    fn elems(&self) -> usize {
        (0..self.opt.num_groups())
            .flat_map(|i| self.opt.group_handles(i).unwrap())
            .map(|p| self.arena.info(p).len)
            .sum()
    }

    fn time_step(&mut self) {
        let t = Instant::now();
        self.opt.step(&mut self.arena).unwrap();
        self.times.push(t.elapsed().as_secs_f64());
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `cases` interleaved for `rounds` rounds and prints one line per case.
fn compare(label: &str, cases: &mut [Case], rounds: usize, unit: (&str, f64)) {
    for r in 0..rounds {
        for k in 0..cases.len() {
            cases[(k + r) % cases.len()].time_step();
        }
    }
    let base = &cases[0].times;
    let elements = cases[0].elems();
    println!("{label} ({elements} elements, {rounds} rounds)");
    println!(
        "  {:<36} {:>5} {:>12} {:>12} {:>10}",
        "case", "runs", "median", "min", "vs first"
    );
    for c in cases.iter() {
        let ratio = median(c.times.iter().zip(base).map(|(t, b)| t / b).collect());
        println!(
            "  {:<36} {:>5} {:>9.3} {} {:>9.3} {} {:>9.3}x",
            c.name,
            c.runs(),
            median(c.times.clone()) * unit.1,
            unit.0,
            c.times.iter().copied().fold(f64::INFINITY, f64::min) * unit.1,
            unit.0,
            ratio
        );
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("rounds"))
        .unwrap_or(20);
    // `small` as a second argument: only the no-decay part.
    let small_only = std::env::args().nth(2).as_deref() == Some("small");
    let all = gpt2();
    let natural: Vec<&(String, Vec<usize>)> = all.iter().collect();
    let grouped: Vec<&(String, Vec<usize>)> = all
        .iter()
        .filter(|(_, s)| decays(s))
        .chain(all.iter().filter(|(_, s)| !decays(s)))
        .collect();
    let alternations = natural
        .windows(2)
        .filter(|w| decays(&w[0].1) != decays(&w[1].1))
        .count();
    println!(
        "GPT-2 small: {} tensors; torch's recipe alternates {alternations} times in registration order",
        all.len()
    );
    for threads in [1, 2].into_iter().filter(|_| !small_only) {
        let par = if threads == 1 {
            Parallelism::Sequential
        } else {
            Parallelism::Pool(std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap(),
            ))
        };
        let mut cases = vec![
            Case::new(
                "one group, natural order",
                &natural,
                vec![ParamGroup::all()],
                &par,
            ),
            Case::new(
                "decay/no-decay, natural (fragmented)",
                &natural,
                recipe(&all, |_| true),
                &par,
            ),
            Case::new(
                "decay/no-decay, grouped (contiguous)",
                &grouped,
                recipe(&all, |_| true),
                &par,
            ),
        ];
        compare(
            &format!("AdamW step, GPT-2 small, {threads} thread(s)"),
            &mut cases,
            rounds,
            ("ms", 1e3),
        );
    }
    // The no-decay group alone: small runs only, on the calling thread.
    let small: Vec<(String, Vec<usize>)> =
        all.iter().filter(|(_, s)| !decays(s)).cloned().collect();
    let small_refs: Vec<&(String, Vec<usize>)> = small.iter().collect();
    // The whole model registered, only the no-decay group stepped (its runs lie between the
    // weights' or in one piece), and the same parameters as a model of their own.
    // The same 49 runs with the weights between them shrunk to 16 elements: the runs' data as
    // compact as one run's, so what remains is the cost of the runs themselves.
    let shrunk: Vec<(String, Vec<usize>)> = all
        .iter()
        .map(|(n, s)| (n.clone(), if decays(s) { vec![2, 8] } else { s.clone() }))
        .collect();
    let shrunk_refs: Vec<&(String, Vec<usize>)> = shrunk.iter().collect();
    let par = Parallelism::Sequential;
    let mut cases = vec![
        Case::new(
            "no-decay group, grouped (1 run)",
            &grouped,
            recipe(&all, |s| !decays(s)),
            &par,
        ),
        Case::new(
            "no-decay group, natural (49 runs)",
            &natural,
            recipe(&all, |s| !decays(s)),
            &par,
        ),
        Case::new(
            "no-decay params alone (1 run)",
            &small_refs,
            recipe(&small, |_| true),
            &par,
        ),
        Case::new(
            "49 runs, 16-element gaps",
            &shrunk_refs,
            recipe(&shrunk, |s| !decays(s)),
            &par,
        ),
    ];
    compare(
        "AdamW step of the no-decay group only, 1 thread",
        &mut cases,
        rounds * 50,
        ("µs", 1e6),
    );
}
