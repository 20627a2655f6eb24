//! Times a `SparseAdam` step on an embedding table and prints one JSON line. Used by
//! `scripts/bench_vs_torch.py --sparse-only`, which times torch's `SparseAdam` on the same
//! table beside it.
//!
//! ```sh
//! cargo run --release --example sparse_adam_bench -- 1000000 64 10000 50
//! ```
//! Arguments (all optional): table rows (1M), columns (64), rows touched per step (10000,
//! 1%), timed steps (50). Each step touches a different set of distinct rows, drawn in advance
//! (not timed), sorted as torch's coalesced sparse gradients are; values are synthetic.

use std::time::Instant;

use optarena::{ArenaBuilder, SparseAdam, SparseAdamConfig, SparseGrad};

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (rows, cols, touched, steps) = (arg(0, 1_000_000), arg(1, 64), arg(2, 10_000), arg(3, 50));
    if touched > rows || rows == 0 || cols == 0 {
        return Err("need 0 < touched <= rows and cols > 0".into());
    }
    let mut b = ArenaBuilder::<f32>::new();
    let emb = b.param_with("embedding.weight", &[rows, cols], |i| {
        ((i % 1000) as f32 - 500.0) * 1e-3
    })?;
    let mut arena = b.build();
    let mut opt = SparseAdam::all(&arena, SparseAdamConfig::default())?;
    let warmup = 3;
    let mut seed = 42u64;
    let mut mark = vec![false; rows];
    let batches: Vec<(Vec<usize>, Vec<f32>)> = (0..warmup + steps)
        .map(|_| {
            let mut r = Vec::with_capacity(touched);
            while r.len() < touched {
                let k = (splitmix(&mut seed) % rows as u64) as usize;
                if !std::mem::replace(&mut mark[k], true) {
                    r.push(k);
                }
            }
            r.iter().for_each(|&k| mark[k] = false);
            r.sort_unstable();
            let v = (0..touched * cols)
                .map(|_| (splitmix(&mut seed) >> 40) as f32 / (1u64 << 24) as f32 * 2e-2 - 1e-2)
                .collect();
            (r, v)
        })
        .collect();
    let mut times = Vec::with_capacity(steps);
    for (k, (r, v)) in batches.iter().enumerate() {
        let t = Instant::now();
        opt.step_sparse(&mut arena, &[SparseGrad::new(emb, r, v)])?;
        if k >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "{{\"optimizer\": \"sparse_adam\", \"rows\": {rows}, \"cols\": {cols}, \"touched\": {touched}, \
         \"steps\": {steps}, \"median_s\": {median:e}, \"p99_s\": {p99:e}}}"
    );
    Ok(())
}
