//! Criterion benchmarks: `cargo bench`. See README.md ("Reading the benchmarks").
//!
//! - `step/<optimizer>/<dtype>/<seq|par>/<n>`: one optimizer step over `n` elements, with the
//!   roofline kernel of the same memory traffic in the same group (`roofline/...`), so each
//!   optimizer's time can be read as a fraction of it.
//! - `gpt2_small/...`: one AdamW step over GPT-2 small's 148 tensors (124M parameters).
//! - `latency/adapter16k`: one step of a 16K-element adapter on one thread.
//! - `realistic_grads/...`, `idle_pool/...`: Adam and SGD-momentum steps as a training loop sees
//!   them, on gradients with a tail of tiny values and with the pool idle between steps.

use criterion::criterion_main;

mod benchmarks;

criterion_main!(
    benchmarks::optimizers::benches,
    benchmarks::layouts::benches,
    benchmarks::latency::benches,
    benchmarks::training_loop::benches
);
