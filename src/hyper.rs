//! Hyperparameters: typed config structs with torch's names, readable and writable by name.
//!
//! Each optimizer has a config struct (`AdamConfig`, ...) whose fields carry torch's keyword
//! names and whose `Default` is torch's default. Schedulers and state dicts reach the fields by
//! name through [`Hyperparams`], with values carried as [`HyperValue`].

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A hyperparameter value, as torch keeps it in a param group dict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HyperValue {
    /// A flag (`amsgrad`, `nesterov`, ...).
    Bool(bool),
    /// A number (`lr`, `eps`, ...). Integers are carried as numbers too.
    Number(f64),
    /// A pair (`betas`, `etas`, `step_sizes`).
    Pair(f64, f64),
    /// A pair whose first element may be absent (Adafactor's `eps = (None, 1e-3)`).
    OptPair(Option<f64>, f64),
    /// A triple (Muon's `ns_coefficients`).
    Triple(f64, f64, f64),
    /// An absent value (`None` in torch).
    None,
    /// A name (LBFGS's `line_search_fn`).
    Str(String),
}

impl std::fmt::Display for HyperValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HyperValue::Bool(b) => write!(f, "{}", if *b { "True" } else { "False" }),
            HyperValue::Number(x) => write!(f, "{x:?}"),
            HyperValue::Pair(a, b) => write!(f, "({a:?}, {b:?})"),
            HyperValue::OptPair(a, b) => match a {
                Some(a) => write!(f, "({a:?}, {b:?})"),
                None => write!(f, "(None, {b:?})"),
            },
            HyperValue::Triple(a, b, c) => write!(f, "({a:?}, {b:?}, {c:?})"),
            HyperValue::None => write!(f, "None"),
            HyperValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl From<f64> for HyperValue {
    fn from(x: f64) -> Self {
        HyperValue::Number(x)
    }
}
impl From<bool> for HyperValue {
    fn from(x: bool) -> Self {
        HyperValue::Bool(x)
    }
}
impl From<(f64, f64)> for HyperValue {
    fn from((a, b): (f64, f64)) -> Self {
        HyperValue::Pair(a, b)
    }
}
impl From<usize> for HyperValue {
    fn from(x: usize) -> Self {
        HyperValue::Number(x as f64)
    }
}

/// A Rust type a hyperparameter field can have.
pub trait HyperField: Sized {
    /// Converts the field to a [`HyperValue`].
    fn to_value(&self) -> HyperValue;
    /// Converts a [`HyperValue`] back, or names what was expected.
    fn from_value(name: &str, v: &HyperValue) -> Result<Self>;
}

fn type_error(name: &str, expected: &'static str, got: &HyperValue) -> Error {
    Error::HyperparameterType {
        name: name.to_string(),
        expected,
        got: got.to_string(),
    }
}

impl HyperField for f64 {
    fn to_value(&self) -> HyperValue {
        HyperValue::Number(*self)
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Number(x) => Ok(*x),
            other => Err(type_error(name, "a number", other)),
        }
    }
}

impl HyperField for bool {
    fn to_value(&self) -> HyperValue {
        HyperValue::Bool(*self)
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Bool(x) => Ok(*x),
            other => Err(type_error(name, "true or false", other)),
        }
    }
}

impl HyperField for (f64, f64) {
    fn to_value(&self) -> HyperValue {
        HyperValue::Pair(self.0, self.1)
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Pair(a, b) => Ok((*a, *b)),
            HyperValue::OptPair(Some(a), b) => Ok((*a, *b)),
            other => Err(type_error(name, "a pair of numbers", other)),
        }
    }
}

impl HyperField for (f64, f64, f64) {
    fn to_value(&self) -> HyperValue {
        HyperValue::Triple(self.0, self.1, self.2)
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Triple(a, b, c) => Ok((*a, *b, *c)),
            other => Err(type_error(name, "three numbers", other)),
        }
    }
}

impl HyperField for usize {
    fn to_value(&self) -> HyperValue {
        HyperValue::Number(*self as f64)
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Number(x) if *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15 => {
                Ok(*x as usize)
            }
            other => Err(type_error(name, "a non-negative whole number", other)),
        }
    }
}

impl HyperField for Option<usize> {
    fn to_value(&self) -> HyperValue {
        match self {
            Some(x) => x.to_value(),
            None => HyperValue::None,
        }
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::None => Ok(None),
            HyperValue::Number(_) => usize::from_value(name, v).map(Some),
            other => Err(type_error(
                name,
                "a non-negative whole number or None",
                other,
            )),
        }
    }
}

impl HyperField for Option<f64> {
    fn to_value(&self) -> HyperValue {
        match self {
            Some(x) => HyperValue::Number(*x),
            None => HyperValue::None,
        }
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Number(x) => Ok(Some(*x)),
            HyperValue::None => Ok(None),
            other => Err(type_error(name, "a number or None", other)),
        }
    }
}

