//! Saved optimizer state: what `state_dict()` returns and `load_state_dict()` takes.
//!
//! Unlike torch, which numbers parameters by position only (pytorch/pytorch#1489), every saved
//! parameter carries its arena offset, name and shape, so a checkpoint can be matched to a
//! freshly built (even reordered) model by name, and a mismatch is named instead of silently
//! loading the wrong buffer into the wrong parameter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hyper::HyperValue;

/// Version of the [`StateDict`] layout. Bumped on any incompatible change.
pub const STATE_DICT_FORMAT: u32 = 1;

/// A serialisable snapshot of an optimizer: its groups' hyperparameters and every parameter's
/// state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDict<T> {
    /// [`STATE_DICT_FORMAT`] at the time of saving.
    pub format: u32,
    /// torch's class name of the optimizer (`"Adam"`).
    pub optimizer: String,
    /// `"float32"` or `"float64"`.
    pub dtype: String,
    /// One entry per param group, in order.
    pub param_groups: Vec<GroupDict>,
    /// One entry per parameter that has state, in parameter-number order.
    pub state: Vec<ParamStateDict<T>>,
}

/// One param group: its hyperparameters and the parameters it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDict {
    /// Every hyperparameter by torch's name.
    pub hyperparams: BTreeMap<String, HyperValue>,
    /// The group's parameters, in order.
    pub params: Vec<ParamRef>,
}

/// How a saved parameter is identified: never by pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamRef {
    /// Parameter number across all groups (torch's state-dict key).
    pub index: usize,
    /// Registered name.
    pub name: String,
    /// Offset in the arena it was saved from.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
}

/// One parameter's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamStateDict<T> {
    /// The parameter's number ([`ParamRef::index`]).
    pub index: usize,
    /// Steps taken, for optimizers that count them (torch's `state["step"]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Per-parameter scalars besides `step` (ASGD's `eta` and `mu`, NAdam's `mu_product`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scalars: BTreeMap<String, f64>,
    /// State buffers by torch's name (`exp_avg`, `momentum_buffer`, ...), each the
    /// parameter's length, row-major; shaped state (Adafactor's `row_var` and `col_var`) as
    /// long as its own shape, row-major.
    pub buffers: BTreeMap<String, Vec<T>>,
}

/// How `load_state_dict` pairs saved parameters with the optimizer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatchBy {
    /// The i-th parameter of saved group g goes to the i-th parameter of group g (torch's rule).
    /// Shapes must still agree (torch does not check them); names may differ, so a model whose
    /// parameters were renamed still loads.
    #[default]
    Position,
    /// Each saved parameter goes to the parameter of the same name in the same group, so a
    /// model whose parameters were registered in another order still loads correctly.
    Name,
}
