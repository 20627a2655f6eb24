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

impl<T: Float> Step<T> for LBFGS<T> {
    /// One L-BFGS iteration on `f(p) = ½‖p − 1‖²`: the closure writes `g = p − 1` (one
    /// pass) and the step runs the two-loop recursion over its history.
    fn step(&mut self, arena: &mut Arena<T>) {
        LBFGS::step(self, arena, |a| {
            let (p, g) = a.params_and_grads_mut();
            for (g, &p) in g.iter_mut().zip(p.iter()) {
                *g = p - T::ONE;
            }
            T::ZERO
        })
        .unwrap();
    }
}

/// The optimizers benchmarked, by name, with the arrays each reads and writes per element
/// (for the roofline kernel; L-BFGS is not elementwise and has none).
pub const OPTIMIZERS: &[(&str, usize, usize)] = &[
    // (name, arrays read, arrays written)
    ("sgd", 2, 1),
    ("sgd_momentum", 3, 2),
    ("adam", 4, 3),
    ("adamw", 4, 3),
    ("radam", 4, 3),
    ("nadam", 4, 3),
    ("adamax", 4, 3),
    ("adagrad", 3, 2),
    ("adadelta", 4, 3),
    ("rmsprop", 3, 2),
    ("rprop", 4, 3),
    ("asgd", 3, 2),
    // A flat (1-D) parameter keeps a full-size variance, like RMSprop.
    ("adafactor", 3, 2),
    ("lbfgs", 0, 0),
];

/// Builds optimizer `name` over every parameter of `arena` (torch's defaults, SGD with
/// `lr = 1e-3`, L-BFGS with one iteration per step and torch's history of 100).
pub fn optimizer<T: Float>(name: &str, arena: &Arena<T>, par: Parallelism) -> Box<dyn Step<T>> {
    let g = [ParamGroup::all()];
    macro_rules! make {
        ($opt:ident, $config:expr) => {
            Box::new($opt::new(arena, g, $config).unwrap().with_parallelism(par))
        };
    }
    match name {
        "sgd" => make!(SGD, SGDConfig::default().with_lr(1e-3)),
        "sgd_momentum" => make!(SGD, SGDConfig::default().with_lr(1e-3).with_momentum(0.9)),
        "adam" => make!(Adam, AdamConfig::default()),
        "adamw" => make!(AdamW, AdamWConfig::default()),
        "radam" => make!(RAdam, RAdamConfig::default()),
        "nadam" => make!(NAdam, NAdamConfig::default()),
        "adamax" => make!(Adamax, AdamaxConfig::default()),
        "adagrad" => make!(Adagrad, AdagradConfig::default()),
        "adadelta" => make!(Adadelta, AdadeltaConfig::default()),
        "rmsprop" => make!(RMSprop, RMSpropConfig::default()),
        "rprop" => make!(Rprop, RpropConfig::default()),
        "asgd" => make!(ASGD, ASGDConfig::default()),
        "adafactor" => make!(Adafactor, AdafactorConfig::default()),
        // L-BFGS runs on the calling thread (its reductions are sequential, as torch's).
        "lbfgs" => Box::new(LBFGS::new(arena, g, LBFGSConfig::default().with_max_iter(1)).unwrap()),
        other => panic!("no optimizer {other} in the benchmarks"),
    }
}
