//! How a scheduler reads and writes an optimizer's groups (through [`GroupHyperparams`]):
//! `lr`, the cycled momentum, and the checks that the groups are the ones it was built for.

use crate::error::{Error, Result};
use crate::hyper::{GroupHyperparams, HyperField, HyperValue};

/// Every group's `lr`.
pub(crate) fn group_lrs(opt: &dyn GroupHyperparams) -> Result<Vec<f64>> {
    (0..opt.num_groups()).map(|g| opt.lr(g)).collect()
}

/// Sets every group's `lr`, and `momentum` (or `betas.0` when `use_beta1`) if given.
pub(crate) fn apply(
    opt: &mut dyn GroupHyperparams,
    lrs: &[f64],
    momentum: Option<(&[f64], bool)>,
) -> Result<()> {
    check_groups(opt, lrs.len())?;
    for (g, &lr) in lrs.iter().enumerate() {
        opt.set_lr(g, lr)?;
        if let Some((m, use_beta1)) = momentum {
            set_momentum(opt, g, m[g], use_beta1)?;
        }
    }
    Ok(())
}

/// Sets `momentum`, or the first of `betas`, of group `g` (torch's
/// `group["betas"] = (m, *group["betas"][1:])`).
pub(crate) fn set_momentum(
    opt: &mut dyn GroupHyperparams,
    g: usize,
    m: f64,
    use_beta1: bool,
) -> Result<()> {
    if use_beta1 {
        let (_, b2) = <(f64, f64)>::from_value("betas", &opt.group_hyper(g, "betas")?)?;
        opt.set_group_hyper(g, "betas", HyperValue::Pair(m, b2))
    } else {
        opt.set_group_hyper(g, "momentum", HyperValue::Number(m))
    }
}

/// Whether the optimizer's groups have `momentum` / `betas` (torch looks at
/// `optimizer.defaults`; every group has the same keys). Returns `use_beta1`, or `None` when
/// it has neither.
pub(crate) fn momentum_kind(opt: &dyn GroupHyperparams) -> Option<bool> {
    if opt.group_hyper(0, "betas").is_ok() {
        Some(true)
    } else if opt.group_hyper(0, "momentum").is_ok() {
        Some(false)
    } else {
        None
    }
}

/// torch's `_update_lr` when `get_lr` returned fewer values than the optimizer has groups
/// (`zip(param_groups, values, strict=True)`).
pub(crate) const ZIP_SHORTER: &str = "ValueError: zip() argument 2 is shorter than argument 1";
/// torch's `zip(per_group_values, param_groups, strict=True)` with a group added since.
pub(crate) const ZIP_LONGER: &str = "ValueError: zip() argument 2 is longer than argument 1";

/// A scheduler follows groups added to the optimizer after it was built (torch's
/// `add_param_group`), never fewer groups than it was built for.
pub(crate) fn check_follows(opt: &dyn GroupHyperparams, n: usize) -> Result<()> {
    if opt.num_groups() < n {
        return Err(Error::Scheduler(format!(
            "the scheduler was built for {n} param groups but the optimizer has {} (another \
             optimizer was passed)",
            opt.num_groups()
        )));
    }
    Ok(())
}

/// The error of a step that needs a per-group value (`base_lrs`, a lambda, `swa_lr`, ...) of a
/// group added by `add_param_group` after the scheduler was built: torch raises there too
/// (`torch_error`); the chainable steps before and after it go on with the group's own lr.
pub(crate) fn late_group_error(
    name: &str,
    known: usize,
    groups: usize,
    torch_error: &str,
) -> Error {
    let which = if groups - known == 1 {
        format!("param group {known} was")
    } else {
        format!("param groups {known}..{groups} were")
    };
    Error::Scheduler(format!(
        "{name}: {which} added to the optimizer after the scheduler was built and this step \
         needs a value the scheduler keeps per group (its base_lr, or what it was built \
         with); torch raises here too ({torch_error}). Build the scheduler after adding the \
         group"
    ))
}

/// [`late_group_error`] if a step computed values for fewer groups than the optimizer has.
pub(crate) fn check_late_groups(
    name: &str,
    computed: usize,
    opt: &dyn GroupHyperparams,
    torch_error: &str,
) -> Result<()> {
    if computed < opt.num_groups() {
        return Err(late_group_error(
            name,
            computed,
            opt.num_groups(),
            torch_error,
        ));
    }
    Ok(())
}

/// The scheduler and the optimizer must have the same number of groups.
pub(crate) fn check_groups(opt: &dyn GroupHyperparams, n: usize) -> Result<()> {
    if opt.num_groups() != n {
        return Err(Error::Scheduler(format!(
            "the scheduler has values for {n} param groups but the optimizer has {} \
             (a group was added or another optimizer was passed)",
            opt.num_groups()
        )));
    }
    Ok(())
}
