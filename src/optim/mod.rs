//! The optimizers: one file per algorithm, each with its config (torch's names and defaults),
//! its update rule and its paper.

pub mod adam;
pub mod lbfgs;
pub mod radam;
pub mod sgd;

pub use adam::{Adam, AdamAlgorithm, AdamConfig, AdamW, AdamWAlgorithm, AdamWConfig};
pub use lbfgs::{Lbfgs, LbfgsConfig, LbfgsState, LbfgsStateDict};
pub use radam::{RAdam, RAdamAlgorithm, RAdamConfig};
pub use sgd::{Sgd, SgdAlgorithm, SgdConfig};
