//! The roofline kernel: the memory traffic of an optimizer step with trivial arithmetic, the
//! speed limit a fused step is measured against.
//!
//! [`Roofline`] owns arrays allocated exactly as an arena and its state buffers are (aligned
//! and staggered the same way), and [`Roofline::run`] makes one pass over them that reads every
//! array once and writes all but the gradients once (`p += c·g`, `s_k += c·g`): the traffic of
//! Adam (read 4, write 3) or SGD with momentum (read 3, write 2).
//!
//! To be an upper bound rather than one more loop, a pass can walk the arrays in several ways
//! (a [`Strategy`]: any lane width the CPU has, the step's [`CHUNK`]-element pieces, longer
//! pieces, or one contiguous span per thread, with or without software prefetch), and
//! [`Roofline::run`] uses the fastest of them, measured on first use
//! ([`Roofline::calibrate`]). An optimizer step that matches it is limited by memory bandwidth
//! alone.
//!
//! Why both prefetch settings: the fused steps prefetch 4 KiB ahead in every array, which a
//! divider-bound loop needs to keep its streams fed (Adam went from 89% to 98% of the
//! roofline with it on the Intel Xeon of BENCHMARKS.md), while a loop with trivial arithmetic
//! keeps enough loads in flight by itself and can run a few percent faster without the extra
//! instructions (on one thread: 2-6%, paired passes). A roofline that only ran the steps' own
//! loop would miss that, and understate the limit: the issue that asked for a true roofline
//! had timed a plain 16-lane loop, one span per thread and no prefetch, faster than the
//! roofline of the day.
//!
//! Non-temporal (streaming) stores are not among the strategies: every array a pass writes it
//! has just read, so the lines are in cache and streaming them out only evicts them. In a plain
//! AVX-512 loop moving Adam's traffic (32M f32, 2 threads, the Xeon of the AVX-512 work) they
//! took 27 ms against 20.5 ms with ordinary stores.

use std::time::Instant;

use half::bf16;
use rayon::prelude::*;

use crate::arch::SimdLevel;
use crate::buffer::{AlignedBuf, Role};
use crate::float::{Float, Lane};
use crate::kernels::{for_each_lane_ahead, ElementOp, Pass, PREFETCH_AHEAD};
use crate::mixed::{MasterCopy, MixedPass, Nearest, Storage};
use crate::parallel::{piece_len, Parallelism, CHUNK, PARALLEL_THRESHOLD};

/// How a roofline pass walks the arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    /// The lanes: the widest this level allows on this CPU.
    pub simd: SimdLevel,
    /// Elements per piece of parallel work; `None` for one contiguous span per thread.
    pub piece: Option<usize>,
    /// Software prefetch [`PREFETCH_AHEAD`] elements ahead in every array, as the optimizer
    /// steps do; `false` leaves the arrays to the hardware prefetcher (a plain loop).
    pub prefetch: bool,
}

impl Strategy {
    /// What an optimizer step does with a run below 1M elements: the best lanes,
    /// [`CHUNK`]-element pieces, prefetch (longer runs it cuts into longer pieces, up to
    /// sixteen times longer).
    pub const STEP: Strategy = Strategy {
        simd: SimdLevel::Best,
        piece: Some(CHUNK),
        prefetch: true,
    };

    /// Every strategy [`Roofline::calibrate`] tries on this CPU: each available lane width
    /// with [`CHUNK`]-element pieces, pieces sixteen times longer, and one span per thread,
    /// each with and without software prefetch. The plain loop a fused step is most often
    /// compared with (the widest lanes, one span per thread, no prefetch) is among them, so
    /// the roofline is never slower than it.
    pub fn candidates() -> Vec<Strategy> {
        let mut out = Vec::new();
        for simd in SimdLevel::ALL.into_iter().rev() {
            // The AVX-512 BF16 level runs f32 kernels on the AVX-512 lanes: nothing new to try.
            if simd.is_available() && simd != SimdLevel::Avx512Bf16 {
                for piece in [Some(CHUNK), Some(16 * CHUNK), None] {
                    for prefetch in [true, false] {
                        out.push(Strategy {
                            simd,
                            piece,
                            prefetch,
                        });
                    }
                }
            }
        }
        out
    }
}

