//! [`ParamGroup`]: which parameters a group holds and which hyperparameters it overrides, and
//! the run layout of a resolved group.

use std::ops::Range;
use std::sync::Arc;

use crate::arena::{Arena, Param};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{HyperValue, Hyperparams};

/// The parameters of one param group and the hyperparameters it overrides.
///
/// Overrides are given by torch's name ([`ParamGroup::with`], as torch's per-group dict
/// entries, for Python-style interop), or typed, by a closure over the optimizer's config
/// ([`ParamGroup::configure`]), which the compiler checks: a closure over another algorithm's
/// config, or a field that does not exist, does not compile. They apply in the order given,
/// over the optimizer's defaults, and the result is validated as torch's constructor does.
///
/// `C` is the config type the group's typed overrides are for; a group without any
/// ([`Untyped`], the default) fits every optimizer.
///
/// ```
/// use optarena::{Adam, AdamConfig, ArenaBuilder, ParamGroup};
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.zeros("w", &[4]).unwrap();
/// let bias = b.zeros("b", &[1]).unwrap();
/// let arena = b.build();
/// // torch: Adam([{"params": [w], "lr": 1e-3, "amsgrad": True}, {"params": [bias]}], lr=1e-2)
/// let weights = ParamGroup::new([w]).configure(|c: &mut AdamConfig| {
///     c.lr = 1e-3;
///     c.amsgrad = true;
/// });
/// let biases = ParamGroup::new([bias]).with("weight_decay", 0.0); // by torch's name
/// let opt = Adam::new(&arena, [weights, biases.into()], AdamConfig::new().with_lr(1e-2))?;
/// assert_eq!(opt.group_config(0)?.lr, 1e-3);
/// assert_eq!(opt.lr(1)?, 1e-2);
/// # Ok::<(), optarena::Error>(())
/// ```
///
/// ```compile_fail
/// use optarena::{Adam, AdamConfig, ArenaBuilder, ParamGroup, SGDConfig};
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.zeros("w", &[4]).unwrap();
/// let arena = b.build();
/// // SGD's config for an Adam optimizer: a type error, not a run-time one.
/// let group = ParamGroup::new([w]).configure(|c: &mut SGDConfig| c.momentum = 0.9);
/// let _ = Adam::new(&arena, [group], AdamConfig::default());
/// ```
pub struct ParamGroup<T, C = Untyped> {
    params: Selection<T>,
    overrides: Vec<Override<C>>,
}

/// The config type of a [`ParamGroup`] without typed overrides: such a group fits any
/// optimizer (it converts into a group of any config type with `.into()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Untyped;

/// One override of a group's config.
pub(crate) enum Override<C> {
    /// By torch's name.
    Named(String, HyperValue),
    /// A closure over the config.
    Typed(Arc<dyn Fn(&mut C) + Send + Sync>),
}

impl<C> Clone for Override<C> {
    fn clone(&self) -> Self {
        match self {
            Override::Named(n, v) => Override::Named(n.clone(), v.clone()),
            Override::Typed(f) => Override::Typed(Arc::clone(f)),
        }
    }
}

impl<C> std::fmt::Debug for Override<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Override::Named(n, v) => write!(f, "{n}={v}"),
            Override::Typed(_) => write!(f, "<closure>"),
        }
    }
}

impl<C: Hyperparams> Override<C> {
    /// Applies the override to `config` (not validated: see [`Hyperparams::validate`]).
    pub(crate) fn apply(&self, config: &mut C) -> Result<()> {
        match self {
            Override::Named(name, value) => config.set(name, value),
            Override::Typed(f) => {
                f(config);
                Ok(())
            }
        }
    }
}

impl<T, C> Clone for ParamGroup<T, C> {
    fn clone(&self) -> Self {
        ParamGroup {
            params: self.params.clone(),
            overrides: self.overrides.clone(),
        }
    }
}

impl<T, C> std::fmt::Debug for ParamGroup<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamGroup")
            .field("params", &self.params)
            .field("overrides", &self.overrides)
            .finish()
    }
}

enum Selection<T> {
    Handles(Vec<Param<T>>),
    Names(Vec<String>),
    All,
}

impl<T> Clone for Selection<T> {
    fn clone(&self) -> Self {
        match self {
            Selection::Handles(h) => Selection::Handles(h.clone()),
            Selection::Names(n) => Selection::Names(n.clone()),
            Selection::All => Selection::All,
        }
    }
}

impl<T> std::fmt::Debug for Selection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selection::Handles(h) => f.debug_tuple("Handles").field(&h.len()).finish(),
            Selection::Names(n) => f.debug_tuple("Names").field(n).finish(),
            Selection::All => f.write_str("All"),
        }
    }
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
}

/// A group without typed overrides fits an optimizer of any config.
impl<T, C: Hyperparams> From<ParamGroup<T, Untyped>> for ParamGroup<T, C> {
    fn from(g: ParamGroup<T, Untyped>) -> Self {
        let overrides = g
            .overrides
            .into_iter()
            .map(|o| match o {
                Override::Named(n, v) => Override::Named(n, v),
                Override::Typed(_) => unreachable!("an untyped group has no typed override"),
            })
            .collect();
        ParamGroup {
            params: g.params,
            overrides,
        }
    }
}

impl<T: Float, C> ParamGroup<T, C> {
    /// Overrides hyperparameters for this group by a closure over the optimizer's config
    /// `D` (checked by the compiler), after the overrides given so far. The group is then for
    /// optimizers of config `D` only (a group already configured for another config does not
    /// compile).
    pub fn configure<D: Hyperparams>(
        self,
        f: impl Fn(&mut D) + Send + Sync + 'static,
    ) -> ParamGroup<T, D>
    where
        Self: Into<ParamGroup<T, D>>,
    {
        let mut group: ParamGroup<T, D> = self.into();
        group.overrides.push(Override::Typed(Arc::new(f)));
        group
    }

    /// Overrides one hyperparameter for this group by torch's name (torch's per-group dict
    /// entries); an unknown name or a value of the wrong kind is an error when the group is
    /// added to an optimizer.
    pub fn with(mut self, name: &str, value: impl Into<HyperValue>) -> Self {
        self.overrides
            .push(Override::Named(name.to_string(), value.into()));
        self
    }

    /// The overrides of this group, in the order given.
    pub(crate) fn overrides(&self) -> &[Override<C>] {
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
