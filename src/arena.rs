//! The parameter arena: every parameter of a model in one contiguous, 64-byte-aligned buffer,
//! and every gradient in a second buffer with the same layout.
//!
//! Parameters are registered with an [`ArenaBuilder`], each with a name, a shape and initial
//! values, and laid out one after another in registration order. [`ArenaBuilder::build`]
//! freezes the layout. Each registered parameter gets a [`Param`] handle, a small `Copy` token
//! that reads and writes its values and gradient.
//!
//! Gradient presence follows torch's `grad is None`: a parameter has no gradient until
//! something writes one, and [`Arena::zero_grad`] with `set_to_none = true` removes it again.
//! The optimizers skip a parameter without a gradient exactly as torch does.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::float::Float;

pub(crate) use crate::buffer::AlignedBuf;
use crate::buffer::Role;
pub use crate::buffer::ALIGN;

/// A `value`-filled aligned buffer of `len` elements that is not one of a fused pass's arrays.
pub(crate) fn filled<T: Float>(len: usize, value: T) -> AlignedBuf<T> {
    AlignedBuf::filled(Role::Other, len, value)
}

static NEXT_ARENA_ID: AtomicU64 = AtomicU64::new(1);

/// Where one parameter lives in the arena.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParamInfo {
    /// The name it was registered with (`"fc1.weight"`).
    pub name: String,
    /// Its shape, row-major.
    pub shape: Vec<usize>,
    /// First element's index in the arena.
    pub offset: usize,
    /// Number of elements (the product of `shape`).
    pub len: usize,
}

impl ParamInfo {
    /// The arena index range this parameter covers.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// A typed handle to one parameter of one arena.
///
/// Cheap to copy. Using it with an arena other than the one that made it panics, the way an
/// out-of-bounds slice index does.
pub struct Param<T> {
    index: u32,
    arena: u64,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Clone for Param<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Param<T> {}
impl<T> PartialEq for Param<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.arena == other.arena
    }
}
impl<T> Eq for Param<T> {}
impl<T> std::fmt::Debug for Param<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({})", self.index)
    }
}

impl<T> Param<T> {
    /// The parameter's position in registration order.
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// The handle of position `index` of the arena with identity `arena` (the caller knows
    /// the position exists there).
    pub(crate) fn from_parts(index: usize, arena: u64) -> Self {
        Param {
            index: index as u32,
            arena,
            _marker: PhantomData,
        }
    }

    /// The id of the arena that made it.
    pub(crate) fn arena_id(self) -> u64 {
        self.arena
    }
}

/// Registers parameters, then builds the [`Arena`].
///
/// ```
/// use optarena::ArenaBuilder;
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.param("w", &[2, 3], &[0.0; 6]).unwrap();
/// let bias = b.zeros("b", &[2]).unwrap();
/// let arena = b.build();
/// assert_eq!(arena.value(w).len(), 6);
/// assert_eq!(arena.info(bias).offset, 6);
/// ```
pub struct ArenaBuilder<T> {
    id: u64,
    infos: Vec<ParamInfo>,
    values: Vec<T>,
    by_name: HashMap<String, usize>,
}

