//! The roofline kernel: a trivial loop with exactly the memory traffic of an optimizer step —
//! the same arrays read and written once per element — chunked and threaded the same way. An
//! optimizer can be no faster than this on a memory-bound size.

use optarena::parallel::{CHUNK, PARALLEL_THRESHOLD};
use optarena::Parallelism;
use rayon::prelude::*;

/// Arrays for a roofline run of Adam's traffic (read 4, write 3) or SGD-momentum's (read 3,
/// write 2).
pub struct Roofline {
    p: Vec<f32>,
    g: Vec<f32>,
    s: Vec<Vec<f32>>,
}

#[inline(always)]
fn pass1(p: &mut [f32], g: &[f32], s0: &mut [f32]) {
    for ((p, g), a) in p.iter_mut().zip(g).zip(s0.iter_mut()) {
        *p += *g * 1e-7;
        *a += *g * 1e-7;
    }
}

#[inline(always)]
fn pass2(p: &mut [f32], g: &[f32], s0: &mut [f32], s1: &mut [f32]) {
    for (((p, g), a), b) in p.iter_mut().zip(g).zip(s0.iter_mut()).zip(s1.iter_mut()) {
        *p += *g * 1e-7;
        *a += *g * 1e-7;
        *b += *g * 1e-7;
    }
}

impl Roofline {
    /// Read `reads` arrays (parameters, gradients and `reads - 2` states), write `reads - 1`.
    pub fn new(n: usize, reads: usize) -> Self {
        assert!(reads == 3 || reads == 4);
        Roofline {
            p: vec![1.0; n],
            g: vec![0.5; n],
            s: (0..reads - 2).map(|_| vec![0.25; n]).collect(),
        }
    }

    pub fn run(&mut self, par: &Parallelism) {
        let parallel = self.p.len() >= PARALLEL_THRESHOLD;
        let (p, g) = (&mut self.p, &self.g);
        match &mut self.s[..] {
            [s0] => {
                let mut it = || {
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(s0.par_chunks_mut(CHUNK))
                        .for_each(|((p, g), a)| pass1(p, g, a))
                };
                match par {
                    Parallelism::Global if parallel => it(),
                    Parallelism::Pool(pool) if parallel => pool.install(it),
                    _ => pass1(p, g, s0),
                }
            }
            [s0, s1] => {
                let mut it = || {
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(s0.par_chunks_mut(CHUNK))
                        .zip(s1.par_chunks_mut(CHUNK))
                        .for_each(|(((p, g), a), b)| pass2(p, g, a, b))
                };
                match par {
                    Parallelism::Global if parallel => it(),
                    Parallelism::Pool(pool) if parallel => pool.install(it),
                    _ => pass2(p, g, s0, s1),
                }
            }
            _ => unreachable!(),
        }
    }
}
