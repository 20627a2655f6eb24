//! [`LBFGSStateDict`]: saving and loading torch's LBFGS state.

use serde::{Deserialize, Serialize};

use super::{History, LBFGSConfig, Scalars, LBFGS};
use crate::arena::{filled, AlignedBuf};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::Hyperparams;
use crate::optimizer::load::{bad, check_group_count, check_header, match_params, saved_config};
use crate::state::{GroupDict, MatchBy, ParamRef, STATE_DICT_FORMAT};

impl<T: Float> LBFGS<T> {
    fn param_refs(&self) -> Vec<ParamRef> {
        self.flat
            .params
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let info = &self.layout[i];
                ParamRef {
                    index: j,
                    name: info.name.clone(),
                    offset: info.offset,
                    shape: info.shape.clone(),
                }
            })
            .collect()
    }

    /// A serialisable snapshot: the group's hyperparameters and torch's whole LBFGS state
    /// (counters, direction, step, history, `H_diag`, previous gradient and loss, `al`).
    pub fn state_dict(&self) -> LBFGSStateDict<T> {
        let hyperparams = <LBFGSConfig as Hyperparams>::NAMES
            .iter()
            .map(|&n| {
                let v = self.config.get(n).expect("every listed name is gettable");
                (n.to_string(), v)
            })
            .collect();
        let sc = &self.scalars;
        let state = sc.present.then(|| {
            let started = sc.started;
            let h = &self.history;
            LBFGSState {
                func_evals: sc.func_evals,
                n_iter: sc.n_iter,
                d: started.then(|| self.d.to_vec()),
                t: started.then_some(sc.t),
                old_dirs: started
                    .then(|| (0..h.order.len()).map(|i| h.pair(i).0.to_vec()).collect()),
                old_stps: started
                    .then(|| (0..h.order.len()).map(|i| h.pair(i).1.to_vec()).collect()),
                ro: started.then(|| h.ro.iter().copied().collect()),
                h_diag: started.then_some(sc.h_diag),
                prev_flat_grad: started.then(|| self.prev_flat_grad.to_vec()),
                prev_loss: started.then_some(sc.prev_loss),
                al: self.al.clone(),
            }
        });
        LBFGSStateDict {
            format: STATE_DICT_FORMAT,
            optimizer: "LBFGS".into(),
            dtype: T::DTYPE.into(),
            param_groups: vec![GroupDict {
                hyperparams,
                params: self.param_refs(),
            }],
            state,
        }
    }

    /// [`LBFGS::state_dict`] as JSON.
    pub fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict())?)
    }

    /// [`LBFGS::load_state_dict`] from JSON written by [`LBFGS::state_dict_json`].
    ///
    /// Values saved in the other float type are read in that type and cast, as
    /// [`LBFGS::load_state_dict`] does.
    pub fn load_state_dict_json(&mut self, json: &str, by: MatchBy) -> Result<()> {
        if crate::state::json_dtype(json)? == <f64 as Float>::DTYPE {
            let sd: LBFGSStateDict<f64> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        } else {
            let sd: LBFGSStateDict<f32> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        }
    }

    /// For each target parameter (group order): its segment in the saved flat vector and in
    /// ours, `(saved_start, our_start, len)`, the parameters paired by the load pipeline's
    /// [`match_params`].
    fn segments(&self, saved: &[ParamRef], by: MatchBy) -> Result<Vec<(usize, usize, usize)>> {
        let matched = match_params(0, saved, &self.flat.params, &self.layout, by)?;
        let mut segs = vec![(0, 0, 0); saved.len()];
        let mut at = 0usize;
        // Saved parameter k starts after the saved parameters before it; their shapes equal
        // their partners' here (checked), so the sum cannot overflow.
        for j in matched {
            let len = self.layout[self.flat.params[j]].len;
            segs[j] = (at, self.flat.starts[j], len);
            at += len;
        }
        Ok(segs)
    }

    /// Loads a snapshot: the saved hyperparameters replace the current ones and the whole
    /// LBFGS state is restored, so the run continues exactly (bit for bit) where it was saved.
    ///
    /// Checks the optimizer kind, dtype field, the single group, each parameter's shape, every
    /// vector's length, the history's consistency, and names what does not match; on any
    /// error nothing changes. With [`MatchBy::Name`] the flat vectors are rearranged to this
    /// arena's parameter order. A state saved in the other float type is converted.
    pub fn load_state_dict<U: Float>(
        &mut self,
        saved: &LBFGSStateDict<U>,
        by: MatchBy,
    ) -> Result<()> {
        let load = self.prepare_load(saved, by)?;
        self.commit_load(load);
        Ok(())
    }

    /// The identity of the arena this optimizer was built for.
    pub(crate) fn arena_identity(&self) -> u64 {
        self.arena_id
    }

    /// Swaps a load prepared by [`LBFGS::prepare_load`] in. Cannot fail.
    pub(crate) fn commit_load(&mut self, load: LBFGSLoad<T>) {
        self.config = load.config;
        match load.state {
            None => self.reset(),
            Some(st) => {
                self.scalars = st.scalars;
                if st.scalars.started {
                    self.d = st.d;
                    self.prev_flat_grad = st.prev;
                }
                self.history = st.history;
                self.al = st.al;
            }
        }
    }

    /// Checks a saved state against this optimizer (see [`LBFGS::load_state_dict`]) and
    /// converts it, changing nothing.
    pub(crate) fn prepare_load<U: Float>(
        &self,
        saved: &LBFGSStateDict<U>,
        by: MatchBy,
    ) -> Result<LBFGSLoad<T>> {
        check_header(
            saved.format,
            &saved.optimizer,
            &saved.dtype,
            "LBFGS",
            U::DTYPE,
        )?;
        check_group_count(saved.param_groups.len(), 1)?;
        let group = &saved.param_groups[0];
        let config = saved_config(0, &self.config, &group.hyperparams)?;
        let segs = self.segments(&group.params, by)?;
        let n = self.flat.len;

        let Some(st) = &saved.state else {
            return Ok(LBFGSLoad {
                config,
                state: None,
            });
        };
        let convert = |name: &str, v: &[U]| -> Result<AlignedBuf<T>> {
            if v.len() != n {
                return Err(Error::StateDict(format!(
                    "`{name}` has {} values, the parameters have {n}",
                    v.len()
                )));
            }
            let mut out = filled(n, T::ZERO);
            for &(from, to, len) in &segs {
                for (dst, src) in out[to..to + len].iter_mut().zip(&v[from..from + len]) {
                    *dst = T::from_f64(src.to_f64());
                }
            }
            Ok(out)
        };
        let present = [
            st.d.is_some(),
            st.t.is_some(),
            st.old_dirs.is_some(),
            st.old_stps.is_some(),
            st.ro.is_some(),
            st.h_diag.is_some(),
            st.prev_flat_grad.is_some(),
            st.prev_loss.is_some(),
        ];
        let started = present.iter().all(|&p| p);
        if !started && present.iter().any(|&p| p) {
            return bad(
                "the state has some of d, t, old_dirs, old_stps, ro, H_diag, prev_flat_grad, \
                 prev_loss but not all"
                    .into(),
            );
        }
        if st.n_iter > 0 && !started {
            return bad(format!(
                "n_iter is {} but the state has no direction or history",
                st.n_iter
            ));
        }
        let mut scalars = Scalars {
            present: true,
            func_evals: st.func_evals,
            n_iter: st.n_iter,
            started,
            ..Scalars::EMPTY
        };
        let mut d = filled(0, T::ZERO);
        let mut prev = filled(0, T::ZERO);
        let mut history = History::new();
        if let (
            Some(sd),
            Some(t),
            Some(dirs),
            Some(stps),
            Some(ro),
            Some(h_diag),
            Some(pg),
            Some(pl),
        ) = (
            &st.d,
            st.t,
            &st.old_dirs,
            &st.old_stps,
            &st.ro,
            st.h_diag,
            &st.prev_flat_grad,
            st.prev_loss,
        ) {
            if dirs.len() != stps.len() || dirs.len() != ro.len() {
                return bad(format!(
                    "old_dirs, old_stps and ro have {}, {} and {} entries; they must agree",
                    dirs.len(),
                    stps.len(),
                    ro.len()
                ));
            }
            if dirs.len() > config.history_size {
                return bad(format!(
                    "the history has {} pairs, more than history_size {}",
                    dirs.len(),
                    config.history_size
                ));
            }
            d = convert("d", sd)?;
            prev = convert("prev_flat_grad", pg)?;
            for (i, (y, s)) in dirs.iter().zip(stps).enumerate() {
                let y = convert(&format!("old_dirs[{i}]"), y)?;
                let s = convert(&format!("old_stps[{i}]"), s)?;
                history.slots.push([y, s]);
                history.order.push_back(i);
            }
            history.ro = ro.iter().map(|r| T::from_f64(r.to_f64())).collect();
            scalars.t = t;
            scalars.h_diag = h_diag;
            scalars.prev_loss = pl;
        }
        let al = st.al.as_ref().map(|v| {
            v.iter()
                .map(|a| a.map(|x| T::from_f64(x.to_f64())))
                .collect()
        });
        Ok(LBFGSLoad {
            config,
            state: Some(LBFGSLoadState {
                scalars,
                d,
                prev,
                history,
                al,
            }),
        })
    }
}