/// `p += c·g` and `s_k += c·g`: one multiply and one add per array written.
struct Axpy<T> {
    c: T,
}

impl<T: Float, const B: usize> ElementOp<T, B> for Axpy<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; B]) -> V {
        let d = g * V::splat(self.c);
        for x in s.iter_mut() {
            *x = *x + d;
        }
        p + d
    }
}

/// One chunk of every array.
struct Piece<'a, T, const B: usize> {
    p: &'a mut [T],
    g: &'a [T],
    s: [&'a mut [T]; B],
}

/// Arrays shaped like an arena with up to three state buffers.
pub struct Roofline<T> {
    params: AlignedBuf<T>,
    grads: AlignedBuf<T>,
    state: Vec<AlignedBuf<T>>,
    /// Every strategy's fastest pass in seconds, fastest first, once [`Roofline::calibrate`]
    /// has measured them.
    timings: Vec<(Strategy, f64)>,
}

impl<T: Float> Roofline<T> {
    /// `len` elements per array; `reads` arrays read per element, from 2 (parameters and
    /// gradients: plain SGD) through 3 (one state buffer: SGD with momentum, Adagrad, RMSprop)
    /// and 4 (two: Adam, AdamW, RAdam, NAdam, Adamax, Adadelta, Rprop) to 5 (three: Adam with
    /// `amsgrad`, centered RMSprop). Every array but the gradients is also written. Returns
    /// `None` for any other count.
    pub fn new(len: usize, reads: usize) -> Option<Self> {
        if !(2..=5).contains(&reads) {
            return None;
        }
        Some(Roofline {
            params: AlignedBuf::filled(Role::Params, len, T::ONE),
            grads: AlignedBuf::filled(Role::Grads, len, T::from_f64(0.5)),
            state: (0..reads - 2)
                .map(|k| AlignedBuf::filled(Role::State(k), len, T::from_f64(0.25)))
                .collect(),
            timings: Vec::new(),
        })
    }

    /// Elements per array.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when the arrays are empty.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Bytes one pass reads and writes.
    pub fn bytes_moved(&self) -> usize {
        let arrays = 2 * (self.state.len() + 2) - 1;
        arrays * self.len() * std::mem::size_of::<T>()
    }

    /// One pass with the fastest [`Strategy`] (measured by [`Roofline::calibrate`] on the
    /// first call, with `parallelism`).
    pub fn run(&mut self, parallelism: &Parallelism) {
        let best = match self.strategy() {
            Some(best) => best,
            None => self.calibrate(parallelism, 3),
        };
        self.run_strategy(parallelism, best);
    }

    /// Times every [`Strategy::candidates`] `passes` times (interleaved, so drift on a shared
    /// machine hits all alike), keeps the fastest by its minimum, and returns it.
    pub fn calibrate(&mut self, parallelism: &Parallelism, passes: usize) -> Strategy {
        let candidates = Strategy::candidates();
        let mut fastest = vec![f64::INFINITY; candidates.len()];
        // One untimed pass touches every page.
        self.run_strategy(parallelism, Strategy::STEP);
        for _ in 0..passes.max(1) {
            for (s, t) in candidates.iter().zip(&mut fastest) {
                let start = Instant::now();
                self.run_strategy(parallelism, *s);
                *t = t.min(start.elapsed().as_secs_f64());
            }
        }
        self.timings = candidates.into_iter().zip(fastest).collect();
        self.timings.sort_by(|a, b| a.1.total_cmp(&b.1));
        self.timings[0].0
    }

    /// The strategy [`Roofline::run`] uses, once calibrated.
    pub fn strategy(&self) -> Option<Strategy> {
        self.timings.first().map(|t| t.0)
    }

    /// What [`Roofline::calibrate`] measured: each strategy with its fastest pass in seconds,
    /// fastest first (empty before calibration).
    pub fn timings(&self) -> &[(Strategy, f64)] {
        &self.timings
    }

