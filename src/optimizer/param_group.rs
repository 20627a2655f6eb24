//! [`ParamGroup`]: which parameters a group holds and which hyperparameters it overrides, and
//! the run layout of a resolved group.

use std::ops::Range;

use crate::arena::{Arena, Param};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::HyperValue;

/// The parameters of one param group and the hyperparameters it overrides.
///
/// ```
/// use optarena::{ArenaBuilder, ParamGroup};
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.zeros("w", &[4]).unwrap();
/// let bias = b.zeros("b", &[1]).unwrap();
/// let group = ParamGroup::new([w, bias]).with("lr", 0.01).with("weight_decay", 0.0);
/// # let _ = group;
/// ```
#[derive(Debug, Clone)]
pub struct ParamGroup<T> {
    params: Selection<T>,
    overrides: Vec<(String, HyperValue)>,
}

#[derive(Debug, Clone)]
enum Selection<T> {
    Handles(Vec<Param<T>>),
    Names(Vec<String>),
    All,
}

impl<T: Float> ParamGroup<T> {
    /// A group of the given parameters, in any order and any layout: they need not be
    /// registered one after another (torch's weight-decay recipe puts every weight in one group
    /// and every bias in another, interleaved in the arena). The group is stepped as the
    /// maximal runs of consecutive parameters it holds; parameters registered one after
    /// another form one run, updated by one fused pass exactly as a single slice.
    pub fn new(params: impl IntoIterator<Item = Param<T>>) -> Self {
        ParamGroup {
            params: Selection::Handles(params.into_iter().collect()),
            overrides: Vec::new(),
        }
    }

    /// A group of the parameters with these names.
    pub fn named<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        ParamGroup {
            params: Selection::Names(names.into_iter().map(Into::into).collect()),
            overrides: Vec::new(),
        }
    }

    /// A group of every parameter in the arena.
    pub fn all() -> Self {
        ParamGroup {
            params: Selection::All,
            overrides: Vec::new(),
        }
    }

    /// Overrides one hyperparameter for this group (torch's per-group dict entries).
    pub fn with(mut self, name: &str, value: impl Into<HyperValue>) -> Self {
        self.overrides.push((name.to_string(), value.into()));
        self
    }

    /// The hyperparameters this group overrides, in the order given.
    pub(crate) fn overrides(&self) -> &[(String, HyperValue)] {
        &self.overrides
    }

    /// Resolves to arena positions in ascending (arena) order, checking emptiness and
    /// duplicates. Any set of parameters is accepted, in any layout.
    pub(crate) fn resolve(&self, arena: &Arena<T>) -> Result<Vec<usize>> {
        let mut idx: Vec<usize> = match &self.params {
            Selection::All => (0..arena.num_params()).collect(),
            Selection::Handles(h) => {
                let mut v = Vec::with_capacity(h.len());
                for p in h {
                    if arena.param_at(p.index()) != Some(*p) {
                        return Err(Error::ArenaMismatch(
                            "a parameter handle in this group belongs to another arena".into(),
                        ));
                    }
                    v.push(p.index());
                }
                v
            }
            Selection::Names(names) => names
                .iter()
                .map(|n| arena.find(n).map(|p| p.index()))
                .collect::<Result<_>>()?,
        };
        if idx.is_empty() {
            return Err(Error::EmptyParamList);
        }
        idx.sort_unstable();
        let infos = arena.infos();
        for w in idx.windows(2) {
            if w[0] == w[1] {
                return Err(Error::DuplicateParamInGroup {
                    name: infos[w[0]].name.clone(),
                });
            }
        }
        Ok(idx)
    }
}

/// The maximal runs of consecutive arena positions in `params` (ascending, no duplicates):
/// the layout of a group. A group whose parameters were registered one after another is one
/// run.
pub(crate) fn runs_of(params: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &i in params {
        match runs.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// The first parameter position two ascending position lists share, if any.
pub(super) fn first_common(a: &[usize], b: &[usize]) -> Option<usize> {
    let (mut x, mut y) = (0, 0);
    while x < a.len() && y < b.len() {
        match a[x].cmp(&b[y]) {
            std::cmp::Ordering::Less => x += 1,
            std::cmp::Ordering::Greater => y += 1,
            std::cmp::Ordering::Equal => return Some(a[x]),
        }
    }
    None
}