/// A checked, converted [`LBFGSStateDict`], waiting to be swapped in.
pub(crate) struct LBFGSLoad<T: Float> {
    config: LBFGSConfig,
    /// `None`: the saved optimizer had not stepped (the state is reset).
    state: Option<LBFGSLoadState<T>>,
}

struct LBFGSLoadState<T: Float> {
    scalars: Scalars,
    d: AlignedBuf<T>,
    prev: AlignedBuf<T>,
    history: History<T>,
    al: Option<Vec<Option<T>>>,
}

/// A serialisable snapshot of an [`LBFGS`] optimizer, laid out like torch's
/// `LBFGS.state_dict()`: one param group and the state torch keeps under its first parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LBFGSStateDict<T> {
    /// [`STATE_DICT_FORMAT`] at the time of saving.
    pub format: u32,
    /// `"LBFGS"`.
    pub optimizer: String,
    /// `"float32"` or `"float64"`.
    pub dtype: String,
    /// The one param group: hyperparameters and parameters.
    pub param_groups: Vec<GroupDict>,
    /// torch's state; `None` before the first step.
    #[serde(default)]
    pub state: Option<LBFGSState<T>>,
}

/// torch's LBFGS state. Vectors are flat over the group's parameters in group order. The
/// fields from `d` to `prev_loss` appear together once an iteration has run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LBFGSState<T> {
    /// Closure evaluations over all steps.
    pub func_evals: u64,
    /// Iterations over all steps.
    pub n_iter: u64,
    /// The last search direction.
    #[serde(default)]
    pub d: Option<Vec<T>>,
    /// The last step length (a Python float or a one-element tensor in torch; its value).
    #[serde(default)]
    pub t: Option<f64>,
    /// Gradient differences `y` of the stored pairs, oldest first.
    #[serde(default)]
    pub old_dirs: Option<Vec<Vec<T>>>,
    /// Steps `s` of the stored pairs, oldest first.
    #[serde(default)]
    pub old_stps: Option<Vec<Vec<T>>>,
    /// `1 / (y·s)` of the stored pairs.
    #[serde(default)]
    pub ro: Option<Vec<T>>,
    /// Scale of the initial inverse Hessian, `y·s / y·y` of the newest pair (1 at first).
    #[serde(default, rename = "H_diag")]
    pub h_diag: Option<f64>,
    /// The gradient at the start of the last iteration.
    #[serde(default)]
    pub prev_flat_grad: Option<Vec<T>>,
    /// The loss at the start of the last iteration.
    #[serde(default)]
    pub prev_loss: Option<f64>,
    /// The two-loop recursion's `α` values (`None` where never written), `history_size` long;
    /// present once a second iteration has run.
    #[serde(default)]
    pub al: Option<Vec<Option<T>>>,
}
