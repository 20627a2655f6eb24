//! Binary checkpoints of a [`SparseAdam`] optimizer (and optionally the arena's parameter
//! values): the [optimizer checkpoint format](super) with its checksums, atomic save and
//! all-or-nothing load, `optimizer: "SparseAdam"`, torch's state keys `exp_avg` and
//! `exp_avg_sq` as `state.<number>.<buffer>` tensors and each parameter's `step`.
//!
//! ```
//! use optarena::{ArenaBuilder, SparseAdam, SparseAdamConfig, SparseGrad};
//! # fn main() -> optarena::Result<()> {
//! let mut b = ArenaBuilder::<f32>::new();
//! let emb = b.zeros("embedding.weight", &[100, 4])?;
//! let mut arena = b.build();
//! let mut opt = SparseAdam::all(&arena, SparseAdamConfig::default())?;
//! opt.step_sparse(&mut arena, &[SparseGrad::new(emb, &[3], &[1.0, 2.0, 3.0, 4.0])])?;
//!
//! let dir = std::env::temp_dir().join(format!("optarena-spa-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("run.safetensors");
//! opt.save_checkpoint(&path, Some(&arena))?;
//! opt.load_checkpoint(&path, Some(&mut arena))?;
//! assert_eq!(opt.step_count(emb), Some(1));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```
//!
//! # Loading
//! The checkpoint must have as many param groups as the optimizer, and saved group `g` the
//! same parameters (by name and shape, in any order) as the optimizer's group `g`: parameters
//! are matched by name, so an arena that registered them in another order loads correctly.
//! Each group's options come from the file (checked as at construction). A file saved in f64
//! loads into an f32 optimizer and the reverse, each value cast as torch's `load_state_dict`
//! casts state. With `params`, the file must hold the values of every parameter of the arena
//! (saved with the arena), which are restored too. On any error nothing has changed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use super::atomic::{self, SaveTarget, StdFs};
use super::format::{
    param_tensor, read_header, state_tensor, CheckpointMeta, FileDtype, StateMeta, FORMAT_NAME,
    FORMAT_VERSION,
};
use super::tensors::{open, read_tensors, write_tensors, Expected, Into, Out};
use super::{plan_params, saved_states, zeroed};
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::optim::SparseAdam;

/// The metadata's `optimizer` field.
pub const KIND: &str = "SparseAdam";
/// The state buffers, in file order (torch's keys).
pub const BUFFERS: [&str; 2] = crate::optim::sparse_adam::BUFFERS;

fn other_arena() -> Error {
    Error::ArenaMismatch("this SparseAdam optimizer was built for another arena".to_string())
}

/// Writes a checkpoint of `opt` (and of `params`' values, when given) to `w`. Not atomic: see
/// [`save`] for files. Returns the number of bytes written.
pub fn write<T: Float, W: Write + ?Sized>(
    w: &mut W,
    opt: &SparseAdam<T>,
    params: Option<&Arena<T>>,
) -> Result<u64> {
    let (arena_id, layout, steps, exp_avg, exp_avg_sq) = opt.checkpoint_view();
    if params.is_some_and(|a| a.id() != arena_id) {
        return Err(other_arena());
    }
    let mut values = Vec::new();
    let mut state = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let Some(step) = *step else { continue };
        let info = &layout[index];
        for (name, buf) in BUFFERS.iter().zip([exp_avg, exp_avg_sq]) {
            values.push(Out {
                name: state_tensor(index, name),
                shape: info.shape.clone(),
                values: &buf[info.range()],
            });
        }
        state.push(StateMeta {
            index,
            step: Some(step),
            scalars: BTreeMap::new(),
            buffers: BUFFERS.iter().map(|b| b.to_string()).collect(),
        });
    }
    if let Some(arena) = params {
        for (p, info) in arena.handles().zip(arena.infos()) {
            values.push(Out {
                name: param_tensor(&info.name),
                shape: info.shape.clone(),
                values: arena.value(p),
            });
        }
    }
    let meta = CheckpointMeta {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        optimizer: KIND.to_string(),
        dtype: T::DTYPE.to_string(),
        param_groups: opt.group_dicts(),
        state,
        params: params.map(|a| a.infos().to_vec()),
    };
    write_tensors(w, &meta, &values, &[])
}

/// Saves a checkpoint of `opt` (and of `params`' values, when given) to `path`, atomically:
/// a crash or I/O error leaves the previous file intact. Returns the file's size.
pub fn save<T: Float>(
    path: impl AsRef<Path>,
    opt: &SparseAdam<T>,
    params: Option<&Arena<T>>,
) -> Result<u64> {
    save_with(&StdFs, path, opt, params)
}

