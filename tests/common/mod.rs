//! Test support: the fixture format of `SCHEMA.md` (deterministic inputs, base64 arrays) and
//! runners that replay PyTorch-recorded cases through optarena.
#![allow(dead_code, clippy::single_range_in_vec_init)]

use std::path::{Path, PathBuf};

use base64::Engine;
use optarena::{
    Algorithm, ArenaBuilder, Float, HyperValue, Hyperparams, Optimizer, Parallelism, ParamGroup,
    Subnormals,
};
use serde_json::Value;

mod averaged;
pub mod bf16;
mod clip;
mod compare;
mod elementwise;
mod fixtures;
mod inputs;
mod lbfgs;
mod pyexpr;
mod schedulers;
mod sparse;

pub use averaged::*;
pub use clip::*;
pub use compare::*;
pub use elementwise::*;
pub use fixtures::*;
pub use inputs::*;
pub use lbfgs::*;
pub use pyexpr::*;
pub use schedulers::*;
pub use sparse::*;
