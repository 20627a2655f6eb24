//! Binary checkpoints: an optimizer's state (and optionally the arena's parameter values) in
//! one [safetensors](https://github.com/huggingface/safetensors) file that Python's
//! `safetensors` reads, streamed from and into the optimizer's own buffers.
//!
//! JSON ([`Optimizer::state_dict_json`]) stays for small states and reading by eye; this format
//! is for large ones.
//!
//! ```
//! use optarena::{Adam, AdamConfig, ArenaBuilder, MatchBy, ParamGroup};
//! # fn main() -> optarena::Result<()> {
//! let mut b = ArenaBuilder::<f32>::new();
//! let w = b.param("w", &[2], &[0.5, -0.5])?;
//! let mut arena = b.build();
//! let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default())?;
//! arena.set_grad(w, &[0.1, 0.2])?;
//! opt.step(&mut arena)?;
//!
//! let dir = std::env::temp_dir().join(format!("optarena-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("run.safetensors");
//! // Optimizer state and parameter values: one file resumes the run.
//! opt.save_checkpoint(&path, Some(&arena))?;
//! opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)?;
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```
//!
//! # The file
//! A safetensors file. `__metadata__["optarena"]` holds [`CheckpointMeta`] as JSON: format name
//! and version, optimizer kind, dtype, param groups (hyperparameters; parameter numbers, names,
//! offsets, shapes), each parameter's step and scalar state and buffer names, and the stored
//! parameters. Tensors:
//! - `optarena.crc32` (U32, 2), first: the CRC-32 (zlib's) of the length prefix and header,
//!   and of every data byte after it. A flipped byte anywhere is found.
//! - `state.<number>.<buffer>` (the parameter's shape): torch's state-dict keys, in the
//!   buffers' own dtype: F32 or F64 as the parameters, BF16 for an optimizer with bf16 state
//!   ([`crate::StatePrecision::Bf16`]), never widened.
//! - `param.<name>`: the parameter values, when saved with the arena.
//!
//! # Guarantees
//! - [`save`] writes a temporary file in the same directory, fsyncs it, renames it over the
//!   old one and fsyncs the directory: a crash or I/O error leaves the previous checkpoint
//!   intact. The tensors are written straight from the optimizer's buffers.
//! - [`load`] checks the header checksum before believing the header, checks everything the
//!   header says against the optimizer and the file length before allocating, reads the data
//!   into freshly staged buffers (one extra copy of the state, never more), checks the data
//!   checksum, and only then swaps the buffers in. On any error nothing has changed.
//! - Every tensor loads from any of F32, F64, BF16 and F16 into its destination's type, cast as
//!   torch's `tensor.to(dtype)` casts ([`dtype`]): an f64 state into an f32 optimizer, a bf16
//!   state into an f32-state optimizer and the reverse, bf16 or f16 parameters into an f32
//!   arena.

pub mod atomic;
pub mod averaged;
pub mod dtype;
pub mod format;
pub mod sparse_adam;
mod tensors;
pub mod training;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::optimizer::{Algorithm, Optimizer, SavedState, StateRef};
use crate::state::MatchBy;

pub use atomic::{SaveTarget, StdFs};
pub use format::{
    CheckpointMeta, FileDtype, StateMeta, TensorEntry, CRC_TENSOR, FORMAT_NAME, FORMAT_VERSION,
};

use dtype::{float_values, float_values_mut, Values, ValuesMut};
use format::{param_tensor, read_error, read_header, state_tensor, Header};
pub use training::{
    LoadedTraining, TrainingCheckpoint, TrainingInfo, TrainingOptimizer, TrainingRestore,
};

/// Elements per piece when streaming (4 MiB of f64, 2 MiB of f32): large enough for disk speed,
/// small enough that the checksum runs on data still in cache.
pub(crate) const PIECE: usize = 1 << 19;

/// What [`inspect`] finds in a checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// The metadata.
    pub meta: CheckpointMeta,
    /// Every tensor but the checksum one, in file order.
    pub tensors: Vec<TensorEntry>,
    /// The file's length in bytes.
    pub file_len: u64,
}

/// CRC-32 of the tensors' little-endian bytes, one after another. On little-endian machines it
/// is computed on rayon's pool in fixed pieces of [`CRC_PIECE`] bytes whose CRCs are then
/// combined in order (`crc32fast::Hasher::combine`), so the value never depends on the
/// thread count; the save's first pass then takes half the time on two cores.
pub(crate) fn data_checksum(slices: &[Values<'_>]) -> u32 {
    let mut total = crc32fast::Hasher::new();
    if cfg!(target_endian = "little") {
        let pieces: Vec<&[u8]> = slices
            .iter()
            .flat_map(|s| s.ne_bytes().chunks(CRC_PIECE))
            .collect();
        let parts: Vec<crc32fast::Hasher> = pieces
            .par_iter()
            .map(|p| {
                let mut h = crc32fast::Hasher::new();
                h.update(p);
                h
            })
            .collect();
        for h in &parts {
            total.combine(h);
        }
    } else {
        for s in slices {
            dtype::with_le_bytes(*s, &mut |b| {
                total.update(b);
                Ok(())
            })
            .expect("hashing cannot fail");
        }
    }
    total.finalize()
}

/// Bytes per parallel checksum piece.
const CRC_PIECE: usize = 8 << 20;

pub(crate) fn write_error(e: std::io::Error) -> Error {
    Error::io("writing the checkpoint", e)
}

/// The tensors of a file being written: (name, dtype, shape) in data order, the checksum
/// tensor first, and the values of every tensor after it, borrowed from the optimizers' and the
/// arena's buffers and written in their own dtype.
pub(crate) struct Body<'a, T> {
    tensors: Vec<(String, Dtype, Vec<usize>)>,
    slices: Vec<Values<'a>>,
    _float: std::marker::PhantomData<T>,
}

impl<'a, T: Float> Body<'a, T> {
    pub(crate) fn new() -> Result<Self> {
        FileDtype::from_name(T::DTYPE)?;
        Ok(Body {
            tensors: vec![(CRC_TENSOR.to_string(), Dtype::U32, vec![2])],
            slices: Vec::new(),
            _float: std::marker::PhantomData,
        })
    }

    /// The tensors after the checksum one: (name, shape, values).
    pub(crate) fn into_tensors(self) -> Vec<(String, Vec<usize>, Values<'a>)> {
        self.tensors
            .into_iter()
            .skip(1)
            .zip(self.slices)
            .map(|((name, _, shape), values)| (name, shape, values))
            .collect()
    }

    pub(crate) fn push(&mut self, name: String, shape: Vec<usize>, values: Values<'a>) {
        self.tensors
            .push((name, values.dtype().safetensors(), shape));
        self.slices.push(values);
    }

    /// Every parameter of `arena`, as `<prefix>param.<name>` tensors in arena order; returns
    /// their layout (the metadata's `params`).
    pub(crate) fn push_params(&mut self, arena: &'a Arena<T>) -> Vec<crate::arena::ParamInfo> {
        for (p, info) in arena.handles().zip(arena.infos()) {
            self.push(
                param_tensor(&info.name),
                info.shape.clone(),
                float_values(arena.value(p)),
            );
        }
        arena.infos().to_vec()
    }

    /// The state of `opt`, as `<prefix>state.<number>.<buffer>` tensors; returns its metadata
    /// (without `params`).
    pub(crate) fn push_optimizer<A: Algorithm>(
        &mut self,
        opt: &'a Optimizer<T, A>,
        prefix: &str,
    ) -> Result<CheckpointMeta> {
        let mut state = Vec::new();
        opt.for_each_state(|s: StateRef<'a>| -> Result<()> {
            let mut names = Vec::with_capacity(s.buffers.len());
            for (name, shape, values) in s.buffers {
                self.push(
                    format!("{prefix}{}", state_tensor(s.index, name)),
                    shape,
                    values,
                );
                names.push(name.to_string());
            }
            state.push(StateMeta {
                index: s.index,
                step: s.step,
                scalars: s.scalars.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
                buffers: names,
            });
            Ok(())
        })?;
        Ok(CheckpointMeta {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            optimizer: A::NAME.to_string(),
            dtype: T::DTYPE.to_string(),
            param_groups: opt.group_dicts(),
            state,
            params: None,
        })
    }

    /// Writes the file: length prefix, header with `meta_json` as `__metadata__["optarena"]`,
    /// both checksums, then the tensors straight from their buffers. Returns the bytes written.
    pub(crate) fn write<W: Write + ?Sized>(&self, w: &mut W, meta_json: String) -> Result<u64> {
        let header = format::build_header_json(meta_json, &self.tensors)?;
        // The data checksum comes before the data, so it is computed in a first pass over
        // memory (several times faster than any disk).
        let data_crc = data_checksum(&self.slices);
        let mut header_crc = crc32fast::Hasher::new();
        header_crc.update(&header);
        let mut head = header;
        head.extend_from_slice(&header_crc.finalize().to_le_bytes());
        head.extend_from_slice(&data_crc.to_le_bytes());
        w.write_all(&head).map_err(write_error)?;
        let mut total = head.len() as u64;
        for s in &self.slices {
            dtype::with_le_bytes(*s, &mut |b| w.write_all(b)).map_err(write_error)?;
            total += s.byte_len() as u64;
        }
        Ok(total)
    }
}

/// Writes a checkpoint of `opt` (and of `params`' values, when given) to `w`. Not atomic: see
/// [`save`] for files. Returns the number of bytes written.
///
/// The tensors are written straight from the optimizer's and the arena's buffers; only the
/// header is built in memory.
pub fn write<T: Float, A: Algorithm, W: Write + ?Sized>(
    w: &mut W,
    opt: &Optimizer<T, A>,
    params: Option<&Arena<T>>,
) -> Result<u64> {
    if let Some(arena) = params {
        if arena.id() != opt.arena_identity() {
            return Err(Error::ArenaMismatch(format!(
                "this {} optimizer was built for another arena",
                A::NAME
            )));
        }
    }
    let mut body = Body::new()?;
    let mut meta = body.push_optimizer(opt, "")?;
    meta.params = params.map(|a| body.push_params(a));
    body.write(w, serde_json::to_string(&meta)?)
}

/// Saves a checkpoint of `opt` (and of `params`' values, when given, so that one file resumes
/// a run) to `path`, atomically: see the [module docs](self). Returns the file's size.
pub fn save<T: Float, A: Algorithm>(
    path: impl AsRef<Path>,
    opt: &Optimizer<T, A>,
    params: Option<&Arena<T>>,
) -> Result<u64> {
    save_with(&StdFs, path, opt, params)
}

/// [`save`] through another [`SaveTarget`] (a test double that fails on cue).
pub fn save_with<S: SaveTarget, T: Float, A: Algorithm>(
    target: &S,
    path: impl AsRef<Path>,
    opt: &Optimizer<T, A>,
    params: Option<&Arena<T>>,
) -> Result<u64> {
    atomic::write_atomic(target, path.as_ref(), |w| write(w, opt, params))
}

/// Where one tensor's values go.
pub(crate) enum Dest<K> {
    /// Into the destination `K` names.
    Take(K),
    /// Read (and checksummed) but not kept: parameter values when no arena was given.
    Skip,
}

/// Where a plain optimizer checkpoint's tensors go.
enum OptDest {
    /// Buffer of a saved parameter number.
    State(usize, String),
    /// Element range of the staged parameter values.
    Param(std::ops::Range<usize>),
}

/// Reads `n` bytes, only checksumming them.
pub(crate) fn skip_bytes<R: Read + ?Sized>(
    r: &mut R,
    crc: &mut crc32fast::Hasher,
    mut n: usize,
    scratch: &mut Vec<u8>,
    what: &str,
) -> Result<()> {
    while n > 0 {
        let k = n.min(PIECE * 8);
        scratch.resize(k, 0);
        r.read_exact(scratch).map_err(|e| read_error(e, what))?;
        crc.update(scratch);
        n -= k;
    }
    Ok(())
}

fn bad(msg: String) -> Error {
    Error::Checkpoint(msg)
}

/// Loads a checkpoint of `file_len` bytes from `r` into `opt` (and the stored parameter values
/// into `params`, when given), matching parameters `by` position or name. On any error nothing
/// has changed. Returns the number of bytes read.
///
/// `params` must be the arena `opt` was built for, and the checkpoint must then hold every one
/// of its parameters, by name and shape (torch's strict `load_state_dict` of the model).
/// Without `params`, stored parameter values are read (for the checksum) and dropped.
pub fn read<T: Float, A: Algorithm, R: Read + ?Sized>(
    r: &mut R,
    file_len: u64,
    opt: &mut Optimizer<T, A>,
    params: Option<&mut Arena<T>>,
    by: MatchBy,
) -> Result<u64> {
    if let Some(arena) = &params {
        if arena.id() != opt.arena_identity() {
            return Err(Error::ArenaMismatch(format!(
                "this {} optimizer was built for another arena",
                A::NAME
            )));
        }
    }
    let Header {
        meta,
        tensors,
        data_crc,
        header_len,
        file_len,
    } = read_header(r, file_len)?;
    FileDtype::from_name(&meta.dtype)?;
    let mut staged = stage_optimizer(opt, &meta, by)?;
    // Every tensor must be one the metadata announces, with the announced dtype and shape,
    // and every announced one must be there.
    let mut expected: Expected<OptDest> = Default::default();
    for (index, name, shape) in staged.slots() {
        expected.insert(
            state_tensor(index, name),
            (
                shape.to_vec(),
                Dest::Take(OptDest::State(index, name.to_string())),
            ),
        );
    }
    let layout = opt.param_layout().to_vec();
    let mut staged_params: Option<Vec<T>> = None;
    match (&meta.params, &params) {
        (Some(stored), Some(_)) => {
            for (name, shape, range) in plan_params(&layout, stored)? {
                expected.insert(name, (shape, Dest::Take(OptDest::Param(range))));
            }
            staged_params = Some(zeroed(layout.iter().map(|i| i.len).sum()));
        }
        (None, Some(_)) => {
            return Err(Error::StateDict(
                "the checkpoint holds no parameter values (it was saved without the arena)"
                    .to_string(),
            ))
        }
        (Some(stored), None) => {
            for p in stored {
                expected.insert(param_tensor(&p.name), (p.shape.clone(), Dest::Skip));
            }
        }
        (None, None) => {}
    }
    let at = stream_data(r, &tensors, expected, data_crc, |dest, read| match dest {
        OptDest::State(index, name) => read(
            staged
                .slot_mut(index, &name)
                .expect("every announced slot exists"),
        ),
        OptDest::Param(range) => read(float_values_mut(
            &mut staged_params.as_mut().expect("staged with the arena")[range],
        )),
    })?;
    debug_assert_eq!(header_len + at, file_len);
    opt.commit_staged(staged);
    if let (Some(arena), Some(values)) = (params, staged_params) {
        arena.params_mut().copy_from_slice(&values);
    }
    Ok(file_len)
}

/// Tensor name -> (shape, where its values go), as the metadata announces them.
pub(crate) type Expected<K> = std::collections::BTreeMap<String, (Vec<usize>, Dest<K>)>;

/// A zeroed buffer of `n` values, its pages faulted in in parallel (first touch is slow).
pub(crate) fn zeroed<T: Float>(n: usize) -> Vec<T> {
    let mut values = vec![T::ZERO; n];
    values.par_chunks_mut(1 << 16).for_each(|c| c.fill(T::ZERO));
    values
}

/// Checks an optimizer's saved groups and states against `opt` (as `load_state_dict` does)
/// and stages buffers for their values.
pub(crate) fn stage_optimizer<T: Float, A: Algorithm>(
    opt: &Optimizer<T, A>,
    meta: &CheckpointMeta,
    by: MatchBy,
) -> Result<crate::optimizer::Staged<T, A>> {
    opt.stage_load(&meta.optimizer, &meta.param_groups, &saved_states(meta), by)
}

/// A checkpoint's per-parameter states as the load pipeline reads them.
pub(crate) fn saved_states(meta: &CheckpointMeta) -> Vec<SavedState<'_>> {
    meta.state
        .iter()
        .map(|s| SavedState {
            index: s.index,
            step: s.step,
            scalars: &s.scalars,
            buffers: &s.buffers,
        })
        .collect()
}

/// A stored parameter's tensor name, shape and element range in the arena.
pub(crate) type PlannedParam = (String, Vec<usize>, std::ops::Range<usize>);

/// Matches stored parameter values to the arena's `layout` by name: every parameter of the
/// arena must be stored once, with its shape (torch's strict `load_state_dict` of a model; the
/// load pipeline's [`match_model`](crate::optimizer::load::match_model)). Returns each
/// tensor's name, shape and element range in the arena.
pub(crate) fn plan_params(
    layout: &[crate::arena::ParamInfo],
    stored: &[crate::arena::ParamInfo],
) -> Result<Vec<PlannedParam>> {
    let saved = stored
        .iter()
        .map(|p| (p.name.as_str(), Some(p.shape.as_slice())));
    let matched =
        crate::optimizer::load::match_model(layout, saved, "the checkpoint", "the arena")?;
    Ok(stored
        .iter()
        .zip(matched)
        .map(|(p, i)| (param_tensor(&p.name), p.shape.clone(), layout[i].range()))
        .collect())
}

/// Checks the file's tensor table against `expected` (every tensor announced, with its shape
/// and a float dtype, and every announced one present), then streams the data in file order:
/// each `Take` tensor into the destination `sink` hands to its reader (cast from the tensor's
/// dtype to the destination's, [`dtype`]), each `Skip` tensor only checksummed. Checks the
/// data checksum at the end. Returns the data section's length.
pub(crate) fn stream_data<R: Read + ?Sized, K>(
    r: &mut R,
    tensors: &[TensorEntry],
    mut expected: Expected<K>,
    data_crc: u32,
    mut sink: impl FnMut(K, &mut dyn FnMut(ValuesMut<'_>) -> Result<()>) -> Result<()>,
) -> Result<u64> {
    let mut plan = Vec::with_capacity(tensors.len());
    for t in tensors {
        let Some((shape, dest)) = expected.remove(&t.name) else {
            return Err(bad(format!(
                "tensor `{}` is not described by the metadata",
                t.name
            )));
        };
        let Some(dtype) = FileDtype::from_safetensors(t.dtype) else {
            return Err(bad(format!(
                "tensor `{}` has dtype {:?}; a checkpoint's tensors are F32, F64, BF16 or F16",
                t.name, t.dtype
            )));
        };
        if t.shape != shape {
            return Err(bad(format!(
                "tensor `{}` has shape {:?}, the metadata says {:?}",
                t.name, t.shape, shape
            )));
        }
        plan.push((t, dtype, dest));
    }
    if let Some(name) = expected.keys().next() {
        return Err(bad(format!(
            "tensor `{name}` is described by the metadata but missing"
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut scratch = Vec::new();
    let mut at = 8usize; // after the checksum tensor
    for (t, dtype, dest) in plan {
        let n_bytes = t.data_offsets.1 - t.data_offsets.0;
        if t.data_offsets.0 != at && n_bytes != 0 {
            return Err(bad(format!(
                "tensor `{}` is not where the data continues",
                t.name
            )));
        }
        let what = format!("tensor `{}`", t.name);
        match dest {
            Dest::Take(k) => sink(k, &mut |dst: ValuesMut<'_>| {
                if dst.len() * dtype.size() != n_bytes {
                    return Err(bad(format!(
                        "tensor `{}` holds {n_bytes} bytes of {}, its destination {} elements",
                        t.name,
                        dtype.name(),
                        dst.len()
                    )));
                }
                dtype::read_into(r, &mut crc, dtype, dst, &mut scratch, &what)
            })?,
            Dest::Skip => skip_bytes(r, &mut crc, n_bytes, &mut scratch, &what)?,
        }
        at = t.data_offsets.1;
    }
    let got = crc.finalize();
    if got != data_crc {
        return Err(bad(format!(
            "data checksum mismatch (stored {data_crc:#010x}, computed {got:#010x}): the tensor \
             data is corrupt"
        )));
    }
    Ok(at as u64)
}

/// Loads a checkpoint file written by [`save`] into `opt` (and its parameter values into
/// `params`, when given). See [`read`]; on any error nothing has changed.
pub fn load<T: Float, A: Algorithm>(
    path: impl AsRef<Path>,
    opt: &mut Optimizer<T, A>,
    params: Option<&mut Arena<T>>,
    by: MatchBy,
) -> Result<u64> {
    let path = path.as_ref();
    let file =
        File::open(path).map_err(|e| Error::io(format!("opening `{}`", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading `{}`", path.display()), e))?
        .len();
    let mut r = std::io::BufReader::with_capacity(1 << 16, file);
    read(&mut r, len, opt, params, by)
}

/// Reads a checkpoint's metadata and tensor table from `r` (`file_len` bytes) and verifies both
/// checksums, without loading it anywhere.
pub fn inspect_reader<R: Read + ?Sized>(r: &mut R, file_len: u64) -> Result<CheckpointInfo> {
    let Header {
        meta,
        tensors,
        data_crc,
        file_len,
        ..
    } = read_header(r, file_len)?;
    FileDtype::from_name(&meta.dtype)?;
    let mut crc = crc32fast::Hasher::new();
    let mut scratch = Vec::new();
    for t in &tensors {
        skip_bytes(
            r,
            &mut crc,
            t.data_offsets.1 - t.data_offsets.0,
            &mut scratch,
            &format!("tensor `{}`", t.name),
        )?;
    }
    let got = crc.finalize();
    if got != data_crc {
        return Err(bad(format!(
            "data checksum mismatch (stored {data_crc:#010x}, computed {got:#010x}): the tensor \
             data is corrupt"
        )));
    }
    Ok(CheckpointInfo {
        meta,
        tensors,
        file_len,
    })
}

/// [`inspect_reader`] on a file.
pub fn inspect(path: impl AsRef<Path>) -> Result<CheckpointInfo> {
    let path = path.as_ref();
    let file =
        File::open(path).map_err(|e| Error::io(format!("opening `{}`", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading `{}`", path.display()), e))?
        .len();
    inspect_reader(&mut std::io::BufReader::with_capacity(1 << 20, file), len)
}

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// Saves a binary checkpoint (safetensors) to `path`, atomically; with `params`, the
    /// arena's values too, so one file resumes a run. See [`checkpoint`](crate::checkpoint).
    /// Returns the file's size in bytes.
    pub fn save_checkpoint(
        &self,
        path: impl AsRef<Path>,
        params: Option<&Arena<T>>,
    ) -> Result<u64> {
        save(path, self, params)
    }

    /// Loads a binary checkpoint written by [`Optimizer::save_checkpoint`] (or converted from
    /// PyTorch by `scripts/torch_checkpoint.py`); with `params`, restores the arena's values
    /// too. On any error nothing has changed. See [`checkpoint`](crate::checkpoint).
    pub fn load_checkpoint(
        &mut self,
        path: impl AsRef<Path>,
        params: Option<&mut Arena<T>>,
        by: MatchBy,
    ) -> Result<u64> {
        load(path, self, params, by)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parallel_checksum_is_the_sequential_crc_of_all_bytes() {
        // Three slices, the middle one spanning several pieces, lengths not piece-aligned.
        let a: Vec<f32> = (0..1_000_003).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..(5 * CRC_PIECE / 4 + 17)).map(|i| -(i as f32)).collect();
        let c: Vec<f32> = vec![];
        let d: Vec<f32> = vec![3.25; 9];
        let e: Vec<half::bf16> = (0..1001).map(|i| half::bf16::from_f32(i as f32)).collect();
        let slices: Vec<&[f32]> = vec![&a, &b, &c, &d];
        let mut all = Vec::new();
        for s in &slices {
            for x in s.iter() {
                all.extend_from_slice(&x.to_le_bytes());
            }
        }
        for x in &e {
            all.extend_from_slice(&x.to_le_bytes());
        }
        let mut values: Vec<Values<'_>> = slices.iter().map(|s| Values::F32(s)).collect();
        values.push(Values::Bf16(&e));
        assert_eq!(data_checksum(&values), crc32fast::hash(&all));
        assert_eq!(data_checksum(&[]), crc32fast::hash(&[]));
    }
}
