//! State access, `state_dict` and `load_state_dict`.

use std::collections::BTreeMap;

use super::load::{check_header, with_saved_states};
use super::{aux_ranges, Algorithm, Group, Optimizer, ParamScalars};
use crate::arena::Param;
use crate::error::Result;
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
    /// optimizer with [`crate::mixed::StatePrecision::Bf16`] state: see [`Optimizer::buffer_bf16`].
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
    /// parameter's dtype. Into an optimizer with [`crate::mixed::StatePrecision::Bf16`] state the buffers'
    /// values are rounded to bf16 as torch's `.to(torch.bfloat16)` rounds them (f64 through
    /// f32, see [`crate::checkpoint::dtype`]), so the f32 values its own `state_dict` wrote
    /// load back bit for bit.
    pub fn load_state_dict<U: Float>(&mut self, saved: &StateDict<U>, by: MatchBy) -> Result<()> {
        check_header(
            saved.format,
            &saved.optimizer,
            &saved.dtype,
            A::NAME,
            U::DTYPE,
        )?;
        // The one pipeline of every load: check and stage (only what the load replaces), fill
        // the staged buffers, then swap them in.
        let mut staged = with_saved_states(&saved.state, |states| {
            self.stage_load(&saved.optimizer, &saved.param_groups, states, by)
        })?;
        for ps in &saved.state {
            for (name, values) in &ps.buffers {
                staged.fill(&self.layout, ps.index, name, values)?;
            }
        }
        self.commit_staged(staged);
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
