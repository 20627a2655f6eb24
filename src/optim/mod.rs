//! The optimizers: one file per algorithm, each with its config (torch's names and defaults),
//! its update rule and its paper.

pub mod adadelta;
pub mod adafactor;
pub mod adagrad;
pub mod adam;
pub mod adamax;
pub mod asgd;
pub mod lbfgs;
pub mod muon;
pub mod nadam;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod sgd;
pub mod sparse_adam;

pub use adadelta::{Adadelta, AdadeltaAlgorithm, AdadeltaConfig};
pub use adafactor::{Adafactor, AdafactorAlgorithm, AdafactorConfig};
pub use adagrad::{Adagrad, AdagradAlgorithm, AdagradConfig};
pub use adam::{Adam, AdamAlgorithm, AdamConfig, AdamW, AdamWAlgorithm, AdamWConfig};
pub use adamax::{Adamax, AdamaxAlgorithm, AdamaxConfig};
pub use asgd::{ASGDAlgorithm, ASGDConfig, ASGDScalars, ASGD};
pub use lbfgs::{LBFGSConfig, LBFGSState, LBFGSStateDict, LineSearch, LBFGS};
pub use muon::{Muon, MuonAlgorithm, MuonConfig, NsPrecision};
pub use nadam::{NAdam, NAdamAlgorithm, NAdamConfig, NAdamScalars};
pub use radam::{RAdam, RAdamAlgorithm, RAdamConfig};
pub use rmsprop::{RMSprop, RMSpropAlgorithm, RMSpropConfig};
pub use rprop::{Rprop, RpropAlgorithm, RpropConfig};
pub use sgd::{SGDAlgorithm, SGDConfig, SGD};
pub use sparse_adam::{SparseAdam, SparseAdamConfig, SparseGrad};

// The names before torch's spelling (README's "Naming"), kept where they were so downstream code
// still builds, with a deprecation warning.
#[allow(deprecated)]
pub use asgd::{Asgd, AsgdAlgorithm, AsgdConfig, AsgdScalars};
#[allow(deprecated)]
pub use lbfgs::{Lbfgs, LbfgsConfig, LbfgsState, LbfgsStateDict};
#[allow(deprecated)]
pub use sgd::{Sgd, SgdAlgorithm, SgdConfig};
