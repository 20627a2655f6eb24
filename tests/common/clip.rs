//! Replaying `clip.json` cases.

use super::*;

/// Replays a `clip.json` case (always f32): `clip_grad_norm_` or `clip_grad_value_` on
/// `hashed(seed, 1, n_total)` gradients.
pub fn run_clip_case(case: &Value) -> Outcome {
    use optarena::clip::{clip_grad_norm_all, clip_grad_value_all, ClipNorm, NormType};
    let name = case["name"].as_str().unwrap_or("?");
    let seed = case["seed"].as_u64().unwrap();
    let shapes: Vec<Vec<usize>> = case["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let n_total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut b = ArenaBuilder::<f32>::new();
    for (i, s) in shapes.iter().enumerate() {
        b.zeros(&format!("p{i}"), s).unwrap();
    }
    let mut arena = b.build();
    let g = hashed(seed, 1, n_total);
    for (dst, src) in arena.grads_mut().iter_mut().zip(&g) {
        *dst = *src as f32;
    }
    if let Some(max_norm) = case.get("max_norm").and_then(Value::as_f64) {
        let p = match &case["norm_type"] {
            Value::String(s) if s == "inf" => f64::INFINITY,
            v => v.as_f64().unwrap(),
        };
        let norm = match NormType::from_f64(p) {
            Ok(n) => n,
            Err(e) => return Outcome::Fail(format!("{name}: {e}")),
        };
        let total = match clip_grad_norm_all(&mut arena, ClipNorm::new(max_norm).norm_type(norm)) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(format!("{name}: {e}")),
        };
        let want = case["total_norm"].as_f64().unwrap();
        if (total - want).abs() > 1e-5 * want.abs() {
            return Outcome::Fail(format!("{name}: total_norm {total}, torch {want}"));
        }
    } else {
        let v = case["clip_value"].as_f64().unwrap();
        if let Err(e) = clip_grad_value_all(&mut arena, v) {
            return Outcome::Fail(format!("{name}: {e}"));
        }
    }
    let want: Vec<f64> = case["grads"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| decode(b.as_str().unwrap(), "float32"))
        .collect();
    for (k, (w, g)) in want.iter().zip(arena.grads()).enumerate() {
        let g = *g as f64;
        if (g - w).abs() > 1e-6 * w.abs() {
            return Outcome::Fail(format!("{name}: grad[{k}] {g:e}, torch {w:e}"));
        }
    }
    Outcome::Pass
}