/// [`save`] through another [`SaveTarget`] (a test double that fails on cue).
pub fn save_with<S: SaveTarget, T: Float>(
    target: &S,
    path: impl AsRef<Path>,
    opt: &SparseAdam<T>,
    params: Option<&Arena<T>>,
) -> Result<u64> {
    if params.is_some_and(|a| a.id() != opt.checkpoint_view().0) {
        return Err(other_arena());
    }
    atomic::write_atomic(target, path.as_ref(), |w| write(w, opt, params))
}

/// Loads a checkpoint of `file_len` bytes from `r` into `opt` (and the stored parameter values
/// into `params`, when given); see the [module docs](self). On any error nothing has changed.
/// Returns the number of bytes read.
pub fn read<T: Float, R: Read + ?Sized>(
    r: &mut R,
    file_len: u64,
    opt: &mut SparseAdam<T>,
    params: Option<&mut Arena<T>>,
) -> Result<u64> {
    let (arena_id, layout, ..) = opt.checkpoint_view();
    if params.as_ref().is_some_and(|a| a.id() != arena_id) {
        return Err(other_arena());
    }
    let header = read_header(r, file_len)?;
    let meta = &header.meta;
    FileDtype::from_name(&meta.dtype)?;
    // The load pipeline's checks, as the JSON load makes them (crate::optimizer::load).
    let mut staged = opt.stage_load(&meta.optimizer, &meta.param_groups, &saved_states(meta))?;
    let mut expected = BTreeMap::new();
    for (index, i) in staged.slots() {
        for (buf, b) in BUFFERS.iter().enumerate() {
            expected.insert(
                state_tensor(index, b),
                Expected {
                    shape: layout[i].shape.clone(),
                    into: Into::Values {
                        buf,
                        range: layout[i].range(),
                    },
                },
            );
        }
    }
    let mut staged_params: Option<Vec<T>> = None;
    match (&meta.params, &params) {
        (Some(stored), Some(arena)) => {
            for (name, shape, range) in plan_params(layout, stored)? {
                let into = Into::Values { buf: 2, range };
                expected.insert(name, Expected { shape, into });
            }
            staged_params = Some(zeroed(arena.len()));
        }
        (None, Some(_)) => {
            return Err(Error::StateDict(
                "the checkpoint holds no parameter values (it was saved without the arena)"
                    .to_string(),
            ))
        }
        (Some(stored), None) => {
            for p in stored {
                let e = Expected {
                    shape: p.shape.clone(),
                    into: Into::Skip,
                };
                if expected.insert(param_tensor(&p.name), e).is_some() {
                    return Err(Error::Checkpoint(format!(
                        "parameter `{}` is stored twice",
                        p.name
                    )));
                }
            }
        }
        (None, None) => {}
    }
    let mut values = staged_params.unwrap_or_default();
    read_tensors(
        r,
        &header,
        expected,
        &mut [&mut staged.exp_avg, &mut staged.exp_avg_sq, &mut values],
        &mut [],
    )?;
    opt.commit_staged(staged);
    if let Some(arena) = params {
        // Staged above with the arena's length.
        arena.params_mut().copy_from_slice(&values);
    }
    Ok(header.file_len)
}

/// Loads a checkpoint file written by [`save`]. See [`read`]; on any error nothing has
/// changed.
pub fn load<T: Float>(
    path: impl AsRef<Path>,
    opt: &mut SparseAdam<T>,
    params: Option<&mut Arena<T>>,
) -> Result<u64> {
    let (mut r, len) = open(path.as_ref())?;
    read(&mut r, len, opt, params)
}

impl<T: Float> SparseAdam<T> {
    /// Saves a binary checkpoint (safetensors) to `path`, atomically; with `params`, the
    /// arena's values too, so one file resumes a run. See [`crate::checkpoint::sparse_adam`].
    /// Returns the file's size in bytes.
    pub fn save_checkpoint(
        &self,
        path: impl AsRef<Path>,
        params: Option<&Arena<T>>,
    ) -> Result<u64> {
        save(path, self, params)
    }

    /// Loads a binary checkpoint written by [`SparseAdam::save_checkpoint`], matching
    /// parameters by name and casting f32/f64; with `params`, restores the arena's values too.
    /// On any error nothing has changed. See [`crate::checkpoint::sparse_adam`].
    pub fn load_checkpoint(
        &mut self,
        path: impl AsRef<Path>,
        params: Option<&mut Arena<T>>,
    ) -> Result<u64> {
        load(path, self, params)
    }
}
