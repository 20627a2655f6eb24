//! The crate's one error type.
//!
//! Messages use PyTorch's wording where PyTorch has one (`Invalid learning rate: -1.0`), so a
//! user moving a training loop over recognises them. Every fallible call that returns an error
//! has left the arena and the optimizer exactly as they were.

use thiserror::Error;

/// Everything that can go wrong in optarena.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A parameter group, or the list of groups, holds no parameters.
    #[error("optimizer got an empty parameter list")]
    EmptyParamList,

    /// The same parameter was given to two groups.
    #[error("some parameters appear in more than one parameter group (`{name}`)")]
    ParamInTwoGroups {
        /// The parameter's name.
        name: String,
    },

    /// The same parameter was listed twice in one group.
    #[error("optimizer contains a parameter group with duplicate parameters (`{name}`)")]
    DuplicateParamInGroup {
        /// The parameter's name.
        name: String,
    },

    /// A hyperparameter name the optimizer does not have.
    #[error("{optimizer} has no hyperparameter `{name}`; it has: {known}")]
    UnknownHyperparameter {
        /// The optimizer's name, as in torch (`"Adam"`).
        optimizer: &'static str,
        /// The name that was asked for.
        name: String,
        /// The names it has, comma-separated.
        known: String,
    },

    /// A hyperparameter was given a value of the wrong kind.
    #[error("hyperparameter `{name}` expects {expected}, got {got}")]
    HyperparameterType {
        /// The hyperparameter.
        name: String,
        /// What it takes (`"a number"`, `"a pair of numbers"`, ...).
        expected: &'static str,
        /// What it was given.
        got: String,
    },

    /// A hyperparameter value torch would reject with `ValueError`; the message is torch's.
    #[error("{0}")]
    InvalidHyperparameter(String),

    /// No parameter of that name is registered.
    #[error("no parameter named `{0}`")]
    UnknownParam(String),

    /// A parameter name was registered twice.
    #[error("a parameter named `{0}` is already registered")]
    DuplicateParamName(String),

    /// Values given for a parameter do not match its shape.
    #[error("parameter `{name}` has shape {shape:?} ({expected} values), got {got} values")]
    LengthMismatch {
        /// The parameter.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Number of values the shape holds.
        expected: usize,
        /// Number of values given.
        got: usize,
    },

    /// A handle, group index or optimizer was used with an arena it does not belong to.
    #[error("{0}")]
    ArenaMismatch(String),

    /// A group index out of range.
    #[error("no parameter group {index}; the optimizer has {count}")]
    NoSuchGroup {
        /// The index asked for.
        index: usize,
        /// The number of groups.
        count: usize,
    },

    /// A saved state does not fit this optimizer; the message names the mismatch.
    #[error("cannot load state dict: {0}")]
    StateDict(String),

    /// A binary checkpoint is unreadable (truncated, corrupt, forged or of another format);
    /// the message names what is wrong.
    #[error("bad checkpoint: {0}")]
    Checkpoint(String),

    /// A collective failed, or the ranks of a distributed run disagree (layout, groups).
    #[error("distributed: {0}")]
    Distributed(String),

    /// Reading or writing a file failed.
    #[error("i/o: {0}")]
    Io(String),

    /// (De)serialisation failed.
    #[error("serialisation: {0}")]
    Serde(String),

    /// A gradient was NaN or infinite and the checked step refused it.
    #[error("non-finite gradient in parameter `{name}`: the step was skipped and nothing changed")]
    NonFiniteGradient {
        /// The first parameter found with a non-finite gradient.
        name: String,
    },

    /// The closure passed to `step_with` failed.
    #[error("closure failed: {0}")]
    Closure(String),

    /// An LR scheduler could not step or load: stepping past `total_steps`, a division by zero
    /// torch would raise `ZeroDivisionError` for, a missing `initial_lr`, a different number of
    /// param groups. The message is torch's where torch has one.
    #[error("{0}")]
    Scheduler(String),

    /// A gradient `SparseAdam` cannot take: a dense gradient (torch's message), a row index
    /// out of range, values that are not `rows × cols` long, a parameter that is not the
    /// optimizer's or appears twice. Nothing was changed.
    #[error("{0}")]
    SparseGrad(String),

    /// A mixed-precision call was given buffers or settings it cannot use (a buffer of another
    /// arena or length, an algorithm without a mixed-precision kernel, bf16 state where f32
    /// is needed): nothing changed.
    #[error("mixed precision: {0}")]
    MixedPrecision(String),
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Serde(e.to_string())
    }
}

/// `Result` with optarena's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;
