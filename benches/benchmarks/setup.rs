//! Shared benchmark setup: arenas with deterministic values and optimizers by name.

use optarena::optim::*;
use optarena::{Arena, ArenaBuilder, Float, Parallelism, ParamGroup};

/// An arena with one parameter per shape, values and gradients set.
pub fn arena<T: Float>(shapes: &[(String, Vec<usize>)]) -> Arena<T> {
    let mut b = ArenaBuilder::<T>::new();
    for (name, shape) in shapes {
        b.param_with(name, shape, |i| {
            T::from_f64(((i % 1000) as f64 * 1e-3).sin())
        })
        .unwrap();
    }
    let mut a = b.build();
    for (i, g) in a.grads_mut().iter_mut().enumerate() {
        *g = T::from_f64(((i % 777) as f64 * 3e-3).cos() * 1e-2);
    }
    a
}

/// A steppable optimizer of any kind.
pub trait Step<T: Float> {
    fn step(&mut self, arena: &mut Arena<T>);
}

impl<T: Float, A: optarena::Algorithm> Step<T> for optarena::Optimizer<T, A> {
    fn step(&mut self, arena: &mut Arena<T>) {
        optarena::Optimizer::step(self, arena).unwrap();
    }
}

/// The optimizers benchmarked, by name, with the arrays each reads and writes per element
/// (for the roofline kernel).
pub const OPTIMIZERS: &[(&str, usize, usize)] = &[
    // (name, arrays read, arrays written)
    ("sgd_momentum", 3, 2),
    ("adam", 4, 3),
    ("adamw", 4, 3),
    ("radam", 4, 3),
];

/// Builds optimizer `name` over every parameter of `arena`.
pub fn optimizer<T: Float>(name: &str, arena: &Arena<T>, par: Parallelism) -> Box<dyn Step<T>> {
    let g = [ParamGroup::all()];
    match name {
        "sgd_momentum" => Box::new(
            Sgd::new(
                arena,
                g,
                SgdConfig {
                    lr: 1e-3,
                    momentum: 0.9,
                    ..Default::default()
                },
            )
            .unwrap()
            .with_parallelism(par),
        ),
        "adam" => Box::new(
            Adam::new(arena, g, AdamConfig::default())
                .unwrap()
                .with_parallelism(par),
        ),
        "adamw" => Box::new(
            AdamW::new(arena, g, AdamWConfig::default())
                .unwrap()
                .with_parallelism(par),
        ),
        "radam" => Box::new(
            RAdam::new(arena, g, RAdamConfig::default())
                .unwrap()
                .with_parallelism(par),
        ),
        other => panic!("no optimizer {other} in the benchmarks"),
    }
}
