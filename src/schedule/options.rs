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
