//! Save and load throughput of binary checkpoints, and the memory they take.
//!
//! ```text
//! cargo run --release --example checkpoint_bench -- [--params 100000000] [--dir DIR]... [--with-params] [--training]
//! ```
//!
//! `--training` measures the one-call training checkpoint instead (`TrainingCheckpoint::save`,
//! `TrainingRestore::load`: the parameters by name and the Adam state, in one file).
//!
//! Builds an f32 Adam state for `--params` elements (ten parameters), steps once so the state
//! exists, then for each target, in-memory (`io::sink` / a byte slice) and each `--dir` (default:
//! `/dev/shm` when it exists, and the system temp dir), saves (atomically, with fsync) and loads
//! three times and prints the best GB/s, the file size, and the peak resident memory each phase
//! added over the run's baseline (Linux).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use optarena::checkpoint::{TrainingCheckpoint, TrainingRestore};
use optarena::{checkpoint, Adam, AdamConfig, Arena, ArenaBuilder, MatchBy, ParamGroup};

/// Writes the checkpoint being measured to `w`.
fn write_to<W: Write>(
    w: &mut W,
    opt: &Adam<f32>,
    arena: &Arena<f32>,
    with_params: bool,
    training: bool,
) -> optarena::Result<u64> {
    if training {
        TrainingCheckpoint::new(arena)
            .optimizer("adam", opt)
            .write(w)
    } else {
        checkpoint::write(w, opt, with_params.then_some(arena))
    }
}

/// Reads the checkpoint being measured from `bytes`.
fn read_from(
    bytes: &[u8],
    opt: &mut Adam<f32>,
    arena: &mut Arena<f32>,
    with_params: bool,
    training: bool,
) -> optarena::Result<u64> {
    let len = bytes.len() as u64;
    if training {
        TrainingRestore::new(arena)
            .optimizer("adam", opt)
            .read(&mut &bytes[..], len)
            .map(|l| l.bytes)
    } else {
        let arena_opt = if with_params { Some(arena) } else { None };
        checkpoint::read(&mut &bytes[..], len, opt, arena_opt, MatchBy::Position)
    }
}

/// Current and peak resident set (bytes), from /proc/self/status.
fn rss() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak resident set to the current one (Linux >= 4.0).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn gb(x: u64) -> f64 {
    x as f64 / 1e9
}

fn main() -> optarena::Result<()> {
    let mut n: usize = 100_000_000;
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut with_params = false;
    let mut training = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--params" => {
                n = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--params N")
            }
            "--dir" => dirs.push(args.next().expect("--dir DIR").into()),
            "--with-params" => with_params = true,
            "--training" => {
                training = true;
                with_params = true;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if dirs.is_empty() {
        if std::path::Path::new("/dev/shm").is_dir() {
            dirs.push("/dev/shm".into());
        }
        dirs.push(std::env::temp_dir());
    }
    let mut b = ArenaBuilder::<f32>::new();
    let per = n / 10;
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let len = if i == 9 { n - 9 * per } else { per };
            b.param_with(&format!("layer{i}.weight"), &[len], |j| {
                (j % 1000) as f32 * 1e-3
            })
            .unwrap()
        })
        .collect();
    let mut arena = b.build();
    let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default())?;
    for &h in &handles {
        arena.grad_mut(h).fill(0.5);
    }
    opt.step(&mut arena)?;
    let base = rss().map(|r| r.0).unwrap_or(0);
    println!(
        "checkpoint_bench: {}Adam f32, {n} parameters, state {:.2} GB{}, resident {:.2} GB",
        if training {
            "training checkpoint, "
        } else {
            ""
        },
        gb(8 * n as u64),
        if with_params {
            " + parameter values"
        } else {
            ""
        },
        gb(base)
    );

    // In memory: the format's own cost (header, checksum pass, copies) without a disk.
    let mut sink = std::io::sink();
    let mut best = f64::MAX;
    let mut size = 0;
    for _ in 0..3 {
        let t = Instant::now();
        size = write_to(&mut sink, &opt, &arena, with_params, training)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "  write to io::sink:   {:6.2} GB/s  ({:.3} s, {size} bytes)",
        gb(size) / best,
        best
    );
    let mut bytes = Vec::with_capacity(size as usize);
    write_to(&mut bytes, &opt, &arena, with_params, training)?;
    bytes.flush().unwrap();
    let mut best = f64::MAX;
    reset_peak();
    for _ in 0..3 {
        let t = Instant::now();
        read_from(&bytes, &mut opt, &mut arena, with_params, training)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "  read from memory:    {:6.2} GB/s  ({:.3} s)",
        gb(size) / best,
        best
    );
    drop(bytes);

    for dir in &dirs {
        let path = dir.join(format!("optarena-bench-{}.safetensors", std::process::id()));
        reset_peak();
        let before = rss().map(|r| r.0).unwrap_or(0);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            size = if training {
                TrainingCheckpoint::new(&arena)
                    .optimizer("adam", &opt)
                    .save(&path)?
            } else {
                opt.save_checkpoint(&path, with_params.then_some(&arena))?
            };
            best = best.min(t.elapsed().as_secs_f64());
        }
        let peak = rss().map(|r| r.1).unwrap_or(0);
        println!(
            "  save {:<28} {:6.2} GB/s  ({:.3} s, file {size} bytes, peak +{:.3} GB)",
            format!("{}:", dir.display()),
            gb(size) / best,
            best,
            gb(peak.saturating_sub(before))
        );
        let mut best = f64::MAX;
        reset_peak();
        let before = rss().map(|r| r.0).unwrap_or(0);
        for _ in 0..3 {
            let t = Instant::now();
            if training {
                TrainingRestore::new(&mut arena)
                    .optimizer("adam", &mut opt)
                    .load(&path)?;
            } else {
                let arena_opt = if with_params { Some(&mut arena) } else { None };
                opt.load_checkpoint(&path, arena_opt, MatchBy::Position)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let peak = rss().map(|r| r.1).unwrap_or(0);
        println!(
            "  load {:<28} {:6.2} GB/s  ({:.3} s, peak +{:.3} GB)",
            format!("{}:", dir.display()),
            gb(size) / best,
            best,
            gb(peak.saturating_sub(before))
        );
        std::fs::remove_file(&path).ok();
    }
    Ok(())
}
