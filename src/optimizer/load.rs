//! The one load pipeline: the checks every load of optimizer state makes, with one set of
//! messages.
//!
//! A load reads a saved description (a [`StateDict`](crate::StateDict), a binary checkpoint's
//! metadata, an [`LBFGSStateDict`](crate::LBFGSStateDict)) and
//! 1. checks its header: format version, optimizer kind, dtype field ([`check_header`],
//!    [`check_kind`]);
//! 2. checks the number of groups ([`check_group_count`]);
//! 3. per group, applies the saved hyperparameters over the current ones and validates them
//!    ([`saved_config`]), and pairs the saved parameters with the group's, by position or by
//!    name, checking shapes ([`match_params`]);
//! 4. stages only what it replaces (new state buffers, never a copy of the optimizer's groups),
//!    fills the staged buffers, and commits by swapping, which cannot fail.
//!
//! The JSON `load_state_dict` and the binary checkpoint load of an elementwise
//! [`Optimizer`](super::Optimizer) share step 4 too ([`Optimizer::stage_load`](super::Optimizer)
//! and `commit_staged`, in `checkpoint_access.rs`); L-BFGS stages its own flat vectors and
//! history (`LBFGSLoad`), checked by the same functions. On any error nothing has changed.

use std::collections::BTreeMap;

use crate::arena::ParamInfo;
use crate::error::{Error, Result};
use crate::hyper::{HyperValue, Hyperparams};
use crate::state::{MatchBy, ParamRef, STATE_DICT_FORMAT};

/// A [`Error::StateDict`] with message `m`.
pub(crate) fn bad<X>(m: String) -> Result<X> {
    Err(Error::StateDict(m))
}

/// The saved optimizer kind must be this one's (`kind`, torch's class name).
pub(crate) fn check_kind(saved: &str, kind: &str) -> Result<()> {
    if saved != kind {
        return bad(format!(
            "it was saved by the {saved} optimizer, this is {kind}"
        ));
    }
    Ok(())
}

/// A state dict's header: the format version this build reads, this optimizer's kind, and a
/// dtype field that says what its values were read as (`read_as`).
pub(crate) fn check_header(
    format: u32,
    optimizer: &str,
    dtype: &str,
    kind: &str,
    read_as: &str,
) -> Result<()> {
    if format != STATE_DICT_FORMAT {
        return bad(format!(
            "format version {format} is not supported (this build reads {STATE_DICT_FORMAT})"
        ));
    }
    check_kind(optimizer, kind)?;
    if dtype != read_as {
        return bad(format!(
            "its dtype field says {dtype} but its values were read as {read_as}"
        ));
    }
    Ok(())
}

/// The saved description has as many groups as the optimizer.
pub(crate) fn check_group_count(saved: usize, ours: usize) -> Result<()> {
    if saved != ours {
        return bad(format!(
            "it has {saved} parameter groups, the optimizer has {ours}"
        ));
    }
    Ok(())
}

/// Group `gi`'s config after a load: `current` with the saved hyperparameters set over it,
/// validated. An unknown name or an invalid value names the group.
pub(crate) fn saved_config<C: Hyperparams>(
    gi: usize,
    current: &C,
    saved: &BTreeMap<String, HyperValue>,
) -> Result<C> {
    let in_group = |e: Error| Error::StateDict(format!("group {gi}: {e}"));
    let mut config = current.clone();
    for (name, value) in saved {
        config.set(name, value).map_err(in_group)?;
    }
    config.validate().map_err(in_group)?;
    Ok(config)
}

/// Pairs the saved parameters of group `gi` with the group's own (`ours`, arena positions into
/// `layout`): for each saved parameter, in saved order, the position in `ours` it loads into.
///
/// By [`MatchBy::Position`] the k-th saved parameter is the k-th of the group (torch's rule);
/// by [`MatchBy::Name`] they are paired by registered name. Either way the counts must agree,
/// no two saved parameters may land on one, and the shapes must be equal.
pub(crate) fn match_params(
    gi: usize,
    saved: &[ParamRef],
    ours: &[usize],
    layout: &[ParamInfo],
    by: MatchBy,
) -> Result<Vec<usize>> {
    if saved.len() != ours.len() {
        return bad(format!(
            "group {gi} has {} parameters in the saved state and {} in the optimizer",
            saved.len(),
            ours.len()
        ));
    }
    let by_name: BTreeMap<&str, usize> = match by {
        MatchBy::Position => BTreeMap::new(),
        MatchBy::Name => ours
            .iter()
            .enumerate()
            .map(|(j, &i)| (layout[i].name.as_str(), j))
            .collect(),
    };
    let mut used = vec![false; ours.len()];
    let mut out = Vec::with_capacity(saved.len());
    for (pos, pr) in saved.iter().enumerate() {
        let j = match by {
            MatchBy::Position => pos,
            MatchBy::Name => *by_name.get(pr.name.as_str()).ok_or_else(|| {
                Error::StateDict(format!("group {gi} has no parameter named `{}`", pr.name))
            })?,
        };
        let info = &layout[ours[j]];
        if std::mem::replace(&mut used[j], true) {
            return bad(format!(
                "group {gi}: two saved parameters map to `{}`",
                info.name
            ));
        }
        if info.shape != pr.shape {
            return bad(format!(
                "parameter `{}` has shape {:?} in the saved state and `{}` has shape {:?}",
                pr.name, pr.shape, info.name, info.shape
            ));
        }
        out.push(j);
    }
    Ok(out)
}
