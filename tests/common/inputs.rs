//! Deterministic inputs: SCHEMA.md's hashed values and a small generator for test arenas and
//! gradients.

use super::*;

/// SCHEMA.md's splitmix64.
pub fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SCHEMA.md's `hashed(seed, t, n)`: exact in f32.
pub fn hashed(seed: u64, t: u64, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let h = splitmix64(
                seed.wrapping_mul(0x100_0000_01B3)
                    .wrapping_add(t.wrapping_mul(0x9E37_79B1))
                    .wrapping_add(i),
            );
            if h & 0xFF == 0 {
                0.0
            } else {
                let unit = (h >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0;
                let k = ((h >> 8) & 7) as i32 - 4;
                unit * 2f64.powi(k)
            }
        })
        .collect()
}

/// A small deterministic generator for test data (not the fixture hash).
pub struct Rng(pub u64);

impl Rng {
    /// Next value in [-1, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(1);
        (splitmix64(self.0) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    /// `n` values in [-scale, scale).
    pub fn vec<T: Float>(&mut self, n: usize, scale: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(self.next_f64() * scale))
            .collect()
    }
}

/// Builds an arena of `shapes` split into `groups` (counts of consecutive params), with
/// deterministic initial values; returns it with the handles.
pub fn build_arena<T: Float>(
    shapes: &[Vec<usize>],
    seed: u64,
    reverse_within: &[usize],
) -> (optarena::Arena<T>, Vec<optarena::Param<T>>) {
    let mut rng = Rng(seed);
    let values: Vec<Vec<T>> = shapes
        .iter()
        .map(|s| rng.vec(s.iter().product(), 1.0))
        .collect();
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    // Reverse registration order inside each block listed (for by-name loading tests).
    let mut at = 0;
    for &len in reverse_within {
        order[at..at + len].reverse();
        at += len;
    }
    let mut b = ArenaBuilder::<T>::new();
    let mut handles = vec![None; shapes.len()];
    for &i in &order {
        handles[i] = Some(b.param(&format!("p{i}"), &shapes[i], &values[i]).unwrap());
    }
    (b.build(), handles.into_iter().map(Option::unwrap).collect())
}

/// Writes deterministic gradients for step `t` into every parameter (by name, so the values do
/// not depend on registration order). `skip` names parameters left without a gradient.
pub fn write_grads<T: Float>(arena: &mut optarena::Arena<T>, t: u64, skip: &[usize]) {
    arena.zero_grad(true);
    let infos: Vec<_> = arena.infos().to_vec();
    for info in infos {
        let i: usize = info.name[1..].parse().unwrap();
        if skip.contains(&i) {
            continue;
        }
        let mut rng = Rng(t * 1_000_003 + i as u64 * 7919);
        let g: Vec<T> = rng.vec(info.len, 1.5);
        let p = arena.find(&info.name).unwrap();
        arena.set_grad(p, &g).unwrap();
    }
}
