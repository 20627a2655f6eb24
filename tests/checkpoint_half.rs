//! Half-precision checkpoints: bf16/f16 tensors in their native safetensors dtypes, loads
//! across dtypes cast as torch casts, bf16 optimizer state and `HalfBuffer`s saved and loaded
//! bit for bit, and failed loads that change nothing.
//!
//! The torch side comes from `scripts/gen_half_checkpoint_fixtures.py` (committed files in
//! `tests/fixtures/checkpoints/half*`); the checkpoints this test re-saves under
//! `target/tmp/half` are read back by torch with that script's `check` command.

mod common;

use std::path::PathBuf;

use base64::Engine;
use half::{bf16, f16};
use optarena::checkpoint::dtype::{cast, Values, ValuesMut};
use optarena::checkpoint::{inspect, TrainingCheckpoint, TrainingRestore};
use optarena::optim::*;
use optarena::{
    Arena, ArenaBuilder, Error, HalfBuffer, MatchBy, Param, ParamGroup, StatePrecision, StepOptions,
};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints")
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tmp/half");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("optarena-half-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(dir().join("half.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn bytes(b64: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap()
}

fn u16s(b64: &Value) -> Vec<u16> {
    bytes(b64)
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn f32s(b64: &Value) -> Vec<f32> {
    bytes(b64)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f64s(b64: &Value) -> Vec<f64> {
    bytes(b64)
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// bf16 bits equal, or both NaN (torch's vectorised casts write 0xFFFF, optarena 0x7FC0).
fn assert_bf16_eq(got: &[bf16], want: &[u16], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let w_nan = w & 0x7FFF > 0x7F80;
        if w_nan {
            assert!(
                g.is_nan(),
                "{what}[{i}]: want NaN, got {:#06x}",
                g.to_bits()
            );
        } else {
            assert_eq!(g.to_bits(), w, "{what}[{i}]");
        }
    }
}

/// f16 bits equal, or both NaN.
fn assert_f16_eq(got: &[f16], want: &[u16], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        if w & 0x7FFF > 0x7C00 {
            assert!(
                g.is_nan(),
                "{what}[{i}]: want NaN, got {:#06x}",
                g.to_bits()
            );
        } else {
            assert_eq!(g.to_bits(), w, "{what}[{i}]");
        }
    }
}

/// f32 bits equal, or both NaN.
fn assert_f32_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]");
        } else {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: {g} vs {w}");
        }
    }
}