impl HyperField for (Option<f64>, f64) {
    fn to_value(&self) -> HyperValue {
        match self.0 {
            Some(a) => HyperValue::Pair(a, self.1),
            None => HyperValue::OptPair(None, self.1),
        }
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Pair(a, b) => Ok((Some(*a), *b)),
            HyperValue::OptPair(a, b) => Ok((*a, *b)),
            other => Err(type_error(name, "a pair (number or None, number)", other)),
        }
    }
}

impl HyperField for Option<String> {
    fn to_value(&self) -> HyperValue {
        match self {
            Some(s) => HyperValue::Str(s.clone()),
            None => HyperValue::None,
        }
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Str(s) => Ok(Some(s.clone())),
            HyperValue::None => Ok(None),
            other => Err(type_error(name, "a name or None", other)),
        }
    }
}

/// A config struct whose fields can be read and written by torch's keyword names.
pub trait Hyperparams:
    Clone + Default + std::fmt::Debug + PartialEq + Send + Sync + 'static
{
    /// The optimizer's torch class name, for messages.
    const OPTIMIZER: &'static str;
    /// Every field name, in declaration order.
    const NAMES: &'static [&'static str];
    /// The value of field `name`.
    fn get(&self, name: &str) -> Result<HyperValue>;
    /// Sets field `name`, checking the value's kind (not its range: see
    /// [`Hyperparams::validate`]).
    fn set(&mut self, name: &str, value: &HyperValue) -> Result<()>;
    /// Checks every value as torch's constructor does, with torch's messages.
    fn validate(&self) -> Result<()>;
}

pub(crate) fn unknown<H: Hyperparams>(name: &str) -> Error {
    Error::UnknownHyperparameter {
        optimizer: H::OPTIMIZER,
        name: name.to_string(),
        known: H::NAMES.join(", "),
    }
}

