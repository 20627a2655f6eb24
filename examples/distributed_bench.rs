//! Times data-parallel steps over MPI: replicated (`DataParallel`) and ZeRO-1
//! (`ShardedOptimizer`), AdamW, on a flat 32M-element arena or GPT-2 small's layout. Rank 0
//! prints one line per mode: median step time and its parts, the bytes each rank sends per
//! step (analytic: what the collectives' ring / pairwise algorithms send), and the optimizer
//! state each rank holds.
//!
//! ```sh
//! cargo build --release --features mpi --example distributed_bench
//! mpirun -np 2 target/release/examples/distributed_bench -- flat 10
//! ```
//! `scripts/distributed_bench.sh` runs 1, 2 and 3 ranks over TCP on loopback and checks the
//! analytic bytes against the loopback interface's counters.

#[path = "../benches/benchmarks/gpt2_layout.rs"]
mod gpt2_layout;

use std::time::{Duration, Instant};

use optarena::distributed::{Communicator, DataParallel, MpiComm, ShardedOptimizer};
use optarena::optim::AdamWAlgorithm;
use optarena::{AdamW, AdamWConfig, Arena, ArenaBuilder, ParamGroup};

fn arena(layout: &str) -> Arena<f32> {
    let shapes = match layout {
        "flat" => vec![("w".to_string(), vec![32 << 20])],
        "gpt2" => gpt2_layout::gpt2_small(),
        other => panic!("unknown layout {other} (flat or gpt2)"),
    };
    let mut b = ArenaBuilder::<f32>::new();
    for (name, shape) in shapes {
        b.zeros(&name, &shape).expect("valid layout");
    }
    let mut a = b.build();
    for (i, x) in a.grads_mut().iter_mut().enumerate() {
        *x = ((i % 1000) as f32 - 500.0) * 1e-4;
    }
    a
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().skip_while(|a| a != "--").skip(1).collect();
    let layout = args.first().map_or("flat", String::as_str).to_string();
    let steps: usize = args.get(1).map_or(10, |s| s.parse().expect("steps"));
    let comm = MpiComm::init().expect("MPI");
    let (rank, n) = (comm.rank(), comm.size());

    let mut a = arena(&layout);
    let mut opt = AdamW::<f32>::new(&a, [ParamGroup::all()], AdamWConfig::default()).unwrap();
    let mut dp = DataParallel::new(&comm, &a, &opt).unwrap();
    let (mut times, mut averaging) = (Vec::new(), Vec::new());
    for _ in 0..steps + 2 {
        comm.barrier().unwrap();
        let t = Instant::now();
        dp.average_gradients(&mut a).unwrap();
        averaging.push(t.elapsed());
        opt.step(&mut a).unwrap();
        times.push(t.elapsed());
    }
    let ddp_ms = median(times.split_off(2));
    let avg_ms = median(averaging.split_off(2));
    let ddp_bytes = dp.bytes_sent_per_step();
    let ddp_state = opt.state_bytes();
    drop(dp);

    let mut a = arena(&layout);
    let mut zero = ShardedOptimizer::<_, f32, AdamWAlgorithm>::new(
        &comm,
        &a,
        [ParamGroup::all()],
        AdamWConfig::default(),
    )
    .unwrap();
    let mut times = Vec::new();
    for _ in 0..steps + 2 {
        comm.barrier().unwrap();
        let t = Instant::now();
        zero.step(&mut a).unwrap();
        times.push(t.elapsed());
    }
    let zero_ms = median(times.split_off(2));
    if rank == 0 {
        let elems = a.len();
        println!(
            "layout={layout} elems={elems} ranks={n} mode=replicated step_ms={ddp_ms:.2} average_ms={avg_ms:.2} \
             bytes_sent_per_rank={ddp_bytes} state_bytes_per_rank={ddp_state}"
        );
        println!(
            "layout={layout} elems={elems} ranks={n} mode=zero1 step_ms={zero_ms:.2} \
             bytes_sent_per_rank={} state_bytes_per_rank={}",
            zero.bytes_sent_per_step(),
            zero.state_bytes()
        );
    }
}
