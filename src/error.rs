//! The crate's one error type.
//!
//! Messages use PyTorch's wording where PyTorch has one (`Invalid learning rate: -1.0`), so a
//! user moving a training loop over recognises them. Every fallible call that returns an error
//! has left the arena and the optimizer exactly as they were.

use thiserror::Error;

/// Everything that can go wrong in optarena.
///
/// The errors of other layers keep their sources (faer's error enums are the model):
/// [`Error::Io`] holds the [`std::io::Error`] (its kind, and its own source chain), and
/// [`Error::Serde`] the JSON or safetensors error, both reachable with
/// [`std::error::Error::source`]:
///
/// ```
/// use std::error::Error as _;
///
/// let e = optarena::Error::io(
///     "opening `ckpt.safetensors`",
///     std::io::Error::from(std::io::ErrorKind::NotFound),
/// );
/// assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
/// let source = e.source().unwrap().downcast_ref::<std::io::Error>().unwrap();
/// assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
/// ```
#[derive(Debug, Error)]
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

    /// Reading or writing a file failed, or a path cannot be written to (then `source` is an
    /// [`std::io::ErrorKind::InvalidInput`] or [`std::io::ErrorKind::IsADirectory`] error made
    /// here). `source` is the operating system's error, with its
    /// [`kind`](std::io::Error::kind); [`Error::io_kind`] reads it.
    #[error("i/o: {context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The error itself.
        #[source]
        source: std::io::Error,
    },

    /// (De)serialisation failed: JSON (a state dict, a scheduler state, a checkpoint's
    /// metadata) or a safetensors header. `source` is `serde_json`'s or `safetensors`'s error.
    #[error("serialisation: {context}{}{source}", if context.is_empty() { "" } else { ": " })]
    Serde {
        /// What was being (de)serialised; empty when the source says it all.
        context: String,
        /// The error itself.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A micro-batch count of 0 was given to an accumulated step (the gradients hold the sum
    /// of `count` micro-batches, so there must be at least one).
    #[error("Invalid micro-batch count: {count}")]
    InvalidMicroBatchCount {
        /// The count given.
        count: usize,
    },

    /// `clip_grad_norm_` with `error_if_nonfinite` found a non-finite total norm (torch raises
    /// `RuntimeError` with this message). Nothing was changed.
    #[error(
        "The total norm of order {order:?} for gradients from `parameters` is non-finite, so it \
         cannot be clipped. To disable this error and scale the gradients by the non-finite \
         norm anyway, set `error_if_nonfinite=False`"
    )]
    NonFiniteTotalNorm {
        /// The norm's order (`inf` for the max norm).
        order: f64,
    },

    /// A name given to a training checkpoint's part (an optimizer, a scheduler, ...) is empty
    /// or taken twice.
    #[error("{0}")]
    CheckpointName(String),

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
        Error::Serde {
            context: String::new(),
            source: Box::new(e),
        }
    }
}

impl Error {
    /// An [`Error::Io`]: `context` says what was being done, on which path.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::Io`] for a path refused before any I/O: `why` becomes the source's message,
    /// of kind `kind`.
    pub(crate) fn bad_path(
        kind: std::io::ErrorKind,
        context: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Error::Io {
            context: context.into(),
            source: std::io::Error::new(kind, why.into()),
        }
    }

    /// An [`Error::Serde`] with what was being (de)serialised.
    pub(crate) fn serde(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Serde {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// The [`std::io::ErrorKind`] of an [`Error::Io`] (`None` for every other error).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// `Result` with optarena's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;