impl<T: Float> Default for ArenaBuilder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Float> ArenaBuilder<T> {
    /// An empty builder.
    pub fn new() -> Self {
        ArenaBuilder {
            id: NEXT_ARENA_ID.fetch_add(1, Ordering::Relaxed),
            infos: Vec::new(),
            values: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    /// Registers a parameter with the given name, shape and initial values (row-major).
    ///
    /// Errors if the name is taken or `init` does not hold exactly the shape's element count.
    pub fn param(&mut self, name: &str, shape: &[usize], init: &[T]) -> Result<Param<T>> {
        let len = shape.iter().product::<usize>();
        if init.len() != len {
            return Err(Error::LengthMismatch {
                name: name.to_string(),
                shape: shape.to_vec(),
                expected: len,
                got: init.len(),
            });
        }
        self.push(name, shape, |values| values.extend_from_slice(init))
    }

    /// Registers a parameter whose element `i` (row-major) is `f(i)`.
    pub fn param_with(
        &mut self,
        name: &str,
        shape: &[usize],
        mut f: impl FnMut(usize) -> T,
    ) -> Result<Param<T>> {
        let len = shape.iter().product::<usize>();
        self.push(name, shape, |values| values.extend((0..len).map(&mut f)))
    }

    /// Registers a zero-initialised parameter.
    pub fn zeros(&mut self, name: &str, shape: &[usize]) -> Result<Param<T>> {
        self.param_with(name, shape, |_| T::ZERO)
    }

    fn push(
        &mut self,
        name: &str,
        shape: &[usize],
        fill: impl FnOnce(&mut Vec<T>),
    ) -> Result<Param<T>> {
        if self.by_name.contains_key(name) {
            return Err(Error::DuplicateParamName(name.to_string()));
        }
        let index = self.infos.len();
        let offset = self.values.len();
        fill(&mut self.values);
        self.infos.push(ParamInfo {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset,
            len: self.values.len() - offset,
        });
        self.by_name.insert(name.to_string(), index);
        Ok(Param {
            index: index as u32,
            arena: self.id,
            _marker: PhantomData,
        })
    }

    /// Freezes the layout into one aligned buffer. No parameter has a gradient yet.
    pub fn build(self) -> Arena<T> {
        let n = self.values.len();
        Arena {
            id: self.id,
            params: AlignedBuf::from_slice(Role::Params, &self.values),
            grads: AlignedBuf::filled(Role::Grads, n, T::ZERO),
            has_grad: vec![false; self.infos.len()],
            infos: self.infos,
            by_name: self.by_name,
        }
    }
}

/// All parameters of a model in one aligned buffer, with their gradients beside them.
pub struct Arena<T> {
    id: u64,
    params: AlignedBuf<T>,
    grads: AlignedBuf<T>,
    has_grad: Vec<bool>,
    infos: Vec<ParamInfo>,
    by_name: HashMap<String, usize>,
}

impl<T: Float> Arena<T> {
    /// A process-unique identity: optimizers remember the arena they were built for.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when no element is registered.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Number of registered parameters.
    pub fn num_params(&self) -> usize {
        self.infos.len()
    }

    /// Every parameter's layout, in registration order.
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }

    fn idx(&self, p: Param<T>) -> usize {
        assert_eq!(
            p.arena, self.id,
            "optarena: a Param handle was used with an arena that did not create it"
        );
        p.index as usize
    }

    /// The registration position of `p`, or [`Error::ArenaMismatch`] if `p` was made by
    /// another arena (where [`Arena::info`] and the other accessors panic).
    pub fn position(&self, p: Param<T>) -> Result<usize> {
        if p.arena != self.id || p.index as usize >= self.infos.len() {
            return Err(Error::ArenaMismatch(format!(
                "parameter handle {} was made by another arena (this one has {} parameters: {})",
                p.index,
                self.infos.len(),
                crate::arena::name_list(&self.infos)
            )));
        }
        Ok(p.index as usize)
    }

    /// The layout of `p`.
    pub fn info(&self, p: Param<T>) -> &ParamInfo {
        &self.infos[self.idx(p)]
    }

    /// The handle of the parameter registered under `name`.
    pub fn find(&self, name: &str) -> Result<Param<T>> {
        self.by_name
            .get(name)
            .map(|&i| Param {
                index: i as u32,
                arena: self.id,
                _marker: PhantomData,
            })
            .ok_or_else(|| Error::UnknownParam(name.to_string()))
    }

    /// The handle of the parameter at registration position `index`.
    pub fn param_at(&self, index: usize) -> Option<Param<T>> {
        (index < self.infos.len()).then_some(Param {
            index: index as u32,
            arena: self.id,
            _marker: PhantomData,
        })
    }

    /// Every parameter's handle, in registration order.
    pub fn handles(&self) -> impl Iterator<Item = Param<T>> + '_ {
        (0..self.infos.len()).map(|i| Param {
            index: i as u32,
            arena: self.id,
            _marker: PhantomData,
        })
    }