    /// One pass walked as `strategy` says.
    pub fn run_strategy(&mut self, parallelism: &Parallelism, strategy: Strategy) {
        let piece = strategy.piece.unwrap_or_else(|| {
            let threads = match parallelism {
                Parallelism::Sequential => 1,
                Parallelism::Global => rayon::current_num_threads(),
                Parallelism::Pool(pool) => pool.current_num_threads(),
            };
            // Whole cache lines per span.
            self.len()
                .div_ceil(threads.max(1))
                .next_multiple_of(64)
                .max(64)
        });
        let simd = strategy.simd;
        match (self.state.len(), strategy.prefetch) {
            (0, true) => self.run_with::<0, PREFETCH_AHEAD>(parallelism, simd, piece),
            (1, true) => self.run_with::<1, PREFETCH_AHEAD>(parallelism, simd, piece),
            (2, true) => self.run_with::<2, PREFETCH_AHEAD>(parallelism, simd, piece),
            (3, true) => self.run_with::<3, PREFETCH_AHEAD>(parallelism, simd, piece),
            (0, false) => self.run_with::<0, 0>(parallelism, simd, piece),
            (1, false) => self.run_with::<1, 0>(parallelism, simd, piece),
            (2, false) => self.run_with::<2, 0>(parallelism, simd, piece),
            (3, false) => self.run_with::<3, 0>(parallelism, simd, piece),
            _ => unreachable!("`new` makes at most three state buffers"),
        }
    }

    fn run_with<const B: usize, const AHEAD: usize>(
        &mut self,
        parallelism: &Parallelism,
        simd: SimdLevel,
        piece: usize,
    ) {
        let op = Axpy {
            c: T::from_f64(1e-7),
        };
        let n = self.len();
        let mut state = self.state.iter_mut().map(|s| s.chunks_mut(piece));
        let mut state: [_; B] = std::array::from_fn(|_| state.next().expect("B state buffers"));
        let mut pieces: Vec<Piece<'_, T, B>> = self
            .params
            .chunks_mut(piece)
            .zip(self.grads.chunks(piece))
            .map(|(p, g)| Piece {
                p,
                g,
                s: std::array::from_fn(|k| state[k].next().expect("same length")),
            })
            .collect();
        for_each_piece(parallelism, n, &mut pieces, |piece| {
            let s = piece.s.each_mut().map(|s| &mut **s);
            for_each_lane_ahead::<T, B, _, AHEAD>(simd, &op, piece.p, piece.g, s)
        });
    }

    /// The parameter array (for checking that a pass did its work).
    pub fn params(&self) -> &[T] {
        &self.params
    }
}

/// The memory traffic of a mixed-precision step ([`crate::mixed`]) that a [`HalfRoofline`]
/// moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfTraffic {
    /// Modes 1 and 3 of Adam/AdamW (`Optimizer::step_half`, bf16 moments): bf16 parameters,
    /// gradients and two moments; read 4, write 3: 14 bytes per element.
    Bf16,
    /// Mode 2 of Adam/AdamW (`Optimizer::step_mixed`) with bf16 moments: f32 master
    /// parameters read and written, bf16 gradients read, two bf16 moments read and written,
    /// and the bf16 parameter copy written with streaming stores: 20 bytes per element.
    MasterBf16Moments,
    /// Mode 2 with f32 moments: as [`HalfTraffic::MasterBf16Moments`] with f32 moments:
    /// 28 bytes per element.
    Master,
}

impl HalfTraffic {
    /// Bytes one element moves (reads plus writes; the streamed copy has no read for
    /// ownership).
    pub fn bytes_per_element(self) -> usize {
        match self {
            HalfTraffic::Bf16 => 14,
            HalfTraffic::MasterBf16Moments => 20,
            HalfTraffic::Master => 28,
        }
    }
}

/// The roofline of the mixed-precision steps: the arrays of a [`HalfTraffic`], walked by the
/// steps' own mixed lane loop (bf16 widened exactly and rounded to nearest, the streamed copy,
/// pieces cut as a step cuts a run of the same length, on the pool) with the trivial update
/// `p += c·g`, `s_k += c·g`.
/// Converting bf16 is part of any such step, so it is part of this bound; what it leaves out
/// is the optimizer's arithmetic. A step near its time is limited by memory bandwidth (and
/// the conversions) alone.
pub struct HalfRoofline {
    traffic: HalfTraffic,
    master: AlignedBuf<f32>,
    params: AlignedBuf<bf16>,
    grads: AlignedBuf<bf16>,
    moments16: [AlignedBuf<bf16>; 2],
    moments32: [AlignedBuf<f32>; 2],
}