fn widen16(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// The fixture model (names and shapes), with placeholder values.
fn model(case: &Value) -> (Arena<f32>, Vec<Param<f32>>) {
    let mut b = ArenaBuilder::<f32>::new();
    let mut ps = Vec::new();
    for s in case["shapes"].as_array().unwrap() {
        let shape: Vec<usize> = s[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        ps.push(
            b.param_with(s[0].as_str().unwrap(), &shape, |_| 123.0)
                .unwrap(),
        );
    }
    (b.build(), ps)
}

fn names(case: &Value) -> Vec<String> {
    case["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap().to_string())
        .collect()
}

fn adamw(arena: &Arena<f32>, precision: StatePrecision) -> AdamW<f32> {
    let mut opt = AdamW::new(arena, [ParamGroup::all()], AdamWConfig::default()).unwrap();
    opt.set_state_precision(precision).unwrap();
    opt
}

/// Hashed gradients of step `t`, rounded to bf16 (a bf16 backward), for every parameter.
fn bf16_grads(arena: &Arena<f32>, seed: u64, t: u64) -> HalfBuffer<bf16> {
    let mut g = HalfBuffer::<bf16>::gradients(arena);
    let values = common::hashed(seed, t, arena.len());
    for (x, v) in g.as_mut_slice().iter_mut().zip(values) {
        *x = bf16::from_f32(v as f32);
    }
    g
}

#[test]
fn torch_bf16_adamw_loads_into_bf16_state_bit_for_bit_and_torch_reads_it_back() {
    let fx = fixture();
    let case = &fx["cases"]["adamw_bf16"];
    let (mut arena, ps) = model(case);
    let mut opt = adamw(&arena, StatePrecision::Bf16);
    let path = dir().join(case["file"].as_str().unwrap());
    // The file is what torch keeps: BF16 parameters and state.
    let info = inspect(&path).unwrap();
    assert!(info
        .tensors
        .iter()
        .all(|t| t.dtype == safetensors::Dtype::BF16));
    opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)
        .unwrap();
    assert_eq!(opt.lr(0).unwrap(), 0.01);
    for (i, (p, name)) in ps.iter().zip(names(case)).enumerate() {
        let st = &case["state"][i.to_string()];
        for b in ["exp_avg", "exp_avg_sq"] {
            assert_bf16_eq(
                opt.buffer_bf16(*p, b).unwrap(),
                &u16s(&st[b]),
                &format!("{name}.{b}"),
            );
        }
        assert_eq!(opt.step_count(*p), Some(st["step"].as_u64().unwrap()));
        // bf16 parameters into the f32 arena: widened exactly.
        assert_f32_eq(
            arena.value(*p),
            &widen16(&u16s(&case["params"][&name])),
            &name,
        );
    }
    // Saved again by optarena: BF16 state, never widened, and the same bits.
    let again = out_dir().join("adamw_bf16.rust.safetensors");
    opt.save_checkpoint(&again, Some(&arena)).unwrap();
    let info = inspect(&again).unwrap();
    for t in &info.tensors {
        let want = if t.name.starts_with("state.") {
            safetensors::Dtype::BF16
        } else {
            safetensors::Dtype::F32
        };
        assert_eq!(t.dtype, want, "{}", t.name);
    }
    let mut opt2 = adamw(&arena, StatePrecision::Bf16);
    opt2.load_checkpoint(&again, None, MatchBy::Position)
        .unwrap();
    for p in &ps {
        for b in ["exp_avg", "exp_avg_sq"] {
            assert_eq!(opt2.buffer_bf16(*p, b), opt.buffer_bf16(*p, b));
        }
    }
    // The bf16 copy of the parameters in a training checkpoint (read by torch in `check`).
    let copy = HalfBuffer::<bf16>::copy_of(&arena);
    TrainingCheckpoint::new(&arena)
        .optimizer("adamw", &opt)
        .half_buffer("copy", &copy)
        .save(out_dir().join("training_copy.rust.safetensors"))
        .unwrap();
}

#[test]
fn torch_bf16_adamw_loads_into_f32_state_widened_exactly() {
    let fx = fixture();
    let case = &fx["cases"]["adamw_bf16"];
    let (mut arena, ps) = model(case);
    let mut opt = adamw(&arena, StatePrecision::Full);
    opt.load_checkpoint(
        dir().join(case["file"].as_str().unwrap()),
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap();
    for (i, p) in ps.iter().enumerate() {
        let st = &case["state"][i.to_string()];
        for b in ["exp_avg", "exp_avg_sq"] {
            assert_f32_eq(opt.buffer(*p, b).unwrap(), &widen16(&u16s(&st[b])), b);
        }
    }
}

#[test]
fn torch_f16_sgd_loads_into_f32_state_and_into_bf16_state_as_torch_casts() {
    let fx = fixture();
    let case = &fx["cases"]["sgd_f16"];
    let path = dir().join(case["file"].as_str().unwrap());
    let f16_widened = |b: &Value| -> Vec<f32> {
        u16s(b)
            .iter()
            .map(|&x| f16::from_bits(x).to_f32())
            .collect()
    };
    // f16 -> f32: exact, for the state and the parameters.
    let (mut arena, ps) = model(case);
    let mut opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::default()).unwrap();
    opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)
        .unwrap();
    for (i, (p, name)) in ps.iter().zip(names(case)).enumerate() {
        let st = &case["state"][i.to_string()];
        assert_f32_eq(
            opt.buffer(*p, "momentum_buffer").unwrap(),
            &f16_widened(&st["momentum_buffer"]),
            &name,
        );
        assert_f32_eq(arena.value(*p), &f16_widened(&case["params"][&name]), &name);
    }
    // f16 -> bf16 state: torch's `.to(torch.bfloat16)`.
    let (mut arena, ps) = model(case);
    let mut opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::default()).unwrap();
    opt.set_state_precision(StatePrecision::Bf16).unwrap();
    opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)
        .unwrap();
    for (i, p) in ps.iter().enumerate() {
        assert_bf16_eq(
            opt.buffer_bf16(*p, "momentum_buffer").unwrap(),
            &u16s(&case["state_as_bf16"][i.to_string()]["momentum_buffer"]),
            "momentum_buffer",
        );
    }
}