    /// The values of `p`.
    pub fn value(&self, p: Param<T>) -> &[T] {
        let r = self.info(p).range();
        &self.params[r]
    }

    /// The values of `p`, writable.
    pub fn value_mut(&mut self, p: Param<T>) -> &mut [T] {
        let r = self.info(p).range();
        &mut self.params[r]
    }

    /// The gradient of `p`, or `None` when it has none (torch's `grad is None`).
    pub fn grad(&self, p: Param<T>) -> Option<&[T]> {
        let i = self.idx(p);
        self.has_grad[i].then(|| &self.grads[self.infos[i].range()])
    }

    /// True when `p` has a gradient.
    pub fn has_grad(&self, p: Param<T>) -> bool {
        self.has_grad[self.idx(p)]
    }

    /// The gradient of `p`, writable, for accumulating into.
    ///
    /// A parameter without a gradient gets one filled with zeros first, so `+=` accumulates
    /// the way autograd does after `zero_grad(set_to_none=True)`.
    pub fn grad_mut(&mut self, p: Param<T>) -> &mut [T] {
        let i = self.idx(p);
        let r = self.infos[i].range();
        if !self.has_grad[i] {
            self.grads[r.clone()].fill(T::ZERO);
            self.has_grad[i] = true;
        }
        &mut self.grads[r]
    }

    /// Sets the gradient of `p` to `values`. A handle from another arena, or a length that
    /// is not the parameter's, is an error that changes nothing.
    pub fn set_grad(&mut self, p: Param<T>, values: &[T]) -> Result<()> {
        if p.arena != self.id {
            return Err(Error::ArenaMismatch(format!(
                "set_grad: the handle of parameter {} comes from another arena",
                p.index
            )));
        }
        let i = self.idx(p);
        let info = &self.infos[i];
        if values.len() != info.len {
            return Err(Error::LengthMismatch {
                name: info.name.clone(),
                shape: info.shape.clone(),
                expected: info.len,
                got: values.len(),
            });
        }
        self.grads[info.range()].copy_from_slice(values);
        self.has_grad[i] = true;
        Ok(())
    }

    /// Removes the gradient of `p` (torch's `p.grad = None`).
    pub fn clear_grad(&mut self, p: Param<T>) {
        let i = self.idx(p);
        self.has_grad[i] = false;
    }

    /// The values of the parameter named `name`.
    pub fn value_by_name(&self, name: &str) -> Result<&[T]> {
        Ok(self.value(self.find(name)?))
    }

    /// The values of the parameter named `name`, writable.
    pub fn value_by_name_mut(&mut self, name: &str) -> Result<&mut [T]> {
        let p = self.find(name)?;
        Ok(self.value_mut(p))
    }

    /// The gradient of the parameter named `name`, if it has one.
    pub fn grad_by_name(&self, name: &str) -> Result<Option<&[T]>> {
        Ok(self.grad(self.find(name)?))
    }

    /// The gradient of the parameter named `name`, writable (see [`Arena::grad_mut`]).
    pub fn grad_by_name_mut(&mut self, name: &str) -> Result<&mut [T]> {
        let p = self.find(name)?;
        Ok(self.grad_mut(p))
    }

    /// Every parameter value, as one flat slice.
    pub fn params(&self) -> &[T] {
        &self.params
    }

    /// Every parameter value, as one flat writable slice.
    pub fn params_mut(&mut self) -> &mut [T] {
        &mut self.params
    }

    /// Exchanges the parameter buffer with `other` (same length) in O(1): how
    /// [`crate::AveragedModel::swap_into`] puts the averaged weights in place. No step holds a
    /// pointer into the buffer between calls (work items are planned per step).
    pub(crate) fn swap_params(&mut self, other: &mut AlignedBuf<T>) {
        debug_assert_eq!(self.params.len(), other.len());
        std::mem::swap(&mut self.params, other);
    }