impl HalfRoofline {
    /// `len` elements per array.
    pub fn new(len: usize, traffic: HalfTraffic) -> Self {
        let half = |role, n| AlignedBuf::filled(role, n, bf16::from_f32(0.25));
        let full = |role, n| AlignedBuf::filled(role, n, 0.25f32);
        let (master, moments16, moments32) = match traffic {
            HalfTraffic::Bf16 => (
                AlignedBuf::empty(),
                [half(Role::State(0), len), half(Role::State(1), len)],
                [AlignedBuf::empty(), AlignedBuf::empty()],
            ),
            HalfTraffic::MasterBf16Moments => (
                full(Role::Params, len),
                [half(Role::State(0), len), half(Role::State(1), len)],
                [AlignedBuf::empty(), AlignedBuf::empty()],
            ),
            HalfTraffic::Master => (
                full(Role::Params, len),
                [AlignedBuf::empty(), AlignedBuf::empty()],
                [full(Role::State(0), len), full(Role::State(1), len)],
            ),
        };
        HalfRoofline {
            traffic,
            master,
            params: half(Role::Params, len),
            grads: half(Role::Grads, len),
            moments16,
            moments32,
        }
    }

    /// Elements per array.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when the arrays are empty.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Bytes one pass reads and writes.
    pub fn bytes_moved(&self) -> usize {
        self.traffic.bytes_per_element() * self.len()
    }

    /// One pass, in pieces cut and spread over `parallelism` as a step's are.
    pub fn run(&mut self, parallelism: &Parallelism) {
        let HalfRoofline {
            traffic,
            master,
            params,
            grads,
            moments16,
            moments32,
        } = self;
        match traffic {
            HalfTraffic::Bf16 => half_pass(parallelism, None, params, grads, moments16),
            HalfTraffic::MasterBf16Moments => {
                half_pass(parallelism, Some(master), params, grads, moments16)
            }
            HalfTraffic::Master => half_pass(parallelism, Some(master), params, grads, moments32),
        }
    }

    /// The bf16 parameters (the copy, for the master-weight traffics).
    pub fn params(&self) -> &[bf16] {
        &self.params
    }
}

/// One [`HalfRoofline`] pass over its arrays: bf16 parameters rounded to nearest, or (with
/// `master`) f32 master parameters and their streamed bf16 copy, and two moments in `M`.
fn half_pass<M: Storage>(
    parallelism: &Parallelism,
    master: Option<&mut AlignedBuf<f32>>,
    params: &mut [bf16],
    grads: &[bf16],
    [m, v]: &mut [AlignedBuf<M>; 2],
) {
    // A step a bf16 value can show (0.25 + 0.125·0.25 is exact), so a test can see it.
    let op = Axpy { c: 0.125f32 };
    let n = params.len();
    // A step's pieces for a run of `n` elements.
    let piece = piece_len(n);
    let mut masters = master.map(|p| p.chunks_mut(piece));
    let mut pieces: Vec<_> = params
        .chunks_mut(piece)
        .zip(grads.chunks(piece))
        .zip(m.chunks_mut(piece).zip(v.chunks_mut(piece)))
        .map(|((copy, g), (m, v))| HalfPiece {
            master: masters.as_mut().and_then(Iterator::next),
            copy,
            g,
            state: [m, v],
        })
        .collect();
    for_each_piece(parallelism, n, &mut pieces, |piece| {
        let simd = SimdLevel::Best;
        let mut state = piece.state.each_mut().map(|s| &mut **s);
        // Every slice of a piece has the piece's length (the arrays are equally long and
        // chunked alike), so the constructors cannot fail.
        let done = match piece.master.as_deref_mut() {
            None => MixedPass::new(simd, Nearest::new(piece.copy), piece.g, &mut state)
                .map(|pass| pass.run::<2, _>(&op)),
            Some(p) => MasterCopy::new(p, piece.copy).and_then(|params| {
                MixedPass::new(simd, params.streamed(true), piece.g, &mut state)
                    .map(|pass| pass.run::<2, _>(&op))
            }),
        };
        debug_assert!(done.is_ok(), "equal chunks");
    });
}