/// One parameter `w` of the casts case.
fn casts_model(n: usize) -> (Arena<f32>, Param<f32>) {
    let mut b = ArenaBuilder::<f32>::new();
    let w = b.param_with("w", &[n], |_| 7.0).unwrap();
    (b.build(), w)
}

#[test]
fn cross_dtype_loads_equal_torchs_casts() {
    let fx = fixture();
    let c = &fx["cases"]["casts"];
    let n = c["n"].as_u64().unwrap() as usize;
    let path = dir().join(c["file"].as_str().unwrap());
    // f32 and f64 state into bf16 state; the f64 parameter into the f32 arena.
    let (mut arena, w) = casts_model(n);
    let mut opt = adamw(&arena, StatePrecision::Bf16);
    opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)
        .unwrap();
    assert_bf16_eq(
        opt.buffer_bf16(w, "exp_avg").unwrap(),
        &u16s(&c["exp_avg"]["bfloat16"]),
        "f32 -> bf16",
    );
    assert_bf16_eq(
        opt.buffer_bf16(w, "exp_avg_sq").unwrap(),
        &u16s(&c["exp_avg_sq"]["bfloat16"]),
        "f64 -> bf16 (through f32, as torch)",
    );
    assert_f32_eq(arena.value(w), &f32s(&c["w"]["float32"]), "f64 -> f32");
    // Into f32 state.
    let (mut arena, w) = casts_model(n);
    let mut opt = adamw(&arena, StatePrecision::Full);
    opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)
        .unwrap();
    assert_f32_eq(
        opt.buffer(w, "exp_avg").unwrap(),
        &f32s(&c["exp_avg"]["input"]),
        "f32 -> f32",
    );
    assert_f32_eq(
        opt.buffer(w, "exp_avg_sq").unwrap(),
        &f32s(&c["exp_avg_sq"]["float32"]),
        "f64 -> f32",
    );
    // An f32 optimizer's state dict (JSON's load path) into bf16 state: torch's rounding.
    let sd = opt.state_dict();
    let (arena, w2) = casts_model(n);
    let mut half = adamw(&arena, StatePrecision::Bf16);
    half.load_state_dict(&sd, MatchBy::Name).unwrap();
    assert_bf16_eq(
        half.buffer_bf16(w2, "exp_avg").unwrap(),
        &u16s(&c["exp_avg"]["bfloat16"]),
        "state dict f32 -> bf16",
    );
    // The cast itself, every pair torch has an answer for.
    let x32 = f32s(&c["exp_avg"]["input"]);
    let x64 = f64s(&c["exp_avg_sq"]["input"]);
    let mut h = vec![f16::ZERO; n];
    cast(Values::F32(&x32), ValuesMut::F16(&mut h)).unwrap();
    assert_f16_eq(&h, &u16s(&c["exp_avg"]["float16"]), "f32 -> f16");
    cast(Values::F64(&x64), ValuesMut::F16(&mut h)).unwrap();
    assert_f16_eq(&h, &u16s(&c["exp_avg_sq"]["float16"]), "f64 -> f16");
    let mut b = vec![bf16::ZERO; n];
    cast(Values::F64(&x64), ValuesMut::Bf16(&mut b)).unwrap();
    assert_bf16_eq(&b, &u16s(&c["exp_avg_sq"]["bfloat16"]), "f64 -> bf16");
    // bf16 -> f16 and back through f32, exactly as `x.to(bfloat16).to(float16)` composes.
    let mut b2 = vec![bf16::ZERO; n];
    cast(Values::F16(&h), ValuesMut::Bf16(&mut b2)).unwrap();
    for (i, (x, y)) in h.iter().zip(&b2).enumerate() {
        if !x.is_nan() {
            assert_eq!(*y, bf16::from_f32(x.to_f32()), "f16 -> bf16 [{i}]");
        }
    }
    // Lengths must agree.
    assert!(cast(Values::F32(&x32[1..]), ValuesMut::F16(&mut h)).is_err());
}

