//! Inference-time fine-tuning: a frozen base network and a small trainable adapter, updated by
//! one optimizer step per incoming request, on the request's own thread.
//!
//! ```sh
//! cargo run --release --example finetune_latency
//! ```
//!
//! - The base (two ReLU layers, 64→256→256, about 82K parameters) sits in the arena but in no
//!   param group: no optimizer state, never updated, no gradient computed for it.
//! - The adapter (a 256→60→10 head, 16,030 parameters) is registered right after it, one
//!   contiguous param group, trained with AdamW on `Parallelism::Sequential`.
//! - Each request is one labelled digit from the shipped UCI digits data: predict (scored
//!   before the update, "prequential" accuracy), backward into the adapter's gradients in the
//!   arena, one `step`.
//!
//! It prints the step latency (p50, p99, max) over a few thousand requests, and shows that
//! once the optimizer state exists a step allocates nothing and never touches rayon:
//! - A counting global allocator counts every allocation made while the optimizer steps (and,
//!   separately, during the whole request); both counts are printed and must be 0.
//! - rayon has no public "is the global pool initialised" query, and asking for its size
//!   (`rayon::current_num_threads()`) would itself build the pool. So the example counts the
//!   process's OS threads (Linux: `/proc/self/task`) before and after the request loop: the
//!   global pool spawns one worker per core the first time anything runs on it, so an
//!   unchanged count of 1 means no step ever used it. As a control, it then runs one step of a
//!   large optimizer on `Parallelism::Global` and shows the count jump.

