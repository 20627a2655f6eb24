//! Once state exists, a step allocates nothing on the heap: counted by a global allocator that
//! tallies the allocations made on the current thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use optarena::optim::*;
use optarena::{Algorithm, ArenaBuilder, ClipNorm, Optimizer, Parallelism, ParamGroup};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a thread-local `Cell` that does not
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(|c| c.get())
}

fn steps_allocate_nothing<A: Algorithm>(config: A::Config) {
    steps_allocate_nothing_in::<A>(config.clone(), false);
    steps_allocate_nothing_in::<A>(config, true);
}

/// With `interleaved`, the groups are `[a, bias]` and `[b]`: the first group is two runs with
/// `b` between them, and the steps alternate with clipped ones (the norm over the runs).
fn steps_allocate_nothing_in<A: Algorithm>(config: A::Config, interleaved: bool) {
    let mut b = ArenaBuilder::<f32>::new();
    let w = b
        .param_with("adapter.a", &[128, 64], |i| (i as f32 * 0.01).sin())
        .unwrap();
    let v = b
        .param_with("adapter.b", &[64, 128], |i| (i as f32 * 0.02).cos())
        .unwrap();
    let c = b.zeros("adapter.bias", &[3]).unwrap();
    let mut arena = b.build();
    let mut opt = Optimizer::<f32, A>::new(
        &arena,
        if interleaved {
            [
                ParamGroup::new([w, c]),
                ParamGroup::new([v]).with("lr", 0.5),
            ]
        } else {
            [
                ParamGroup::new([w]),
                ParamGroup::new([v, c]).with("lr", 0.5),
            ]
        },
        config,
    )
    .unwrap()
    .with_parallelism(Parallelism::Sequential);
    arena
        .grads_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, g)| *g = (i as f32).sin());
    opt.step(&mut arena).unwrap(); // creates the state
    if interleaved {
        // Grows the norm's scratch once.
        opt.step_with_options(
            &mut arena,
            optarena::StepOptions::new().clipped(ClipNorm::l2(1.0)),
        )
        .unwrap();
    }
    let before = allocations();
    for t in 0..50 {
        arena.grads_mut().iter_mut().for_each(|g| *g *= 0.9);
        if interleaved && t % 2 == 1 {
            opt.step_with_options(
                &mut arena,
                optarena::StepOptions::new().clipped(ClipNorm::l2(1.0)),
            )
            .unwrap();
        } else {
            opt.step(&mut arena).unwrap();
        }
        opt.zero_grad(&mut arena, false).unwrap();
    }
    assert_eq!(
        allocations() - before,
        0,
        "{} allocated during steps (interleaved: {interleaved})",
        A::NAME
    );
}

#[test]
fn a_step_allocates_nothing_once_state_exists() {
    steps_allocate_nothing::<SGDAlgorithm>(
        SGDConfig::default().with_momentum(0.9).with_nesterov(true),
    );
    steps_allocate_nothing::<AdamAlgorithm>(AdamConfig::default().with_amsgrad(true));
    steps_allocate_nothing::<AdamWAlgorithm>(AdamWConfig::default());
    steps_allocate_nothing::<RAdamAlgorithm>(RAdamConfig::default());
    steps_allocate_nothing::<NAdamAlgorithm>(NAdamConfig::default());
    steps_allocate_nothing::<AdamaxAlgorithm>(AdamaxConfig::default());
    steps_allocate_nothing::<AdagradAlgorithm>(AdagradConfig::default());
    steps_allocate_nothing::<AdadeltaAlgorithm>(AdadeltaConfig::default());
    steps_allocate_nothing::<RMSpropAlgorithm>(
        RMSpropConfig::default()
            .with_centered(true)
            .with_momentum(0.9),
    );
    steps_allocate_nothing::<RpropAlgorithm>(RpropConfig::default());
    steps_allocate_nothing::<ASGDAlgorithm>(ASGDConfig::default());
    steps_allocate_nothing::<AdafactorAlgorithm>(
        AdafactorConfig::default().with_weight_decay(0.01),
    );
}

/// Muon: once state exists, a step's only heap allocations are the GEMM's: matrixmultiply
/// allocates its packing buffer on each product (it takes no caller buffer), three products per
/// Newton–Schulz iteration. The iteration's own temporaries (the transposed copy, `X Xᵀ`,
/// `b·A + c·A²` and the next `X`) live in per-thread scratch reused from the first step on, and
/// the momentum, decay and update passes allocate nothing. Counted for both precisions and
/// both orientations (wide and tall matrices), with 5 and 2 iterations.
#[test]
fn a_muon_step_allocates_only_the_gemm_packing_buffers() {
    for (precision, ns_steps) in [
        (MuonConfig::default().ns_precision, 5),
        (optarena::kernels::muon::NsPrecision::Full, 2),
    ] {
        let mut b = ArenaBuilder::<f32>::new();
        let w = b
            .param_with("attn.weight", &[48, 80], |i| (i as f32 * 0.01).sin())
            .unwrap();
        let v = b
            .param_with("mlp.weight", &[96, 32], |i| (i as f32 * 0.02).cos())
            .unwrap();
        let mut arena = b.build();
        let mut opt = Optimizer::<f32, MuonAlgorithm>::new(
            &arena,
            [ParamGroup::new([w]), ParamGroup::new([v]).with("lr", 0.5)],
            MuonConfig::default()
                .with_ns_precision(precision)
                .with_ns_steps(ns_steps),
        )
        .unwrap()
        .with_parallelism(Parallelism::Sequential);
        arena
            .grads_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, g)| *g = (i as f32).sin());
        opt.step(&mut arena).unwrap(); // creates the state and grows the scratch
        let steps = 20;
        let before = allocations();
        for _ in 0..steps {
            arena.grads_mut().iter_mut().for_each(|g| *g *= 0.9);
            opt.step(&mut arena).unwrap();
        }
        let products = steps * 2 * 3 * ns_steps;
        assert_eq!(
            allocations() - before,
            products,
            "{precision:?}: allocations besides one packing buffer per product"
        );
    }
}
