//! State access, `state_dict` and `load_state_dict`.

use std::collections::BTreeMap;

use super::{aux_ranges, Algorithm, Group, Optimizer, ParamScalars, ParamState};
use crate::arena::{AlignedBuf, Param};
use crate::buffer::Role;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::Hyperparams;
use crate::state::{GroupDict, MatchBy, ParamRef, ParamStateDict, StateDict, STATE_DICT_FORMAT};

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// The group holding arena parameter `i`, and its position there.
    pub(super) fn locate(&self, i: usize) -> Option<(&Group<T, A>, usize)> {
        self.groups
            .iter()
            .find_map(|g| g.position(i).map(|j| (g, j)))
    }

    /// The state buffer `buffer` (torch's name, e.g. `"exp_avg"`, ASGD's `"ax"`, Adafactor's
    /// shaped `"row_var"`) of parameter `param`, or `None` if it has no state yet. Row-major;
    /// a shaped buffer is as long as [`Algorithm::aux_len`] says. `None` for every buffer of an
    /// optimizer with [`StatePrecision::Bf16`] state: see [`Optimizer::buffer_bf16`].
    pub fn buffer(&self, param: Param<T>, buffer: &str) -> Option<&[T]> {
        let i = param.index();
        let (g, j) = self.locate(i)?;
        let st = g.state[j]?;
        let info = &self.layout[i];
        if let Some(k) = A::buffers(&g.config).iter().position(|&b| b == buffer) {
            if k >= st.live_buffers as usize || !g.half_buffers.is_empty() {
                return None;
            }
            let local = g.locals[j];
            return Some(&g.buffers[k][local..local + info.len]);
        }
        let k = A::aux_buffers(&info.shape)
            .iter()
            .position(|&b| b == buffer)?;
        let r = aux_ranges::<A>(&info.shape, g.aux_offsets[j]).nth(k)?;
        Some(&g.aux[r])
    }

    /// The step count of parameter `param` (torch's `state[p]["step"]`), or `None` before its
    /// first step.
    pub fn step_count(&self, param: Param<T>) -> Option<u64> {
        let i = param.index();
        let (g, j) = self.locate(i)?;
        g.state[j].map(|s| s.step)
    }

    /// The per-parameter scalar state of `param` besides its step count (ASGD's `eta` and
    /// `mu`), or `None` before its first step.
    pub fn scalars(&self, param: Param<T>) -> Option<A::Scalars> {
        let i = param.index();
        let (g, j) = self.locate(i)?;
        g.state[j].map(|s| s.scalars)
    }

    /// A serialisable snapshot of the groups and every parameter's state.
    pub fn state_dict(&self) -> StateDict<T> {
        let mut param_groups = Vec::with_capacity(self.groups.len());
        let mut state = Vec::new();
        let mut number = 0;
        for g in &self.groups {
            let hyperparams = <A::Config as Hyperparams>::NAMES
                .iter()
                .map(|&n| {
                    let v = g.config.get(n).expect("every listed name is gettable");
                    (n.to_string(), v)
                })
                .collect::<BTreeMap<_, _>>();
            let names = A::buffers(&g.config);
            let mut params = Vec::with_capacity(g.params.len());
            for (j, &i) in g.params.iter().enumerate() {
                let info = &self.layout[i];
                params.push(ParamRef {
                    index: number,
                    name: info.name.clone(),
                    offset: info.offset,
                    shape: info.shape.clone(),
                });
                if let Some(st) = g.state[j] {
                    let local = g.locals[j];
                    let mut buffers: BTreeMap<String, Vec<T>> = (0..st.live_buffers as usize)
                        .map(|k| {
                            (
                                names[k].to_string(),
                                g.buffer_values(k, local..local + info.len),
                            )
                        })
                        .collect();
                    let aux = aux_ranges::<A>(&info.shape, g.aux_offsets[j]);
                    for (name, r) in A::aux_buffers(&info.shape).iter().zip(aux) {
                        buffers.insert(name.to_string(), g.aux[r].to_vec());
                    }
                    let scalars: BTreeMap<String, f64> = <A::Scalars as ParamScalars>::NAMES
                        .iter()
                        .map(|n| n.to_string())
                        .zip(st.scalars.values())
                        .collect();
                    if A::TRACKS_STEP || !buffers.is_empty() || !scalars.is_empty() {
                        state.push(ParamStateDict {
                            index: number,
                            step: A::TRACKS_STEP.then_some(st.step),
                            scalars,
                            buffers,
                        });
                    }
                }
                number += 1;
            }
            param_groups.push(GroupDict {
                hyperparams,
                params,
            });
        }
        StateDict {
            format: STATE_DICT_FORMAT,
            optimizer: A::NAME.to_string(),
            dtype: T::DTYPE.to_string(),
            param_groups,
            state,
        }
    }

    /// Loads a snapshot: the saved hyperparameters replace the current ones and every saved
    /// state is restored, as torch's `load_state_dict` does.
    ///
    /// Checks the optimizer kind, the number of groups, each group's parameter count, each
    /// parameter's shape and each buffer's length, and names what does not match. With
    /// [`MatchBy::Name`] saved parameters are paired with the group's parameters by name, so a
    /// model registered in another order loads correctly (torch matches by position only,
    /// pytorch/pytorch#1489). On any error nothing changes.
    ///
    /// A state saved in the other float type is converted, as torch casts state to the
    /// parameter's dtype.
    pub fn load_state_dict<U: Float>(&mut self, saved: &StateDict<U>, by: MatchBy) -> Result<()> {
        self.check_full_state("load_state_dict")?;
        let bad = |m: String| Err(Error::StateDict(m));
        if saved.format != STATE_DICT_FORMAT {
            return bad(format!(
                "format version {} is not supported (this build reads {STATE_DICT_FORMAT})",
                saved.format
            ));
        }
        if saved.optimizer != A::NAME {
            return bad(format!(
                "it was saved by the {} optimizer, this is {}",
                saved.optimizer,
                A::NAME
            ));
        }
        if saved.dtype != U::DTYPE {
            return bad(format!(
                "its dtype field says {} but its values were read as {}",
                saved.dtype,
                U::DTYPE
            ));
        }
        if saved.param_groups.len() != self.groups.len() {
            return bad(format!(
                "it has {} parameter groups, the optimizer has {}",
                saved.param_groups.len(),
                self.groups.len()
            ));
        }
        // Saved parameter number -> (group, position in group).
        let mut target: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        let mut groups = self.groups.clone();
        for (gi, (sg, g)) in saved.param_groups.iter().zip(groups.iter_mut()).enumerate() {
            if sg.params.len() != g.params.len() {
                return bad(format!(
                    "group {gi} has {} parameters in the saved state and {} in the optimizer",
                    sg.params.len(),
                    g.params.len()
                ));
            }
            let mut config = g.config.clone();
            for (name, value) in &sg.hyperparams {
                config
                    .set(name, value)
                    .map_err(|e| Error::StateDict(format!("group {gi}: {e}")))?;
            }
            config
                .validate()
                .map_err(|e| Error::StateDict(format!("group {gi}: {e}")))?;
            g.config = config;
            let mut used = vec![false; g.params.len()];
            for (pos, pr) in sg.params.iter().enumerate() {
                let j = match by {
                    MatchBy::Position => pos,
                    MatchBy::Name => g
                        .params
                        .iter()
                        .position(|&i| self.layout[i].name == pr.name)
                        .ok_or_else(|| {
                            Error::StateDict(format!(
                                "group {gi} has no parameter named `{}`",
                                pr.name
                            ))
                        })?,
                };
                if used[j] {
                    return bad(format!(
                        "group {gi}: two saved parameters map to `{}`",
                        self.layout[g.params[j]].name
                    ));
                }
                used[j] = true;
                let info = &self.layout[g.params[j]];
                if info.shape != pr.shape {
                    return bad(format!(
                        "parameter `{}` has shape {:?} in the saved state and `{}` has shape {:?}",
                        pr.name, pr.shape, info.name, info.shape
                    ));
                }
                if target.insert(pr.index, (gi, j)).is_some() {
                    return bad(format!("parameter number {} appears twice", pr.index));
                }
            }
            g.state.iter_mut().for_each(|s| *s = None);
        }
        for ps in &saved.state {
            let &(gi, j) = target.get(&ps.index).ok_or_else(|| {
                Error::StateDict(format!(
                    "state for parameter number {} which no group lists",
                    ps.index
                ))
            })?;
            let g = &mut groups[gi];
            let info = &self.layout[g.params[j]];
            let names = A::buffers(&g.config);
            let aux_names = A::aux_buffers(&info.shape);
            // The leading `live` buffers: all of them, or fewer when a setting that adds
            // buffers at the end was switched on after the state was made (the next step
            // creates them). Shaped (auxiliary) buffers must all be there.
            let live = ps.buffers.len().saturating_sub(aux_names.len());
            if ps.buffers.len() < aux_names.len()
                || live > names.len()
                || names[..live]
                    .iter()
                    .chain(aux_names)
                    .any(|n| !ps.buffers.contains_key(*n))
            {
                let saved_names: Vec<&str> = ps.buffers.keys().map(String::as_str).collect();
                let kept: Vec<&str> = names.iter().chain(aux_names).copied().collect();
                return bad(format!(
                    "parameter `{}` has buffers {saved_names:?}; {} with these settings keeps {kept:?}",
                    info.name,
                    A::NAME
                ));
            }
            let step = match (A::TRACKS_STEP, ps.step) {
                (true, Some(s)) => s,
                (false, _) => 0,
                (true, None) => {
                    return bad(format!("parameter `{}` has no step count", info.name));
                }
            };
            let mut scalar_values = Vec::with_capacity(<A::Scalars as ParamScalars>::NAMES.len());
            for n in <A::Scalars as ParamScalars>::NAMES {
                match ps.scalars.get(*n) {
                    Some(v) => scalar_values.push(*v),
                    None => {
                        return bad(format!("parameter `{}` has no `{n}` state", info.name));
                    }
                }
            }
            let local = g.locals[j];
            let gl = g.len;
            while g.buffers.len() < names.len() {
                let k = g.buffers.len();
                g.buffers
                    .push(AlignedBuf::filled(Role::State(k), gl, T::ZERO));
            }
            for (k, name) in names[..live].iter().enumerate() {
                let values = &ps.buffers[*name];
                if values.len() != info.len {
                    return bad(format!(
                        "buffer `{name}` of parameter `{}` has {} values, the parameter has {}",
                        info.name,
                        values.len(),
                        info.len
                    ));
                }
                for (dst, src) in g.buffers[k][local..local + info.len].iter_mut().zip(values) {
                    *dst = T::from_f64(src.to_f64());
                }
            }
            if !aux_names.is_empty() {
                g.ensure_aux();
            }
            let aux = aux_ranges::<A>(&info.shape, g.aux_offsets[j]);
            for (name, r) in aux_names.iter().zip(aux) {
                let values = &ps.buffers[*name];
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
                for (dst, src) in g.aux[r].iter_mut().zip(values) {
                    *dst = T::from_f64(src.to_f64());
                }
            }
            g.state[j] = Some(ParamState {
                step,
                scalars: A::Scalars::from_values(&scalar_values),
                live_buffers: live as u8,
            });
        }
        self.groups = groups;
        Ok(())
    }

    /// [`Optimizer::state_dict`] as JSON.
    pub fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict())?)
    }

    /// [`Optimizer::load_state_dict`] from JSON written by [`Optimizer::state_dict_json`].
    ///
    /// Values saved in the other float type are read in that type and cast, as torch casts
    /// loaded state to the parameter's dtype (and as [`Optimizer::load_state_dict`] does).
    pub fn load_state_dict_json(&mut self, json: &str, by: MatchBy) -> Result<()> {
        if crate::state::json_dtype(json)? == <f64 as Float>::DTYPE {
            let sd: StateDict<f64> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        } else {
            let sd: StateDict<f32> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        }
    }
}
