//! Checks and shapes of scheduler options: torch's `float | list[float]` per-group values.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidHyperparameter(msg.into())
}

/// A configuration value that must be a real number (optarena rejects NaN and infinity where
/// torch has no check).
pub(crate) fn finite(name: &str, x: f64) -> Result<()> {
    if !x.is_finite() {
        return Err(invalid(format!("Invalid {name} value: {x:?}")));
    }
    Ok(())
}

/// One value for every group, or one per group (torch's `float | list[float]` options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerGroup {
    /// The same value for every group.
    All(f64),
    /// One value per group, in group order.
    Each(Vec<f64>),
}

impl From<f64> for PerGroup {
    fn from(x: f64) -> Self {
        PerGroup::All(x)
    }
}

impl From<Vec<f64>> for PerGroup {
    fn from(v: Vec<f64>) -> Self {
        PerGroup::Each(v)
    }
}

impl PerGroup {
    /// torch's `_format_param(name, optimizer, param)`, with its message.
    pub(crate) fn format(&self, name: &str, n: usize) -> Result<Vec<f64>> {
        let v = match self {
            PerGroup::All(x) => vec![*x; n],
            PerGroup::Each(v) => {
                if v.len() != n {
                    return Err(invalid(format!(
                        "{name} must have the same length as optimizer.param_groups. {name} has \
                         {} values, param_groups has {n}.",
                        v.len()
                    )));
                }
                v.clone()
            }
        };
        for &x in &v {
            finite(name, x)?;
        }
        Ok(v)
    }
}

/// Generates the `with_<field>` builder steps of a scheduler config, one per field, in the
/// optimizer configs' style (`hyperparams!` in `src/hyper.rs`): each consumes the config and
/// returns it with one field set, so a config reads `StepLRConfig::new(2).with_gamma(0.5)`.
/// A field written `name: impl Into<T>` takes anything that converts into `T` (`PerGroup`
/// from `0.9` or a `Vec`, `String` from `"max"`); every other field takes its own type.
///
/// Every field of the struct must be listed: the macro also writes a private function that
/// destructures the config without `..`, so a field added later without a builder is a
/// compile error here rather than a missing setter downstream (rustc reports it as "pattern
/// requires `..` due to inaccessible fields" at the macro).
macro_rules! builders {
    ($config:ident { $($fields:tt)* }) => {
        impl $config {
            $crate::schedule::builders!(@each [] $($fields)*);
        }
    };
    (@each [$($done:ident)*]) => {
        /// Never called: compiles only if the builders above cover every field.
        #[allow(dead_code)]
        fn __builders_cover_every_field(self) {
            let Self { $($done: _),* } = self;
        }
    };
    (@each [$($done:ident)*] $field:ident : impl Into<$ty:ty> $(, $($rest:tt)*)?) => {
        ::pastey::paste! {
            #[doc = concat!("Sets `", stringify!($field), "`, as a builder step.")]
            #[must_use]
            pub fn [<with_ $field>](mut self, $field: impl Into<$ty>) -> Self {
                self.$field = $field.into();
                self
            }
        }
        $crate::schedule::builders!(@each [$($done)* $field] $($($rest)*)?);
    };
    (@each [$($done:ident)*] $field:ident : $ty:ty $(, $($rest:tt)*)?) => {
        ::pastey::paste! {
            #[doc = concat!("Sets `", stringify!($field), "`, as a builder step.")]
            #[must_use]
            pub fn [<with_ $field>](mut self, $field: $ty) -> Self {
                self.$field = $field;
                self
            }
        }
        $crate::schedule::builders!(@each [$($done)* $field] $($($rest)*)?);
    };
}
pub(crate) use builders;
