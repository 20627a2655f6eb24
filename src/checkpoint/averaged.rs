//! Binary checkpoints of an [`AveragedModel`]: the averaged copy of every parameter and
//! `n_averaged` in one safetensors file, with the checksums, atomic save and all-or-nothing
//! load of [the optimizer checkpoints](super).
//!
//! ```
//! use optarena::{AveragedModel, ArenaBuilder};
//! # fn main() -> optarena::Result<()> {
//! let mut b = ArenaBuilder::<f32>::new();
//! b.param("w", &[2], &[0.5, -0.5])?;
//! let arena = b.build();
//! let mut ema = AveragedModel::ema(&arena, 0.99)?;
//! ema.update_parameters(&arena)?;
//!
//! let dir = std::env::temp_dir().join(format!("optarena-avg-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("ema.safetensors");
//! ema.save_checkpoint(&path)?;
//! let mut resumed = AveragedModel::ema(&arena, 0.99)?;
//! resumed.load_checkpoint(&path)?;
//! assert_eq!(resumed.n_averaged(), 1);
//! // Another averaging function is refused, and nothing changes.
//! let mut swa = AveragedModel::new(&arena);
//! assert!(swa.load_checkpoint(&path).is_err());
//! assert_eq!(swa.n_averaged(), 0);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```
//!
//! # The file
//! The [optimizer checkpoint's layout](super::format), with:
//! - tensors `module.<name>` (the model's dtype, the parameter's shape): the averaged values,
//!   in the model's parameter order, then `n_averaged` (`I64`, shape `[]`): torch's
//!   `AveragedModel.state_dict()` keys, so Python's `safetensors.torch.load_file` gives a dict
//!   that `swa_model.load_state_dict` takes once `optarena.crc32` is dropped;
//! - metadata `optimizer: "AveragedModel"`, no `state`, and one param group whose
//!   hyperparameters are the averaging function (`avg_fn`: `"swa"` or `"ema"`; `decay`: the
//!   EMA's decay, or `null`) and whose parameters are the model's (number, name, offset,
//!   shape).
//!
//! # Loading
//! Parameters are matched by name, so a model whose arena registered them in another order
//! loads correctly (offsets are recorded, not relied on); every parameter of the model must be
//! in the file with its shape, and nothing else. A file saved in f64 loads into an f32 model
//! and the reverse (each value cast, as torch's `load_state_dict` casts). The averaging
//! function is part of what the values mean, so a file made by another one (SWA against EMA,
//! or another decay) is refused rather than adopted: build the model with the saved function
//! (the JSON [`AveragedModel::load_state_dict`] adopts it instead). A swapped model refuses
//! both saving and loading. On any error nothing has changed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::Dtype;

use super::atomic::{self, SaveTarget, StdFs};
use super::format::{read_header, CheckpointMeta, FileDtype, FORMAT_NAME, FORMAT_VERSION};
use super::tensors::{open, read_tensors, write_tensors, Expected, Into, Out, RawOut};
use crate::arena::AlignedBuf;
use crate::averaged::{AverageFn, AveragedModel};
use crate::buffer::Role;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::HyperValue;
use crate::optimizer::load::match_model;
use crate::state::{GroupDict, ParamRef};

/// The metadata's `optimizer` field for an averaged model.
pub const KIND: &str = "AveragedModel";
/// The tensor holding `n_averaged` (torch's buffer name).
pub const N_AVERAGED_TENSOR: &str = "n_averaged";

/// Name of the tensor holding the averaged values of parameter `name` (torch's key in
/// `AveragedModel.state_dict()`, whose averaged copy is the submodule `module`).
pub fn module_tensor(name: &str) -> String {
    format!("module.{name}")
}

fn state_error(msg: String) -> Error {
    Error::StateDict(format!("AveragedModel: {msg}"))
}

fn avg_hyperparams(avg: AverageFn) -> BTreeMap<String, HyperValue> {
    let (name, decay) = match avg {
        AverageFn::Swa => ("swa", HyperValue::None),
        AverageFn::Ema { decay } => ("ema", HyperValue::Number(decay)),
    };
    BTreeMap::from([
        ("avg_fn".to_string(), HyperValue::Str(name.to_string())),
        ("decay".to_string(), decay),
    ])
}

fn avg_from(h: &BTreeMap<String, HyperValue>) -> Result<AverageFn> {
    let keys: Vec<&String> = h.keys().collect();
    if keys != ["avg_fn", "decay"] {
        return Err(state_error(format!(
            "the averaging function is described by {keys:?}; expected avg_fn and decay"
        )));
    }
    match (&h["avg_fn"], &h["decay"]) {
        (HyperValue::Str(s), HyperValue::None) if s == "swa" => Ok(AverageFn::Swa),
        (HyperValue::Str(s), HyperValue::Number(d)) if s == "ema" => {
            AverageFn::ema(*d).map_err(|e| state_error(e.to_string()))
        }
        (f, d) => Err(state_error(format!(
            "averaging function {f} with decay {d} is not one optarena knows (\"swa\" with \
             decay None, or \"ema\" with a number)"
        ))),
    }
}

fn describe(avg: AverageFn) -> String {
    match avg {
        AverageFn::Swa => "SWA's equal mean".to_string(),
        AverageFn::Ema { decay } => format!("an EMA with decay {decay:?}"),
    }
}

