//! The optimizers: one file per algorithm, each with its config (torch's names and defaults),
//! its update rule and its paper.

pub mod adam;
pub mod asgd;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod sgd;

pub use adam::{Adam, AdamAlgorithm, AdamConfig, AdamW, AdamWAlgorithm, AdamWConfig};
pub use asgd::{Asgd, AsgdAlgorithm, AsgdConfig, AsgdScalars};
pub use radam::{RAdam, RAdamAlgorithm, RAdamConfig};
pub use rmsprop::{RMSprop, RMSpropAlgorithm, RMSpropConfig};
pub use rprop::{Rprop, RpropAlgorithm, RpropConfig};
pub use sgd::{Sgd, SgdAlgorithm, SgdConfig};
