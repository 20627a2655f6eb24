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
//! Steps 2 and 3 over all groups are [`match_groups`]; a saved per-parameter state finds its
//! target with [`state_target`] and [`stage_once`], its step with [`saved_step`], and a saved
//! buffer's length is checked by [`check_buffer_len`].
//!
//! The JSON `load_state_dict` and the binary checkpoint load of an elementwise
//! [`Optimizer`](super::Optimizer) share step 4 too ([`Optimizer::stage_load`](super::Optimizer)
//! and `commit_staged`, in `checkpoint_access.rs`), as do [`SparseAdam`](crate::SparseAdam)'s
//! two loads (`SparseAdam::stage_load` and `commit_staged`); L-BFGS stages its own flat vectors
//! and history (`LBFGSLoad`), checked by the same functions. On any error nothing has changed.
//!
//! A whole model's saved values (a checkpoint's `params`, an
//! [`AveragedModel`](crate::AveragedModel)'s averaged copy, in JSON or binary) are paired with
//! the arena's parameters by name by [`match_model`], torch's strict `load_state_dict` of a
//! model.

use std::collections::BTreeMap;

use super::SavedState;
use crate::arena::ParamInfo;
use crate::error::{Error, Result};
use crate::hyper::{HyperValue, Hyperparams};
use crate::state::{GroupDict, MatchBy, ParamRef, ParamStateDict, STATE_DICT_FORMAT};

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

/// Calls `f` with a JSON state dict's per-parameter states as the pipeline reads them (the
/// binary load reads them from the checkpoint's metadata).
pub(crate) fn with_saved_states<T, R>(
    state: &[ParamStateDict<T>],
    f: impl FnOnce(&[SavedState<'_>]) -> R,
) -> R {
    let names: Vec<Vec<String>> = state
        .iter()
        .map(|ps| ps.buffers.keys().cloned().collect())
        .collect();
    let states: Vec<SavedState<'_>> = state
        .iter()
        .zip(&names)
        .map(|(ps, buffers)| SavedState {
            index: ps.index,
            step: ps.step,
            scalars: &ps.scalars,
            buffers,
        })
        .collect();
    f(&states)
}

/// Saved parameter number -> (group, position in the group) it loads into.
pub(crate) type Targets = BTreeMap<usize, (usize, usize)>;

/// Steps 2 and 3 over every group: as many saved groups as `ours` (each group's current config
/// and its parameters' arena positions), each group's config after the load (`config(gi,
/// current, saved hyperparameters)`), and its saved parameters paired with its own
/// ([`match_params`]). Returns the configs and, for each saved parameter number, the group and
/// the position in that group it loads into; a number listed twice is an error.
pub(crate) fn match_groups<C>(
    saved: &[GroupDict],
    ours: &[(&C, &[usize])],
    layout: &[ParamInfo],
    by: MatchBy,
    mut config: impl FnMut(usize, &C, &BTreeMap<String, HyperValue>) -> Result<C>,
) -> Result<(Vec<C>, Targets)> {
    check_group_count(saved.len(), ours.len())?;
    let mut target = BTreeMap::new();
    let mut configs = Vec::with_capacity(ours.len());
    for (gi, (sg, &(current, params))) in saved.iter().zip(ours).enumerate() {
        configs.push(config(gi, current, &sg.hyperparams)?);
        let matched = match_params(gi, &sg.params, params, layout, by)?;
        for (pr, j) in sg.params.iter().zip(matched) {
            if target.insert(pr.index, (gi, j)).is_some() {
                return bad(format!("parameter number {} appears twice", pr.index));
            }
        }
    }
    Ok((configs, target))
}

/// The (group, position) that the saved state of parameter number `index` loads into
/// ([`match_groups`]'s targets): a number no group lists is an error.
pub(crate) fn state_target(targets: &Targets, index: usize) -> Result<(usize, usize)> {
    targets.get(&index).copied().ok_or_else(|| {
        Error::StateDict(format!(
            "state for parameter number {index} which no group lists"
        ))
    })
}

/// Stages parameter `name`'s saved state in `slot`, which must still be empty: a parameter has
/// at most one saved state.
pub(crate) fn stage_once<X>(slot: &mut Option<X>, name: &str, state: X) -> Result<()> {
    if slot.replace(state).is_some() {
        return bad(format!("parameter `{name}` has two saved states"));
    }
    Ok(())
}

/// The step count of parameter `name`'s saved state, which an optimizer that counts steps
/// needs.
pub(crate) fn saved_step(name: &str, step: Option<u64>) -> Result<u64> {
    step.ok_or_else(|| Error::StateDict(format!("parameter `{name}` has no step count")))
}

/// A saved buffer `buffer` of parameter `param` holds `got` values where the load keeps
/// `want`.
pub(crate) fn check_buffer_len(buffer: &str, param: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return bad(format!(
            "buffer `{buffer}` of parameter `{param}` has {got} values, the parameter has {want}"
        ));
    }
    Ok(())
}

/// Pairs a whole model's saved values with the parameters of `layout` by name, as torch's
/// strict `load_state_dict` of a model: each saved name (with its shape, when the saved
/// description has one) must be a parameter of `layout`, once, with that shape, and every
/// parameter of `layout` must be saved. Returns, in saved order, each one's position in
/// `layout`. The messages say where the values come from (`source`: "the checkpoint") and
/// whose parameters they are (`owner`: "the arena", "this model").
pub(crate) fn match_model<'s>(
    layout: &[ParamInfo],
    saved: impl IntoIterator<Item = (&'s str, Option<&'s [usize]>)>,
    source: &str,
    owner: &str,
) -> Result<Vec<usize>> {
    let by_name: BTreeMap<&str, usize> = layout
        .iter()
        .enumerate()
        .map(|(i, info)| (info.name.as_str(), i))
        .collect();
    let mut seen = vec![false; layout.len()];
    let mut out = Vec::with_capacity(layout.len());
    for (name, shape) in saved {
        let &i = by_name.get(name).ok_or_else(|| {
            Error::StateDict(format!(
                "{source} stores parameter `{name}`, which {owner} does not have"
            ))
        })?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(Error::Checkpoint(format!(
                "parameter `{name}` is stored twice"
            )));
        }
        if let Some(shape) = shape.filter(|&s| s != layout[i].shape) {
            return bad(format!(
                "parameter `{name}` has shape {shape:?} in {source} and {:?} in {owner}",
                layout[i].shape
            ));
        }
        out.push(i);
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return bad(format!(
            "{source} does not store parameter `{}`",
            layout[i].name
        ));
    }
    Ok(out)
}