#[path = "train/data.rs"]
mod data;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use ndarray::linalg::general_mat_vec_mul;
use ndarray::{Array1, ArrayView1, ArrayView2, ArrayViewMut2};
use optarena::{
    AdamW, AdamWConfig, Arena, ArenaBuilder, Parallelism, Param, ParamGroup, SGDConfig, SGD,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use data::{Dataset, CLASSES, FEATURES};

/// Counts allocations (alloc, alloc_zeroed, realloc) and forwards everything to the system
/// allocator.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so this
// allocator upholds exactly the guarantees `System` does; the counter is a relaxed atomic.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// One optimizer step per request on a frozen base + ~16K-parameter adapter; step latency and
/// proof that the step neither allocates nor uses rayon.
#[derive(Parser, Debug)]
struct Args {
    /// Requests to serve (each: predict, backward, one step).
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests served before timing starts (the first one creates the optimizer state).
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// AdamW learning rate of the adapter.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the base, the adapter and the request order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const H: usize = 256;
const R: usize = 60;

/// Parameter handles: the frozen base, then the adapter.
struct Model {
    fc1_w: Param<f32>,
    fc1_b: Param<f32>,
    fc2_w: Param<f32>,
    fc2_b: Param<f32>,
    down_w: Param<f32>,
    down_b: Param<f32>,
    up_w: Param<f32>,
    up_b: Param<f32>,
}

/// Per-request buffers, allocated once.
struct Buffers {
    x: Array1<f32>,
    h1: Array1<f32>,
    h2: Array1<f32>,
    a: Array1<f32>,
    z: Array1<f32>,
    dz: Array1<f32>,
    da: Array1<f32>,
}

fn linear(
    arena: &Arena<f32>,
    w: Param<f32>,
    b: Param<f32>,
    x: ArrayView1<'_, f32>,
    y: &mut Array1<f32>,
    relu: bool,
) {
    let shape = (y.len(), x.len());
    let wv = ArrayView2::from_shape(shape, arena.value(w)).expect("weight shape");
    general_mat_vec_mul(1.0, &wv, &x, 0.0, y);
    for (v, &bias) in y.iter_mut().zip(arena.value(b)) {
        *v += bias;
        if relu {
            *v = v.max(0.0);
        }
    }
}

impl Model {
    fn build(seed: u64) -> optarena::Result<(Model, Arena<f32>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut b = ArenaBuilder::<f32>::new();
        let mut layer = |b: &mut ArenaBuilder<f32>, name: &str, out: usize, inp: usize| {
            // torch nn.Linear's default init: U(±1/sqrt(fan_in)).
            let bound = 1.0 / (inp as f32).sqrt();
            let w = b.param_with(&format!("{name}.weight"), &[out, inp], |_| {
                rng.random_range(-bound..bound)
            })?;
            let bias = b.param_with(&format!("{name}.bias"), &[out], |_| {
                rng.random_range(-bound..bound)
            })?;
            Ok::<_, optarena::Error>((w, bias))
        };
        let (fc1_w, fc1_b) = layer(&mut b, "base.fc1", H, FEATURES)?;
        let (fc2_w, fc2_b) = layer(&mut b, "base.fc2", H, H)?;
        let (down_w, down_b) = layer(&mut b, "adapter.down", R, H)?;
        let (up_w, up_b) = layer(&mut b, "adapter.up", CLASSES, R)?;
        let model = Model {
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
            down_w,
            down_b,
            up_w,
            up_b,
        };
        Ok((model, b.build()))
    }

    fn adapter(&self) -> [Param<f32>; 4] {
        [self.down_w, self.down_b, self.up_w, self.up_b]
    }

    /// Forward of one sample; leaves the logits in `buf.z` and returns the predicted class.
    fn forward(&self, arena: &Arena<f32>, buf: &mut Buffers) -> usize {
        linear(
            arena,
            self.fc1_w,
            self.fc1_b,
            buf.x.view(),
            &mut buf.h1,
            true,
        );
        linear(
            arena,
            self.fc2_w,
            self.fc2_b,
            buf.h1.view(),
            &mut buf.h2,
            true,
        );
        linear(
            arena,
            self.down_w,
            self.down_b,
            buf.h2.view(),
            &mut buf.a,
            true,
        );
        linear(arena, self.up_w, self.up_b, buf.a.view(), &mut buf.z, false);
        buf.z
            .iter()
            .enumerate()
            .fold(0, |best, (c, &v)| if v > buf.z[best] { c } else { best })
    }

    /// Cross-entropy gradient of the last forward into the adapter's gradients in the arena
    /// (the base gets none: it is frozen).
    fn backward(&self, arena: &mut Arena<f32>, buf: &mut Buffers, label: usize) {
        let max = buf.z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = buf.z.iter().map(|&v| (v - max).exp()).sum();
        for (c, (d, &z)) in buf.dz.iter_mut().zip(&buf.z).enumerate() {
            *d = (z - max).exp() / sum - if c == label { 1.0 } else { 0.0 };
        }
        // adapter.up: dW += dz ⊗ a, db += dz.
        {
            let g = arena.grad_mut(self.up_w);
            let mut gw = ArrayViewMut2::from_shape((CLASSES, R), g).expect("shape");
            for (mut row, &d) in gw.rows_mut().into_iter().zip(&buf.dz) {
                row.scaled_add(d, &buf.a);
            }
        }
        for (g, &d) in arena.grad_mut(self.up_b).iter_mut().zip(&buf.dz) {
            *g += d;
        }
        // Through adapter.up and the ReLU: da = (Uᵀ dz) ⊙ [a > 0].
        let up = ArrayView2::from_shape((CLASSES, R), arena.value(self.up_w)).expect("shape");
        general_mat_vec_mul(1.0, &up.t(), &buf.dz, 0.0, &mut buf.da);
        buf.da.zip_mut_with(&buf.a, |d, &a| {
            if a <= 0.0 {
                *d = 0.0;
            }
        });
        // adapter.down: dW += da ⊗ h2, db += da.
        {
            let g = arena.grad_mut(self.down_w);
            let mut gw = ArrayViewMut2::from_shape((R, H), g).expect("shape");
            for (mut row, &d) in gw.rows_mut().into_iter().zip(&buf.da) {
                row.scaled_add(d, &buf.h2);
            }
        }
        for (g, &d) in arena.grad_mut(self.down_b).iter_mut().zip(&buf.da) {
            *g += d;
        }
    }

    fn accuracy(&self, arena: &Arena<f32>, data: &Dataset, buf: &mut Buffers) -> f64 {
        let mut correct = 0;
        for i in 0..data.len() {
            buf.x
                .as_slice_mut()
                .expect("contiguous")
                .copy_from_slice(data.row(i));
            correct += usize::from(self.forward(arena, buf) == data.y[i] as usize);
        }
        correct as f64 / data.len() as f64
    }
}

/// Threads of this process (Linux), or `None` where `/proc` is not available.
fn os_threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

fn percentile(sorted_ns: &[u64], q: f64) -> f64 {
    let i = ((sorted_ns.len() - 1) as f64 * q).round() as usize;
    sorted_ns[i] as f64 / 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.requests == 0 {
        return Err("--requests must be at least 1".into());
    }
    let threads_at_start = os_threads();

    let all = data::load_digits()?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    rng.set_stream(7);
    let (stream, held_out) = data::split(&all, 0.2, &mut rng);

    let (model, mut arena) = Model::build(args.seed)?;
    let adapter_params: usize = model.adapter().iter().map(|&p| arena.value(p).len()).sum();
    let mut opt = AdamW::new(
        &arena,
        [ParamGroup::new(model.adapter())],
        AdamWConfig::default().with_lr(args.lr),
    )?
    .with_parallelism(Parallelism::Sequential);
    let base_before: Vec<f32> = arena.params()[..arena.info(model.down_w).offset].to_vec();
    println!(
        "arena: {} parameters; frozen base {} (in no param group), adapter {} (one group, \
         AdamW lr={}, Parallelism::Sequential)",
        arena.len(),
        arena.len() - adapter_params,
        adapter_params,
        args.lr
    );

    let mut buf = Buffers {
        x: Array1::zeros(FEATURES),
        h1: Array1::zeros(H),
        h2: Array1::zeros(H),
        a: Array1::zeros(R),
        z: Array1::zeros(CLASSES),
        dz: Array1::zeros(CLASSES),
        da: Array1::zeros(R),
    };
    let held_out_before = model.accuracy(&arena, &held_out, &mut buf);

    // The request stream: the training part of the digits, reshuffled every pass.
    let total = args.warmup + args.requests;
    let mut order: Vec<usize> = Vec::with_capacity(total + stream.len());
    while order.len() < total {
        let mut pass: Vec<usize> = (0..stream.len()).collect();
        pass.shuffle(&mut rng);
        order.extend(pass);
    }
    let mut step_ns: Vec<u64> = Vec::with_capacity(args.requests);
    let mut request_ns: Vec<u64> = Vec::with_capacity(args.requests);
    let mut hits: Vec<bool> = Vec::with_capacity(total);
    let mut step_allocs = 0u64;
    let mut request_allocs = 0u64;

    for (n, &i) in order[..total].iter().enumerate() {
        let timed = n >= args.warmup;
        let a0 = allocations();
        let t0 = Instant::now();
        buf.x
            .as_slice_mut()
            .expect("contiguous")
            .copy_from_slice(stream.row(i));
        let label = stream.y[i] as usize;
        let predicted = model.forward(&arena, &mut buf);
        opt.zero_grad(&mut arena, true)?;
        model.backward(&mut arena, &mut buf, label);
        let a1 = allocations();
        let t1 = Instant::now();
        opt.step(&mut arena)?;
        let t2 = Instant::now();
        let a2 = allocations();
        if timed {
            step_ns.push((t2 - t1).as_nanos() as u64);
            request_ns.push((t2 - t0).as_nanos() as u64);
            step_allocs += a2 - a1;
            request_allocs += a2 - a0;
        }
        hits.push(predicted == label);
    }
    let threads_after_loop = os_threads();

    let held_out_after = model.accuracy(&arena, &held_out, &mut buf);
    let base_unchanged = arena.params()[..base_before.len()] == base_before[..];
    step_ns.sort_unstable();
    request_ns.sort_unstable();
    let window = 500.min(hits.len() / 2).max(1);
    let rate = |h: &[bool]| h.iter().filter(|&&x| x).count() as f64 / h.len() as f64;

    println!(
        "\n{} requests timed (after {} warm-up requests; the first created the AdamW state)",
        args.requests, args.warmup
    );
    println!(
        "optimizer step  ({adapter_params} params): p50 {:7.2} µs   p99 {:7.2} µs   max {:7.2} µs",
        percentile(&step_ns, 0.5),
        percentile(&step_ns, 0.99),
        percentile(&step_ns, 1.0)
    );
    println!(
        "whole request (fwd+bwd+step):   p50 {:7.2} µs   p99 {:7.2} µs   max {:7.2} µs",
        percentile(&request_ns, 0.5),
        percentile(&request_ns, 0.99),
        percentile(&request_ns, 1.0)
    );
    println!(
        "allocations during the {} timed steps: {step_allocs}; during the whole requests: \
         {request_allocs}",
        args.requests
    );
    println!(
        "prequential accuracy (predicted before the update): first {window} requests {:.1}%, \
         last {window} {:.1}%",
        100.0 * rate(&hits[..window]),
        100.0 * rate(&hits[hits.len() - window..])
    );
    println!(
        "held-out accuracy ({} images): {:.1}% before, {:.1}% after; frozen base unchanged: \
         {base_unchanged}",
        held_out.len(),
        100.0 * held_out_before,
        100.0 * held_out_after
    );

    // rayon: the process's threads before and after the loop, then a control on Global.
    match (threads_at_start, threads_after_loop) {
        (Some(before), Some(after)) => {
            println!(
                "OS threads of this process: {before} at start, {after} after {} requests \
                 (rayon's global pool was never started: it would have added one thread per \
                 core)",
                total
            );
            let n = 1 << 17;
            let mut b = ArenaBuilder::<f32>::new();
            let w = b.zeros("big", &[n])?;
            let mut big = b.build();
            big.grad_mut(w).fill(1.0);
            let mut control = SGD::new(&big, [ParamGroup::all()], SGDConfig::default())?
                .with_parallelism(Parallelism::Global);
            control.step(&mut big)?;
            println!(
                "control: one step of a {n}-element optimizer on Parallelism::Global -> {} OS \
                 threads (rayon's pool started)",
                os_threads().unwrap_or(0)
            );
            if after != before {
                return Err("the request loop started threads".into());
            }
        }
        _ => println!("OS thread count not available on this platform (/proc/self/task)"),
    }
    if step_allocs != 0 {
        return Err(format!("the optimizer step allocated {step_allocs} times").into());
    }
    if !base_unchanged {
        return Err("the frozen base changed".into());
    }
    Ok(())
}