#[test]
fn bf16_state_round_trips_bit_for_bit_in_every_format_and_continues_identically() {
    let build = |fill: f32| {
        let mut b = ArenaBuilder::<f32>::new();
        let w = b
            .param_with("w", &[33, 17], |i| fill + (i as f32 * 0.37).sin())
            .unwrap();
        let v = b
            .param_with("v", &[40], |i| fill + i as f32 * 0.01 - 0.2)
            .unwrap();
        (b.build(), w, v)
    };
    let (mut arena, w, v) = build(0.0);
    let mut opt = adamw(&arena, StatePrecision::Bf16);
    let mut copy = HalfBuffer::<bf16>::copy_of(&arena);
    for t in 1..=3 {
        let g = bf16_grads(&arena, 99, t);
        opt.step_mixed(&mut arena, &g, &mut copy, StepOptions::default())
            .unwrap();
    }
    // Every buffer's bits, by position (handles belong to one arena).
    let bits = |o: &AdamW<f32>, a: &Arena<f32>| -> Vec<Vec<u16>> {
        a.handles()
            .flat_map(|p| ["exp_avg", "exp_avg_sq"].map(|b| (p, b)))
            .map(|(p, b)| {
                o.buffer_bf16(p, b)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let _ = (w, v);
    let want = bits(&opt, &arena);
    // Binary checkpoint.
    let path = tmp("rt.safetensors");
    let size = opt.save_checkpoint(&path, Some(&arena)).unwrap();
    let state_bytes: usize = inspect(&path)
        .unwrap()
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("state."))
        .map(|t| t.data_offsets.1 - t.data_offsets.0)
        .sum();
    assert_eq!(
        state_bytes,
        2 * 2 * arena.len(),
        "two bf16 buffers, 2 bytes each"
    );
    assert!(size > 0);
    let (mut arena2, ..) = build(5.0);
    let mut opt2 = adamw(&arena2, StatePrecision::Bf16);
    opt2.load_checkpoint(&path, Some(&mut arena2), MatchBy::Name)
        .unwrap();
    assert_eq!(bits(&opt2, &arena2), want);
    assert_eq!(arena2.params(), arena.params());
    // JSON state dict (f32 numbers, rounded back into bf16: exact, they were bf16).
    let mut opt3 = adamw(&arena, StatePrecision::Bf16);
    opt3.load_state_dict_json(&opt.state_dict_json().unwrap(), MatchBy::Name)
        .unwrap();
    assert_eq!(bits(&opt3, &arena), want);
    // Training checkpoint with the bf16 copy and the optimizer.
    let tpath = tmp("rt-train.safetensors");
    TrainingCheckpoint::new(&arena)
        .optimizer("opt", &opt)
        .half_buffer("copy", &copy)
        .step(3)
        .save(&tpath)
        .unwrap();
    let (mut arena4, ..) = build(1.0);
    let mut opt4 = adamw(&arena4, StatePrecision::Bf16);
    let mut copy4 = HalfBuffer::<bf16>::gradients(&arena4);
    let loaded = TrainingRestore::new(&mut arena4)
        .optimizer("opt", &mut opt4)
        .half_buffer("copy", &mut copy4)
        .load(&tpath)
        .unwrap();
    assert_eq!(loaded.step, 3);
    assert_eq!(bits(&opt4, &arena4), want);
    assert_eq!(arena4.params(), arena.params());
    assert_eq!(copy4.as_slice(), copy.as_slice());
    assert_eq!(copy4.present(), copy.present());
    // Every restored run continues exactly as the original.
    let mut copy2 = HalfBuffer::<bf16>::copy_of(&arena2);
    assert_eq!(copy2.as_slice(), copy.as_slice());
    let (g, g2, g4) = (
        bf16_grads(&arena, 99, 4),
        bf16_grads(&arena2, 99, 4),
        bf16_grads(&arena4, 99, 4),
    );
    opt.step_mixed(&mut arena, &g, &mut copy, StepOptions::default())
        .unwrap();
    opt2.step_mixed(&mut arena2, &g2, &mut copy2, StepOptions::default())
        .unwrap();
    opt4.step_mixed(&mut arena4, &g4, &mut copy4, StepOptions::default())
        .unwrap();
    assert_eq!(arena2.params(), arena.params());
    assert_eq!(arena4.params(), arena.params());
    assert_eq!(copy2.as_slice(), copy.as_slice());
    assert_eq!(copy4.as_slice(), copy.as_slice());
    assert_eq!(bits(&opt2, &arena2), bits(&opt, &arena));
    assert_eq!(bits(&opt4, &arena4), bits(&opt, &arena));
}

#[test]
fn f32_and_bf16_state_checkpoints_load_into_each_other() {
    let mut b = ArenaBuilder::<f32>::new();
    let w = b.param_with("w", &[257], |i| (i as f32).cos()).unwrap();
    let mut arena = b.build();
    // f32 state -> bf16 state: each element rounded to nearest even.
    let mut full = adamw(&arena, StatePrecision::Full);
    let g = common::hashed(5, 1, arena.len());
    arena
        .set_grad(w, &g.iter().map(|&x| x as f32).collect::<Vec<_>>())
        .unwrap();
    full.step(&mut arena).unwrap();
    let path = tmp("f32state.safetensors");
    full.save_checkpoint(&path, None).unwrap();
    let mut half = adamw(&arena, StatePrecision::Bf16);
    half.load_checkpoint(&path, None, MatchBy::Name).unwrap();
    for buf in ["exp_avg", "exp_avg_sq"] {
        let want: Vec<bf16> = full
            .buffer(w, buf)
            .unwrap()
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        assert_eq!(half.buffer_bf16(w, buf).unwrap(), &want[..], "{buf}");
    }
    // bf16 state -> f32 state: widened exactly.
    let path2 = tmp("bf16state.safetensors");
    half.save_checkpoint(&path2, None).unwrap();
    let mut full2 = adamw(&arena, StatePrecision::Full);
    full2.load_checkpoint(&path2, None, MatchBy::Name).unwrap();
    for buf in ["exp_avg", "exp_avg_sq"] {
        let want: Vec<f32> = half
            .buffer_bf16(w, buf)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_eq!(full2.buffer(w, buf).unwrap(), &want[..], "{buf}");
    }
}

#[test]
fn half_buffers_load_across_dtypes_as_torch_casts_and_keep_presence() {
    let fx = fixture();
    let c = &fx["cases"]["casts"];
    let x32 = f32s(&c["exp_avg"]["input"]);
    let n = x32.len();
    let mut b = ArenaBuilder::<f32>::new();
    let w = b.param_with("w", &[n], |_| 0.0).unwrap();
    let u = b.param_with("u", &[3], |_| 0.0).unwrap();
    let mut arena = b.build();
    // An f32 buffer of edge values; `u` absent.
    let mut src = HalfBuffer::<f32>::gradients(&arena);
    src.value_mut(w).copy_from_slice(&x32);
    let path = tmp("halves.safetensors");
    TrainingCheckpoint::new(&arena)
        .half_buffer("g", &src)
        .save(&path)
        .unwrap();
    let mut h16 = HalfBuffer::<f16>::copy_of(&arena);
    TrainingRestore::new(&mut arena)
        .half_buffer("g", &mut h16)
        .load(&path)
        .unwrap();
    assert_f16_eq(h16.value(w), &u16s(&c["exp_avg"]["float16"]), "f32 -> f16");
    assert!(h16.is_present(w) && !h16.is_present(u));
    let mut hb = HalfBuffer::<bf16>::copy_of(&arena);
    TrainingRestore::new(&mut arena)
        .half_buffer("g", &mut hb)
        .load(&path)
        .unwrap();
    assert_bf16_eq(hb.value(w), &u16s(&c["exp_avg"]["bfloat16"]), "f32 -> bf16");
    // And the f16 one saved in F16, read back into f32: exact.
    let path2 = tmp("halves16.safetensors");
    TrainingCheckpoint::new(&arena)
        .half_buffer("g", &h16)
        .save(&path2)
        .unwrap();
    let info = optarena::checkpoint::training::inspect_training(&path2).unwrap();
    let t = info.tensors.iter().find(|t| t.name == "half.g.w").unwrap();
    assert_eq!(t.dtype, safetensors::Dtype::F16);
    assert!(info.tensors.iter().all(|t| t.name != "half.g.u"));
    let mut back = HalfBuffer::<f32>::gradients(&arena);
    TrainingRestore::new(&mut arena)
        .half_buffer("g", &mut back)
        .load(&path2)
        .unwrap();
    let want: Vec<f32> = h16.value(w).iter().map(|x| x.to_f32()).collect();
    assert_f32_eq(back.value(w), &want, "f16 -> f32");
}

/// Everything observable about an optimizer with bf16 state, an arena and a half buffer.
fn snapshot(opt: &AdamW<f32>, arena: &Arena<f32>, h: &HalfBuffer<bf16>) -> String {
    format!(
        "{}|{:?}|{:?}|{:?}",
        opt.state_dict_json().unwrap(),
        arena.params(),
        h.as_slice(),
        h.present()
    )
}

#[test]
fn corrupt_or_mismatched_half_checkpoints_error_and_change_nothing() {
    let mut b = ArenaBuilder::<f32>::new();
    b.param_with("w", &[64], |i| i as f32 * 0.1).unwrap();
    let mut arena = b.build();
    let mut opt = adamw(&arena, StatePrecision::Bf16);
    let mut copy = HalfBuffer::<bf16>::copy_of(&arena);
    let g = bf16_grads(&arena, 3, 1);
    opt.step_mixed(&mut arena, &g, &mut copy, StepOptions::default())
        .unwrap();
    let path = tmp("good.safetensors");
    opt.save_checkpoint(&path, Some(&arena)).unwrap();
    let tpath = tmp("good-train.safetensors");
    TrainingCheckpoint::new(&arena)
        .optimizer("opt", &opt)
        .half_buffer("copy", &copy)
        .save(&tpath)
        .unwrap();
    // A second state to load into, different from the file's.
    let g2 = bf16_grads(&arena, 3, 2);
    opt.step_mixed(&mut arena, &g2, &mut copy, StepOptions::default())
        .unwrap();
    let before = snapshot(&opt, &arena, &copy);

    // A flipped byte in the bf16 state data.
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x10;
    let bad_path = tmp("flipped.safetensors");
    std::fs::write(&bad_path, &bad).unwrap();
    let e = opt
        .load_checkpoint(&bad_path, Some(&mut arena), MatchBy::Name)
        .unwrap_err();
    assert!(
        matches!(e, Error::Checkpoint(ref m) if m.contains("checksum")),
        "{e}"
    );
    assert_eq!(snapshot(&opt, &arena, &copy), before);

    // A state tensor whose dtype is not a float (BF16 relabelled I16, same size, header CRC
    // recomputed so only the dtype is wrong).
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap();
    assert!(header.contains("\"BF16\""));
    let relabelled = header.replacen("\"BF16\"", "\"I16\" ", 1);
    assert_eq!(relabelled.len(), header.len());
    let mut bad = good.clone();
    bad[8..8 + n].copy_from_slice(relabelled.as_bytes());
    let crc = crc32fast::hash(&bad[..8 + n]);
    bad[8 + n..12 + n].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&bad_path, &bad).unwrap();
    let e = opt
        .load_checkpoint(&bad_path, Some(&mut arena), MatchBy::Name)
        .unwrap_err();
    assert!(e.to_string().contains("I16"), "{e}");
    assert_eq!(snapshot(&opt, &arena, &copy), before);

    // A truncated training checkpoint.
    let tgood = std::fs::read(&tpath).unwrap();
    std::fs::write(&bad_path, &tgood[..tgood.len() - 3]).unwrap();
    let e = TrainingRestore::new(&mut arena)
        .optimizer("opt", &mut opt)
        .half_buffer("copy", &mut copy)
        .load(&bad_path)
        .unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(snapshot(&opt, &arena, &copy), before);

    // The half buffer not given, one the file does not hold, or one of another arena.
    let e = TrainingRestore::new(&mut arena)
        .optimizer("opt", &mut opt)
        .load(&tpath)
        .unwrap_err();
    assert!(e.to_string().contains("half buffer `copy`"), "{e}");
    let mut extra = HalfBuffer::<bf16>::gradients(&arena);
    let e = TrainingRestore::new(&mut arena)
        .optimizer("opt", &mut opt)
        .half_buffer("copy", &mut copy)
        .half_buffer("grads", &mut extra)
        .load(&tpath)
        .unwrap_err();
    assert!(e.to_string().contains("grads"), "{e}");
    let other = ArenaBuilder::<f32>::new().build();
    let mut foreign = HalfBuffer::<bf16>::copy_of(&other);
    let e = TrainingRestore::new(&mut arena)
        .optimizer("opt", &mut opt)
        .half_buffer("copy", &mut foreign)
        .load(&tpath)
        .unwrap_err();
    assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
    let e = TrainingCheckpoint::new(&arena)
        .half_buffer("copy", &foreign)
        .save(tmp("never.safetensors"))
        .unwrap_err();
    assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
    assert_eq!(snapshot(&opt, &arena, &copy), before);

    // And the good files still load.
    TrainingRestore::new(&mut arena)
        .optimizer("opt", &mut opt)
        .half_buffer("copy", &mut copy)
        .load(&tpath)
        .unwrap();
    assert_ne!(snapshot(&opt, &arena, &copy), before);
}