    /// Every gradient as one flat slice. Elements of a parameter without a gradient hold
    /// stale values; check [`Arena::has_grad`].
    pub fn grads(&self) -> &[T] {
        &self.grads
    }

    /// Every gradient as one flat writable slice, for code that produces flat gradients.
    /// Every parameter has a gradient afterwards; those that had none start at zero.
    pub fn grads_mut(&mut self) -> &mut [T] {
        self.grads_range_mut(0..self.infos.len())
    }

    /// Every parameter value, read-only, beside every gradient, writable: what a backward
    /// pass needs to write flat gradients from the values. Every parameter has a gradient
    /// afterwards; those that had none start at zero.
    pub fn params_and_grads_mut(&mut self) -> (&[T], &mut [T]) {
        self.grads_range_mut(0..self.infos.len());
        (&self.params, &mut self.grads)
    }

    /// The parameters `params` (a range of registration positions) as one flat slice.
    pub fn params_range(&self, params: Range<usize>) -> &[T] {
        &self.params[self.elem_range(params)]
    }

    /// The parameters `params` (registration positions) as one flat writable slice.
    pub fn params_range_mut(&mut self, params: Range<usize>) -> &mut [T] {
        let r = self.elem_range(params);
        &mut self.params[r]
    }

    /// The gradients of `params` (registration positions) as one flat writable slice. They all
    /// have a gradient afterwards; those that had none start at zero.
    pub fn grads_range_mut(&mut self, params: Range<usize>) -> &mut [T] {
        for i in params.clone() {
            if !self.has_grad[i] {
                let r = self.infos[i].range();
                self.grads[r].fill(T::ZERO);
                self.has_grad[i] = true;
            }
        }
        let r = self.elem_range(params);
        &mut self.grads[r]
    }

    /// Element range covered by a range of parameter positions.
    pub(crate) fn elem_range(&self, params: Range<usize>) -> Range<usize> {
        if params.is_empty() {
            return 0..0;
        }
        self.infos[params.start].offset..self.infos[params.end - 1].range().end
    }

    /// Zeroes every gradient (`set_to_none = false`) or removes them all (`true`), as
    /// `torch.optim.Optimizer.zero_grad` does for the whole model.
    pub fn zero_grad(&mut self, set_to_none: bool) {
        self.zero_grad_range(0..self.infos.len(), set_to_none);
    }

    /// [`Arena::zero_grad`] for the parameters at positions `params`.
    pub fn zero_grad_range(&mut self, params: Range<usize>, set_to_none: bool) {
        if set_to_none {
            self.has_grad[params].fill(false);
        } else {
            let r = self.elem_range(params.clone());
            self.grads[r].fill(T::ZERO);
            self.has_grad[params].fill(true);
        }
    }

    /// Gradient elements `elems` (an element range), writable, presence flags untouched.
    pub(crate) fn grads_raw_mut(&mut self, elems: Range<usize>) -> &mut [T] {
        &mut self.grads[elems]
    }

    /// Presence flags, one per parameter.
    pub(crate) fn grad_flags(&self) -> &[bool] {
        &self.has_grad
    }

    /// The step driver's view: params (writable), grads and presence flags, in one borrow.
    pub(crate) fn step_view(&mut self) -> (&mut [T], &[T], &[bool]) {
        (&mut self.params, &self.grads, &self.has_grad)
    }

    /// True when `other` has the same parameters in the same places.
    pub fn same_layout(&self, other: &[ParamInfo]) -> bool {
        self.infos == other
    }
}

impl<T: Float> std::fmt::Debug for Arena<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("dtype", &T::DTYPE)
            .field("len", &self.len())
            .field("params", &self.infos.len())
            .finish()
    }
}

/// Up to five parameter names, for messages.
pub(crate) fn name_list(infos: &[ParamInfo]) -> String {
    let mut names: Vec<String> = infos
        .iter()
        .take(5)
        .map(|i| format!("`{}`", i.name))
        .collect();
    if infos.len() > 5 {
        names.push("...".into());
    }
    names.join(", ")
}