/// One chunk of a [`HalfRoofline`]'s arrays.
struct HalfPiece<'a, M> {
    /// The f32 master parameters, for the master-weight traffics.
    master: Option<&'a mut [f32]>,
    /// The bf16 parameters, or the master parameters' bf16 copy.
    copy: &'a mut [bf16],
    g: &'a [bf16],
    state: [&'a mut [M]; 2],
}

/// Runs `each` on every piece: over the pool when there is more than one piece and the arrays
/// hold `n >= PARALLEL_THRESHOLD` elements, as a step decides, else on the calling thread.
fn for_each_piece<P: Send>(
    parallelism: &Parallelism,
    n: usize,
    pieces: &mut [P],
    each: impl Fn(&mut P) + Sync + Send,
) {
    let parallel = pieces.len() > 1 && n >= PARALLEL_THRESHOLD;
    match parallelism {
        Parallelism::Global if parallel => pieces.par_iter_mut().for_each(each),
        Parallelism::Pool(pool) if parallel => {
            pool.install(|| pieces.par_iter_mut().for_each(each))
        }
        _ => pieces.iter_mut().for_each(each),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_adds_the_scaled_gradient_to_every_written_array() {
        for reads in 2..=5 {
            for strategy in Strategy::candidates() {
                let mut r = Roofline::<f64>::new(100_003, reads).unwrap();
                r.run_strategy(&Parallelism::Global, strategy);
                let d = 0.5 * 1e-7;
                assert!(r.params().iter().all(|&x| x == 1.0 + d), "{strategy:?}");
                assert!(r.state.iter().all(|s| s.iter().all(|&x| x == 0.25 + d)));
                assert!(r.grads.iter().all(|&x| x == 0.5));
                assert_eq!(r.bytes_moved(), (2 * reads - 1) * 100_003 * 8);
            }
        }
        // `run` calibrates once, then keeps to the fastest strategy.
        let mut r = Roofline::<f32>::new(100_003, 4).unwrap();
        assert_eq!(r.strategy(), None);
        r.run(&Parallelism::Sequential);
        let best = r.strategy().unwrap();
        assert!(Strategy::candidates().contains(&best));
        assert_eq!(r.timings().len(), Strategy::candidates().len());
        assert!(r.timings().windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(r.timings()[0].0, best);
        assert!(Roofline::<f32>::new(10, 6).is_none());
        assert!(Roofline::<f32>::new(10, 1).is_none());
    }

    #[test]
    fn a_half_pass_updates_every_written_array_once() {
        let d = 0.125 * 0.25;
        for traffic in [
            HalfTraffic::Bf16,
            HalfTraffic::MasterBf16Moments,
            HalfTraffic::Master,
        ] {
            for par in [Parallelism::Sequential, Parallelism::Global] {
                let n = 3 * CHUNK + 1001;
                let mut r = HalfRoofline::new(n, traffic);
                r.run(&par);
                let want = bf16::from_f32(0.25 + d);
                assert!(r.params().iter().all(|&x| x == want), "{traffic:?}");
                assert!(r.grads.iter().all(|&x| x == bf16::from_f32(0.25)));
                match traffic {
                    HalfTraffic::Bf16 => {
                        assert!(r.moments16.iter().all(|m| m.iter().all(|&x| x == want)))
                    }
                    HalfTraffic::MasterBf16Moments => {
                        assert!(r.master.iter().all(|&x| x == 0.25 + d));
                        assert!(r.moments16.iter().all(|m| m.iter().all(|&x| x == want)))
                    }
                    HalfTraffic::Master => {
                        assert!(r.master.iter().all(|&x| x == 0.25 + d));
                        assert!(r.moments32.iter().all(|m| m.iter().all(|&x| x == 0.25 + d)))
                    }
                }
                assert_eq!(r.bytes_moved(), traffic.bytes_per_element() * n);
            }
        }
    }
}
