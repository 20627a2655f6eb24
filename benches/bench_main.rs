//! Criterion benchmarks: `cargo bench`. See README.md ("Reading the benchmarks").
//!
//! - `step/<optimizer>/<dtype>/<seq|par>/<n>`: one optimizer step over `n` elements, with the
//!   roofline kernel of the same memory traffic in the same group (`roofline/...`), so each
//!   optimizer's time can be read as a fraction of it.
//! - `gpt2_small/...`: one AdamW step over GPT-2 small's 148 tensors (124M parameters).
//! - `latency/adapter16k`: one step of a 16K-element adapter on one thread.

use criterion::criterion_main;

mod benchmarks;

criterion_main!(
    benchmarks::optimizers::benches,
    benchmarks::layouts::benches,
    benchmarks::latency::benches
);