/// Writes a checkpoint of `m` to `w` (not atomic: see [`save`] for files). Refused while the
/// averaged weights are swapped into the arena. Returns the number of bytes written.
pub fn write<T: Float, W: Write + ?Sized>(w: &mut W, m: &AveragedModel<T>) -> Result<u64> {
    if m.is_swapped() {
        return Err(Error::ArenaMismatch(
            "AveragedModel: cannot save the average while the averaged weights are swapped \
             into the arena; call swap_into again first"
                .to_string(),
        ));
    }
    let n = i64::try_from(m.n_averaged()).map_err(|_| {
        state_error(format!(
            "n_averaged {} does not fit torch's int64 buffer",
            m.n_averaged()
        ))
    })?;
    let layout = m.layout();
    let meta = CheckpointMeta {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        optimizer: KIND.to_string(),
        dtype: T::DTYPE.to_string(),
        param_groups: vec![GroupDict {
            hyperparams: avg_hyperparams(m.avg_fn()),
            params: layout
                .iter()
                .enumerate()
                .map(|(index, i)| ParamRef {
                    index,
                    name: i.name.clone(),
                    offset: i.offset,
                    shape: i.shape.clone(),
                })
                .collect(),
        }],
        state: Vec::new(),
        params: None,
    };
    let values: Vec<Out<'_, T>> = layout
        .iter()
        .map(|i| Out {
            name: module_tensor(&i.name),
            shape: i.shape.clone(),
            values: &m.averaged()[i.range()],
        })
        .collect();
    let raw = [RawOut {
        name: N_AVERAGED_TENSOR.to_string(),
        dtype: Dtype::I64,
        shape: Vec::new(),
        bytes: n.to_le_bytes().to_vec(),
    }];
    write_tensors(w, &meta, &values, &raw)
}

/// Saves a checkpoint of `m` to `path` atomically (a temporary file beside it, synced, renamed
/// over it): a crash or I/O error leaves the previous file intact. Returns the file's size.
pub fn save<T: Float>(path: impl AsRef<Path>, m: &AveragedModel<T>) -> Result<u64> {
    save_with(&StdFs, path, m)
}

/// [`save`] through another [`SaveTarget`] (a test double that fails on cue).
pub fn save_with<S: SaveTarget, T: Float>(
    target: &S,
    path: impl AsRef<Path>,
    m: &AveragedModel<T>,
) -> Result<u64> {
    if m.is_swapped() {
        // Refused before a temporary file is made.
        return write(&mut std::io::sink(), m);
    }
    atomic::write_atomic(target, path.as_ref(), |w| write(w, m))
}

/// Loads a checkpoint of `file_len` bytes from `r` into `m` (see the [module docs](self)). On
/// any error nothing has changed. Returns the number of bytes read.
pub fn read<T: Float, R: Read + ?Sized>(
    r: &mut R,
    file_len: u64,
    m: &mut AveragedModel<T>,
) -> Result<u64> {
    if m.is_swapped() {
        return Err(Error::ArenaMismatch(
            "AveragedModel: cannot load a state while the averaged weights are swapped into \
             the arena; call swap_into again first"
                .to_string(),
        ));
    }
    let header = read_header(r, file_len)?;
    let meta = &header.meta;
    FileDtype::from_name(&meta.dtype)?;
    if meta.optimizer != KIND {
        return Err(state_error(format!(
            "the checkpoint was saved by {}, not by an AveragedModel",
            meta.optimizer
        )));
    }
    if !meta.state.is_empty() || meta.params.is_some() {
        return Err(Error::Checkpoint(
            "an AveragedModel checkpoint has no optimizer state and no `params` list".to_string(),
        ));
    }
    let [group] = meta.param_groups.as_slice() else {
        return Err(Error::Checkpoint(format!(
            "an AveragedModel checkpoint has one param group, this one has {}",
            meta.param_groups.len()
        )));
    };
    let saved_avg = avg_from(&group.hyperparams)?;
    if saved_avg != m.avg_fn() {
        return Err(state_error(format!(
            "the checkpoint was averaged with {}, this model averages with {}; build the model \
             with the saved function",
            describe(saved_avg),
            describe(m.avg_fn())
        )));
    }
    // Every parameter of the model by name, once, with its shape, and nothing else: the load
    // pipeline's rule for a whole model's values (crate::optimizer::load::match_model).
    let layout = m.layout();
    let saved = group
        .params
        .iter()
        .map(|p| (p.name.as_str(), Some(p.shape.as_slice())));
    let matched =
        match_model(layout, saved, "the checkpoint", "this model").map_err(|e| match e {
            Error::StateDict(msg) => state_error(msg),
            e => e,
        })?;
    let mut expected = BTreeMap::new();
    for (p, i) in group.params.iter().zip(matched) {
        let into = Into::Values {
            buf: 0,
            range: layout[i].range(),
        };
        let shape = p.shape.clone();
        expected.insert(module_tensor(&p.name), Expected { shape, into });
    }
    expected.insert(
        N_AVERAGED_TENSOR.to_string(),
        Expected {
            shape: Vec::new(),
            into: Into::Raw {
                slot: 0,
                dtype: Dtype::I64,
            },
        },
    );
    let mut staged = AlignedBuf::filled(Role::Params, m.averaged().len(), T::ZERO);
    let mut raw = vec![Vec::new()];
    read_tensors(r, &header, expected, &mut [&mut staged[..]], &mut raw)?;
    let n = i64::from_le_bytes(raw[0][..].try_into().expect("8 bytes, checked by shape"));
    let n = u64::try_from(n)
        .map_err(|_| state_error(format!("n_averaged is {n}, a negative count")))?;
    m.commit_loaded(staged, n);
    Ok(header.file_len)
}

/// Loads a checkpoint file written by [`save`] into `m`. See [`read`]; on any error nothing
/// has changed.
pub fn load<T: Float>(path: impl AsRef<Path>, m: &mut AveragedModel<T>) -> Result<u64> {
    let (mut r, len) = open(path.as_ref())?;
    read(&mut r, len, m)
}
