//! What the binary checkpoint format needs from an [`Optimizer`] beyond its public API: visit
//! every live state buffer in place (no copy), and load into freshly staged buffers that replace
//! the optimizer's only once everything has been read and checked.
//!
//! A child module of `optimizer`, so it reaches the private fields without widening them.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::load::{
    bad, check_buffer_len, check_kind, match_groups, saved_config, saved_step, stage_once,
    state_target,
};
use super::{aux_ranges, Algorithm, Group, Optimizer, ParamScalars, ParamState};
use crate::arena::{filled, AlignedBuf, ParamInfo};
use crate::buffer::Role;
use crate::checkpoint::dtype::{cast, float_values, float_values_mut, Values, ValuesMut};
use crate::error::Result;
use crate::float::Float;
use crate::hyper::Hyperparams;
use crate::mixed::StatePrecision;
use crate::state::{GroupDict, MatchBy, ParamRef};

/// One parameter's state, borrowed from the optimizer.
pub(crate) struct StateRef<'a> {
    /// Parameter number across all groups (torch's state-dict key).
    pub index: usize,
    /// Steps taken, for optimizers that count them.
    pub step: Option<u64>,
    /// Per-parameter scalars, by torch's names.
    pub scalars: Vec<(&'static str, f64)>,
    /// Live buffers, by torch's names, with the tensor shape each is saved with: the
    /// parameter's for ordinary buffers, [`Algorithm::aux_shape`] for shaped ones (Adafactor's
    /// `row_var`, `col_var`, `variance`); bf16 under [`StatePrecision::Bf16`].
    pub buffers: Vec<(&'static str, Vec<usize>, Values<'a>)>,
}

/// One parameter's saved state as a checkpoint's metadata describes it (its buffers' values
/// come separately).
pub(crate) struct SavedState<'a> {
    /// Parameter number ([`ParamRef::index`]).
    pub index: usize,
    /// Step count, when saved.
    pub step: Option<u64>,
    /// Scalars by name.
    pub scalars: &'a BTreeMap<String, f64>,
    /// Names of the buffers saved for it.
    pub buffers: &'a [String],
}

/// A load being prepared: new configs, states and buffers, checked against the optimizer and
/// waiting for their values. Nothing of the optimizer changes until [`Optimizer::commit_staged`].
pub(crate) struct Staged<T, A: Algorithm> {
    arena_id: u64,
    configs: Vec<A::Config>,
    states: Vec<Vec<Option<ParamState<A::Scalars>>>>,
    buffers: Vec<Vec<AlignedBuf<T>>>,
    /// The same under [`StatePrecision::Bf16`] (then `buffers` has no buffers).
    half_buffers: Vec<Vec<AlignedBuf<half::bf16>>>,
    /// The state precision staged for.
    precision: StatePrecision,
    /// Per group, the staged shaped state ([`Algorithm::aux_buffers`]); empty when the group
    /// has none.
    aux: Vec<AlignedBuf<T>>,
    /// (saved parameter number, buffer name) -> where its values go, its tensor shape, and
    /// the arena position of the parameter it belongs to.
    slots: BTreeMap<(usize, String), (Slot, Vec<usize>, usize)>,
}

/// Where one saved buffer's values go in a staged load.
#[derive(Debug, Clone)]
enum Slot {
    /// Group, buffer index, element range in that buffer.
    Buffer(usize, usize, std::ops::Range<usize>),
    /// Group, element range in the group's shaped state.
    Aux(usize, std::ops::Range<usize>),
}