/// Declares an optimizer config struct: pub fields with torch's names and defaults, `Default`,
/// serde, and [`Hyperparams`] by name. Validation is written by hand beside it.
macro_rules! hyperparams {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident for $optim:literal {
            $(
                $(#[$fmeta:meta])*
                $field:ident : $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[$meta])*
        ///
        /// Build it from torch's defaults with the `with_*` builders (burn's config style),
        /// or set fields by torch's name with `with`; the struct is `#[non_exhaustive]`, so a
        /// torch option added later is not a breaking change:
        ///
        /// ```
        #[doc = concat!("let config = optarena::", stringify!($name), "::new()")]
        #[doc = "    .with_lr(0.01);"]
        #[doc = "assert_eq!(config.lr, 0.01);"]
        /// ```
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        #[non_exhaustive]
        $vis struct $name {
            $(
                $(#[$fmeta])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $($field: $default,)* }
            }
        }

        impl $name {
            /// torch's defaults (the same as `Default::default()`).
            pub fn new() -> Self {
                Self::default()
            }

            ::pastey::paste! {
                $(
                    #[doc = concat!("Sets `", stringify!($field), "`, as a builder step.")]
                    #[must_use]
                    pub fn [<with_ $field>](mut self, $field: $ty) -> Self {
                        self.$field = $field;
                        self
                    }
                )*
            }

            /// Sets a field by its torch name, as a builder step.
            pub fn with(mut self, name: &str, value: impl Into<$crate::hyper::HyperValue>)
                -> $crate::error::Result<Self> {
                $crate::hyper::Hyperparams::set(&mut self, name, &value.into())?;
                Ok(self)
            }
        }

        impl $crate::hyper::Hyperparams for $name {
            const OPTIMIZER: &'static str = $optim;
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
            fn get(&self, name: &str) -> $crate::error::Result<$crate::hyper::HyperValue> {
                match name {
                    $(stringify!($field) =>
                        Ok($crate::hyper::HyperField::to_value(&self.$field)),)*
                    _ => Err($crate::hyper::unknown::<Self>(name)),
                }
            }
            fn set(&mut self, name: &str, value: &$crate::hyper::HyperValue)
                -> $crate::error::Result<()> {
                match name {
                    $(stringify!($field) => {
                        self.$field = $crate::hyper::HyperField::from_value(name, value)?;
                        Ok(())
                    })*
                    _ => Err($crate::hyper::unknown::<Self>(name)),
                }
            }
            fn validate(&self) -> $crate::error::Result<()> {
                self.check()
            }
        }
    };
}
pub(crate) use hyperparams;

/// Validation helpers with torch's exact messages.
pub(crate) mod check {
    use crate::error::{Error, Result};

    fn invalid(msg: String) -> Result<()> {
        Err(Error::InvalidHyperparameter(msg))
    }

    /// `0.0 <= lr` (NaN fails), torch: `Invalid learning rate: {lr}`.
    pub fn lr(lr: f64) -> Result<()> {
        if lr.is_nan() || lr < 0.0 {
            return invalid(format!("Invalid learning rate: {lr:?}"));
        }
        Ok(())
    }

    /// `0.0 <= eps`, torch: `Invalid epsilon value: {eps}`.
    pub fn eps(eps: f64) -> Result<()> {
        if eps.is_nan() || eps < 0.0 {
            return invalid(format!("Invalid epsilon value: {eps:?}"));
        }
        Ok(())
    }

    /// `0.0 <= b < 1.0` for both betas.
    pub fn betas(b: (f64, f64)) -> Result<()> {
        for (i, beta) in [b.0, b.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&beta) {
                return invalid(format!("Invalid beta parameter at index {i}: {beta:?}"));
            }
        }
        Ok(())
    }

    /// `0.0 <= weight_decay`.
    pub fn weight_decay(wd: f64) -> Result<()> {
        if wd.is_nan() || wd < 0.0 {
            return invalid(format!("Invalid weight_decay value: {wd:?}"));
        }
        Ok(())
    }

    /// `0.0 <= momentum`.
    pub fn momentum(m: f64) -> Result<()> {
        if m.is_nan() || m < 0.0 {
            return invalid(format!("Invalid momentum value: {m:?}"));
        }
        Ok(())
    }

    /// `0.0 <= x` (NaN fails), torch's `Invalid {name} value: {x}` (`lr_decay`,
    /// `momentum_decay`, `initial_accumulator_value`, RMSprop's and ASGD's `alpha`, ASGD's
    /// `lambd`, ...).
    pub fn non_negative(name: &str, x: f64) -> Result<()> {
        if x.is_nan() || x < 0.0 {
            return invalid(format!("Invalid {name} value: {x:?}"));
        }
        Ok(())
    }

    /// A value that must be a real number (not NaN or infinite) where torch has no check.
    pub fn finite(name: &str, x: f64) -> Result<()> {
        if !x.is_finite() {
            return invalid(format!("Invalid {name} value: {x:?}"));
        }
        Ok(())
    }
}

/// Any optimizer's param groups, reached by torch's hyperparameter names: what LR schedulers
/// and hooks act on. Object-safe, so a scheduler can drive any optimizer.
pub trait GroupHyperparams {
    /// Number of param groups.
    fn num_groups(&self) -> usize;
    /// One hyperparameter of group `group`.
    fn group_hyper(&self, group: usize, name: &str) -> Result<HyperValue>;
    /// Sets one hyperparameter of group `group`, checking it; on error nothing changes.
    fn set_group_hyper(&mut self, group: usize, name: &str, value: HyperValue) -> Result<()>;

    /// The learning rate of group `group`: the same name and meaning as the inherent
    /// `lr(group)` of [`Optimizer`](crate::Optimizer), [`SparseAdam`](crate::SparseAdam) and
    /// [`ShardedOptimizer`](crate::distributed::ShardedOptimizer), for code generic over
    /// optimizers (schedulers, hooks). [`LBFGS`](crate::LBFGS)'s inherent `lr()` takes no
    /// group (it has one, as torch's): call this one as `GroupHyperparams::lr(&opt, 0)`.
    fn lr(&self, group: usize) -> Result<f64> {
        f64::from_value("lr", &self.group_hyper(group, "lr")?)
    }
    /// Sets the learning rate of group `group`, checking it; on error nothing changes. The
    /// one lr setter: the same name and meaning as the inherent `set_lr(group, lr)` of
    /// [`Optimizer`](crate::Optimizer), [`SparseAdam`](crate::SparseAdam) and
    /// [`ShardedOptimizer`](crate::distributed::ShardedOptimizer), which need no trait in
    /// scope; this method serves code generic over optimizers (schedulers, hooks).
    /// `set_group_hyper(group, "lr", ..)` (and each optimizer's `set_hyper`) is the by-name
    /// access for any hyperparameter. [`LBFGS`](crate::LBFGS)'s inherent `set_lr(lr)` takes
    /// no group (it has one, as torch's): call this one as
    /// `GroupHyperparams::set_lr(&mut opt, 0, lr)`.
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.set_group_hyper(group, "lr", HyperValue::Number(lr))
    }
    /// The name of [`lr`](GroupHyperparams::lr) before it matched the optimizers' own.
    #[deprecated(since = "0.2.0", note = "use `lr(group)`, the optimizers' own name")]
    #[doc(hidden)]
    fn group_lr(&self, group: usize) -> Result<f64> {
        self.lr(group)
    }
    /// The name of [`set_lr`](GroupHyperparams::set_lr) before it matched the optimizers' own.
    #[deprecated(
        since = "0.2.0",
        note = "use `set_lr(group, lr)`, the optimizers' own name"
    )]
    #[doc(hidden)]
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.set_lr(group, lr)
    }

    /// torch's `group["initial_lr"]`: the learning rate the first LR scheduler attached to the
    /// group found there, shared by every scheduler attached later (see [`crate::schedule`]).
    /// `None` until a scheduler sets it, and for a group added after the schedulers were
    /// built (torch's `add_param_group` gives it none either).
    ///
    /// Required: a scheduler's `setdefault`, its resume and `SequentialLR`'s reset all read
    /// it, so an implementor that does not keep it would schedule silently wrong lrs.
    fn group_initial_lr(&self, group: usize) -> Result<Option<f64>>;
    /// Sets (or, with `None`, clears) `group["initial_lr"]`; an error for a group that does
    /// not exist.
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()>;
}