impl<T: Float, A: Algorithm> Staged<T, A> {
    /// The staged destination of buffer `name` of saved parameter `index` (bf16 under
    /// [`StatePrecision::Bf16`]), or `None` when the metadata did not announce it.
    pub(crate) fn slot_mut(&mut self, index: usize, name: &str) -> Option<ValuesMut<'_>> {
        match self.slots.get(&(index, name.to_string()))?.0.clone() {
            Slot::Buffer(g, k, r) if self.precision == StatePrecision::Bf16 => {
                Some(ValuesMut::Bf16(&mut self.half_buffers[g][k][r]))
            }
            Slot::Buffer(g, k, r) => Some(float_values_mut(&mut self.buffers[g][k][r])),
            Slot::Aux(g, r) => Some(float_values_mut(&mut self.aux[g][r])),
        }
    }

    /// Copies saved values into the staged destination of buffer `name` of saved parameter
    /// `index`, converting to the state's storage (as torch casts loaded state to the
    /// parameter's dtype; bf16 under [`StatePrecision::Bf16`]), after
    /// checking their number. `layout` is the optimizer's.
    pub(crate) fn fill<U: Float>(
        &mut self,
        layout: &[ParamInfo],
        index: usize,
        name: &str,
        values: &[U],
    ) -> Result<()> {
        let Some((slot, _, param)) = self.slots.get(&(index, name.to_string())) else {
            return bad(format!(
                "buffer `{name}` of parameter number {index} is not one this load expects"
            ));
        };
        let info = &layout[*param];
        let dst = match slot.clone() {
            Slot::Buffer(g, k, r) => {
                check_buffer_len(name, &info.name, values.len(), r.len())?;
                if self.precision == StatePrecision::Bf16 {
                    ValuesMut::Bf16(&mut self.half_buffers[g][k][r])
                } else {
                    float_values_mut(&mut self.buffers[g][k][r])
                }
            }
            Slot::Aux(g, r) => {
                if values.len() != r.len() {
                    return bad(format!(
                        "buffer `{name}` of parameter `{}` (shape {:?}) has {} values, {} keeps {}",
                        info.name,
                        info.shape,
                        values.len(),
                        A::NAME,
                        r.len()
                    ));
                }
                float_values_mut(&mut self.aux[g][r])
            }
        };
        // torch's casts: exact widening, round to nearest (even) when narrowing, into bf16
        // state as `.to(torch.bfloat16)` rounds.
        cast(float_values(values), dst)?;
        Ok(())
    }

    /// Every announced (parameter number, buffer name, tensor shape).
    pub(crate) fn slots(&self) -> impl Iterator<Item = (usize, &str, &[usize])> + '_ {
        self.slots
            .iter()
            .map(|((i, n), (_, shape, _))| (*i, n.as_str(), shape.as_slice()))
    }
}

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// The identity of the arena this optimizer was built for.
    pub(crate) fn arena_identity(&self) -> u64 {
        self.arena_id
    }

    /// The arena layout this optimizer was built for.
    pub(crate) fn param_layout(&self) -> &[ParamInfo] {
        &self.layout
    }

    /// The groups as [`Optimizer::state_dict`] describes them, without any state.
    pub(crate) fn group_dicts(&self) -> Vec<GroupDict> {
        let mut number = 0;
        self.groups
            .iter()
            .map(|g| {
                let hyperparams = <A::Config as Hyperparams>::NAMES
                    .iter()
                    .map(|&n| {
                        let v = g.config.get(n).expect("every listed name is gettable");
                        (n.to_string(), v)
                    })
                    .collect();
                let params = g
                    .params
                    .iter()
                    .map(|&i| {
                        let info = &self.layout[i];
                        number += 1;
                        ParamRef {
                            index: number - 1,
                            name: info.name.clone(),
                            offset: info.offset,
                            shape: info.shape.clone(),
                        }
                    })
                    .collect();
                GroupDict {
                    hyperparams,
                    params,
                }
            })
            .collect()
    }

    /// Calls `f` with every parameter's state that [`Optimizer::state_dict`] would list, in
    /// parameter-number order, borrowing the buffers in place.
    pub(crate) fn for_each_state<'a, E>(
        &'a self,
        mut f: impl FnMut(StateRef<'a>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut number = 0;
        for g in &self.groups {
            let names = A::buffers(&g.config);
            for (j, &i) in g.params.iter().enumerate() {
                let index = number;
                number += 1;
                let Some(st) = g.state[j] else { continue };
                let info = &self.layout[i];
                let local = g.locals[j];
                let r = local..local + info.len;
                let mut buffers: Vec<(&'static str, Vec<usize>, Values<'a>)> = (0..st.live_buffers
                    as usize)
                    .map(|k| {
                        let values = if g.half_buffers.is_empty() {
                            float_values(&g.buffers[k][r.clone()])
                        } else {
                            Values::Bf16(&g.half_buffers[k][r.clone()])
                        };
                        (names[k], info.shape.clone(), values)
                    })
                    .collect();
                let aux = aux_ranges::<A>(&info.shape, g.aux_offsets[j]);
                for (k, (name, r)) in A::aux_buffers(&info.shape).iter().zip(aux).enumerate() {
                    buffers.push((name, A::aux_shape(&info.shape, k), float_values(&g.aux[r])));
                }
                let scalars: Vec<(&'static str, f64)> = <A::Scalars as ParamScalars>::NAMES
                    .iter()
                    .copied()
                    .zip(st.scalars.values())
                    .collect();
                if A::TRACKS_STEP || !buffers.is_empty() || !scalars.is_empty() {
                    f(StateRef {
                        index,
                        step: A::TRACKS_STEP.then_some(st.step),
                        scalars,
                        buffers,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Checks saved groups and states against this optimizer, exactly as
    /// [`Optimizer::load_state_dict`] does, and stages new buffers for the values. Allocates
    /// only what the optimizer's own layout needs, whatever the metadata says.
    pub(crate) fn stage_load(
        &self,
        optimizer: &str,
        saved_groups: &[GroupDict],
        saved_states: &[SavedState<'_>],
        by: MatchBy,
    ) -> Result<Staged<T, A>> {
        check_kind(optimizer, A::NAME)?;
        let ours: Vec<(&A::Config, &[usize])> = self
            .groups
            .iter()
            .map(|g| (&g.config, g.params.as_slice()))
            .collect();
        // Saved parameter number -> (group, position in group).
        let (configs, target) = match_groups(saved_groups, &ours, &self.layout, by, saved_config)?;
        let mut states: Vec<Vec<Option<ParamState<A::Scalars>>>> = self
            .groups
            .iter()
            .map(|g| vec![None; g.params.len()])
            .collect();
        let mut slots = BTreeMap::new();
        for ps in saved_states {
            let (gi, j) = state_target(&target, ps.index)?;
            let g = &self.groups[gi];
            let info = &self.layout[g.params[j]];
            let names = A::buffers(&configs[gi]);
            let aux_names = A::aux_buffers(&info.shape);
            // The leading `live` ordinary buffers: all, or fewer when a setting that adds
            // buffers at the end was switched on after the state was made (as
            // `load_state_dict` accepts); every shaped buffer must be there.
            let live = ps.buffers.len().saturating_sub(aux_names.len());
            let mut saved_names: Vec<&str> = ps.buffers.iter().map(String::as_str).collect();
            saved_names.sort_unstable();
            let mut want: Vec<&str> = names[..live.min(names.len())]
                .iter()
                .chain(aux_names)
                .copied()
                .collect();
            want.sort_unstable();
            if live > names.len() || saved_names != want {
                let kept: Vec<&str> = names.iter().chain(aux_names).copied().collect();
                return bad(format!(
                    "parameter `{}` has buffers {saved_names:?}; {} with these settings keeps {kept:?}",
                    info.name,
                    A::NAME
                ));
            }
            let step = if A::TRACKS_STEP {
                saved_step(&info.name, ps.step)?
            } else {
                0
            };
            let mut scalar_values = Vec::with_capacity(<A::Scalars as ParamScalars>::NAMES.len());
            for n in <A::Scalars as ParamScalars>::NAMES {
                match ps.scalars.get(*n) {
                    Some(v) => scalar_values.push(*v),
                    None => return bad(format!("parameter `{}` has no `{n}` state", info.name)),
                }
            }
            let local = g.locals[j];
            for (k, name) in names[..live].iter().enumerate() {
                slots.insert(
                    (ps.index, name.to_string()),
                    (
                        Slot::Buffer(gi, k, local..local + info.len),
                        info.shape.clone(),
                        g.params[j],
                    ),
                );
            }
            let aux = aux_ranges::<A>(&info.shape, g.aux_offsets[j]);
            for (k, (name, r)) in aux_names.iter().zip(aux).enumerate() {
                slots.insert(
                    (ps.index, name.to_string()),
                    (Slot::Aux(gi, r), A::aux_shape(&info.shape, k), g.params[j]),
                );
            }
            stage_once(
                &mut states[gi][j],
                &info.name,
                ParamState {
                    step,
                    scalars: A::Scalars::from_values(&scalar_values),
                    live_buffers: live as u8,
                },
            )?;
        }
        // Buffers only for groups that get state; each as long as the group. Fresh memory is
        // slow to touch the first time (a page fault per 4 KiB), so the buffers are allocated
        // and zeroed in parallel.
        let lens: Vec<(usize, usize, usize)> = self
            .groups
            .iter()
            .zip(&states)
            .zip(&configs)
            .enumerate()
            .filter(|(_, ((_, st), _))| st.iter().any(Option::is_some))
            .flat_map(|(gi, ((g, _), config))| {
                (0..A::buffers(config).len()).map(move |k| (gi, k, g.len))
            })
            .collect();
        // Under bf16 state the staged buffers are bf16: the values are cast into them as they
        // are read, so a load never holds a widened copy.
        let half = self.state_precision == StatePrecision::Bf16;
        let mut buffers: Vec<Vec<AlignedBuf<T>>> = self.groups.iter().map(|_| Vec::new()).collect();
        let mut half_buffers: Vec<Vec<AlignedBuf<half::bf16>>> =
            self.groups.iter().map(|_| Vec::new()).collect();
        if half {
            let made: Vec<AlignedBuf<half::bf16>> = lens
                .par_iter()
                .map(|&(_, k, len)| AlignedBuf::filled(Role::State(k), len, half::bf16::ZERO))
                .collect();
            for (&(gi, _, _), buf) in lens.iter().zip(made) {
                half_buffers[gi].push(buf);
            }
        } else {
            let made: Vec<AlignedBuf<T>> = lens
                .par_iter()
                .map(|&(_, k, len)| AlignedBuf::filled(Role::State(k), len, T::ZERO))
                .collect();
            for (&(gi, _, _), buf) in lens.iter().zip(made) {
                buffers[gi].push(buf);
            }
        }
        // Shaped state, for groups whose parameters have any and get state.
        let aux = self
            .groups
            .iter()
            .zip(&states)
            .map(|(g, st)| {
                let total = g.aux_offsets.last().copied().unwrap_or(0);
                if total > 0 && st.iter().any(Option::is_some) {
                    filled(total, T::ZERO)
                } else {
                    AlignedBuf::empty()
                }
            })
            .collect();
        Ok(Staged {
            arena_id: self.arena_id,
            configs,
            states,
            buffers,
            half_buffers,
            precision: self.state_precision,
            aux,
            slots,
        })
    }

    /// Replaces the groups' configs, states and buffers with a staged load. Cannot fail.
    pub(crate) fn commit_staged(&mut self, staged: Staged<T, A>) {
        assert_eq!(
            staged.arena_id, self.arena_id,
            "a staged load is committed to the optimizer that staged it"
        );
        assert_eq!(
            staged.precision, self.state_precision,
            "the state precision cannot change between staging and committing a load"
        );
        let Staged {
            configs,
            states,
            buffers,
            half_buffers,
            aux,
            ..
        } = staged;
        let mut old = Vec::with_capacity(self.groups.len());
        let mut old_half = Vec::new();
        for (((((g, config), state), bufs), half_bufs), aux) in self
            .groups
            .iter_mut()
            .zip(configs)
            .zip(states)
            .zip(buffers)
            .zip(half_buffers)
            .zip(aux)
        {
            let g: &mut Group<T, A> = g;
            g.config = config;
            g.state = state;
            old.extend(std::mem::replace(&mut g.buffers, bufs));
            old_half.extend(std::mem::replace(&mut g.half_buffers, half_bufs));
            // A staged empty aux is reallocated (zeroed) by the next step that needs it.
            old.push(std::mem::replace(&mut g.aux, aux));
        }
        // Returning large buffers to the system is slow too; do it in parallel.
        old.into_par_iter().for_each(drop);
        old_half.into_par_iter().for_each(drop);
    }
}
