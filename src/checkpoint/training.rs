//! One-call training checkpoints: the arena's parameters by name, any number of optimizers and
//! LR schedulers, the [`GradScaler`], a step counter and user metadata, saved atomically in one
//! file and loaded all or nothing.
//!
//! torch needs `torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
//! "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step, ...})` and the
//! matching loads, one object at a time (a failure half-way leaves a half-restored run). Here
//! the pieces are lent by name to a [`TrainingCheckpoint`] (saving) or a [`TrainingRestore`]
//! (loading):
//!
//! ```
//! use optarena::checkpoint::{TrainingCheckpoint, TrainingRestore};
//! use optarena::schedule::{LrScheduler, StepLR, StepLRConfig};
//! use optarena::{AdamW, AdamWConfig, ArenaBuilder, GradScaler, ParamGroup};
//! # fn main() -> optarena::Result<()> {
//! let build = || {
//!     let mut b = ArenaBuilder::<f32>::new();
//!     b.param("w", &[2], &[0.5, -0.5]).unwrap();
//!     b.build()
//! };
//! let mut arena = build();
//! let mut opt = AdamW::new(&arena, [ParamGroup::all()], AdamWConfig::default())?;
//! let mut sched = StepLR::new(&mut opt, StepLRConfig::new(2))?;
//! let scaler = GradScaler::default();
//! arena.grads_mut().copy_from_slice(&[0.1, 0.2]);
//! opt.step(&mut arena)?;
//! sched.step(&mut opt)?;
//!
//! let dir = std::env::temp_dir().join(format!("optarena-train-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("run.safetensors");
//! TrainingCheckpoint::new(&arena)
//!     .optimizer("adamw", &opt)
//!     .scheduler("lr", &sched)
//!     .scaler(&scaler)
//!     .step(1)
//!     .metadata("loader", serde_json::json!({"epoch": 0, "batch": 1}))
//!     .save(&path)?;
//!
//! // A fresh process: rebuild everything as before, then one call restores it all.
//! let mut arena2 = build();
//! let mut opt2 = AdamW::new(&arena2, [ParamGroup::all()], AdamWConfig::default())?;
//! let mut sched2 = StepLR::new(&mut opt2, StepLRConfig::new(2))?;
//! let mut scaler2 = GradScaler::default();
//! let loaded = TrainingRestore::new(&mut arena2)
//!     .optimizer("adamw", &mut opt2)
//!     .scheduler("lr", &mut sched2)
//!     .scaler(&mut scaler2)
//!     .load(&path)?;
//! assert_eq!(loaded.step, 1);
//! assert_eq!(loaded.metadata["loader"]["batch"], 1);
//! assert_eq!(arena2.params(), arena.params());
//! assert_eq!(opt2.state_dict(), opt.state_dict());
//! assert_eq!(sched2.state_dict()?, sched.state_dict()?);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(()) }
//! ```
//!
//! # The file
//! A safetensors file in the layout of the optimizer checkpoints ([`crate::checkpoint`]): the
//! `optarena.crc32` tensor first (CRC-32 of the header, then of all data), then
//! - `param.<name>`: every parameter of the arena, in arena order;
//! - `optim.<optimizer name>.state.<number>.<buffer>`: each optimizer's state buffers, named as
//!   in an optimizer checkpoint under the name it was given (`BF16` for bf16 state);
//! - `half.<buffer name>.<parameter name>`: each [`HalfBuffer`] given
//!   ([`TrainingCheckpoint::half_buffer`], f32 arenas: a mixed-precision step's bf16/f16
//!   parameter copy or gradients), its present parameters in its own dtype;
//!
//! and `__metadata__["optarena"]` holds [`TrainingMeta`] as JSON: format
//! `"optarena-training"` and its version, the dtype, the parameters' names, offsets and shapes,
//! each optimizer's [`CheckpointMeta`] (kind, groups, per-parameter steps and scalars) and its
//! groups' `initial_lr`, each scheduler's kind and [`LrScheduler::state_dict`], the scaler, the
//! step and the user metadata.
//!
//! # Guarantees
//! - [`TrainingCheckpoint::save`] writes a temporary file, fsyncs it, renames it over the old
//!   one and fsyncs the directory ([`super::atomic`]): a crash or an I/O error at any point
//!   leaves the previous checkpoint as it was.
//! - [`TrainingRestore::load`] checks both checksums, the format, that every name given is in
//!   the file with the same kind and that the file holds nothing that was not given, that the
//!   arena has exactly the saved parameters (by name and shape, in any registration order) and
//!   that every optimizer was built on that arena; it reads every tensor into staged buffers
//!   and loads every scheduler state (putting the earlier ones back if a later one fails)
//!   before anything else changes. On any error nothing has changed.
//! - Optimizers are matched to their saved state by parameter name ([`MatchBy::Name`]), so a
//!   model rebuilt in another registration order resumes bit for bit.
//! - Tensors load across dtypes, cast as torch's `tensor.to(dtype)` ([`super::dtype`]): a bf16
//!   copy into an f16 [`HalfBuffer`], bf16 optimizer state into an f32-state optimizer.
//! - Schedulers get their state only (torch's `load_state_dict`), not the lr it last set: the
//!   optimizers come from the same file, with the lrs they had when it was saved, including an
//!   lr set by hand after the scheduler stepped. The groups' `initial_lr` are restored too.
//! - L-BFGS ([`LBFGS`]) has no binary checkpoint: its state (flat vectors and the history) is
//!   saved as its JSON state dict inside the metadata (`OptimizerEntry::state_dict`), checked
//!   and converted before anything changes, like the others. The metadata is limited to
//!   100 MB (safetensors' header limit), about two million saved values.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::atomic::{self, SaveTarget, StdFs};
use super::dtype::{float_values_mut, Owned, Values, ValuesMut};
use super::format::{self, read_raw_header, CheckpointMeta, FileDtype, RawHeader, TensorEntry};
use super::{plan_params, stream_data, zeroed, Body, Dest, Expected};
use crate::arena::{Arena, ParamInfo};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::GroupHyperparams;
use crate::mixed::{HalfBuffer, Storage};
use crate::optim::lbfgs::{LBFGSStateDict, LBFGS};
use crate::optimizer::{Algorithm, Optimizer};
use crate::scaler::GradScaler;
use crate::schedule::LrScheduler;
use crate::state::MatchBy;

/// The value of the metadata's `format` field in a training checkpoint.
pub const TRAINING_FORMAT_NAME: &str = "optarena-training";
/// Version of the training checkpoint layout this build writes and reads.
pub const TRAINING_FORMAT_VERSION: u32 = 1;

/// Everything a training checkpoint says besides tensor values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingMeta {
    /// Always [`TRAINING_FORMAT_NAME`].
    pub format: String,
    /// [`TRAINING_FORMAT_VERSION`] at the time of saving.
    pub version: u32,
    /// The dtype of every tensor: `"float32"` or `"float64"`.
    pub dtype: String,
    /// The arena's parameters (stored as `param.<name>`), in arena order.
    pub params: Vec<ParamInfo>,
    /// The optimizers, in the order given.
    pub optimizers: Vec<OptimizerEntry>,
    /// The schedulers, in the order given.
    pub schedulers: Vec<SchedulerEntry>,
    /// The loss scaler, if one was given.
    #[serde(default)]
    pub scaler: Option<GradScaler>,
    /// The caller's step counter.
    pub step: u64,
    /// The caller's metadata (a data loader's position, an RNG state, ...), by key.
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
    /// The [`HalfBuffer`]s (a mixed-precision step's bf16/f16 parameter copy or gradients),
    /// in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub half_buffers: Vec<HalfEntry>,
}

/// One [`HalfBuffer`] of a training checkpoint: its present parameters are stored as
/// `half.<name>.<parameter name>` tensors of the parameter's shape, in the buffer's own dtype
/// (`BF16`, `F16` or `F32`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HalfEntry {
    /// The name it was given.
    pub name: String,
    /// Its element type, torch's name (`"bfloat16"`).
    pub dtype: String,
    /// The parameters whose slot was present (stored), in arena order; the others load as
    /// absent.
    pub present: Vec<String>,
}

/// One optimizer of a training checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerEntry {
    /// The name it was given.
    pub name: String,
    /// Its kind, groups and per-parameter metadata, as in an optimizer checkpoint (`params`
    /// is `None`: the parameters are stored once, for the arena).
    pub checkpoint: CheckpointMeta,
    /// Each group's `initial_lr` (torch keeps it in the group dict).
    pub initial_lr: Vec<Option<f64>>,
    /// The whole state dict as JSON, for an optimizer without a binary checkpoint (L-BFGS,
    /// whose state is flat vectors and a history); `None` for the others, whose state is
    /// in tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dict: Option<Value>,
}

/// One scheduler of a training checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerEntry {
    /// The name it was given.
    pub name: String,
    /// torch's class name (`"SequentialLR"`).
    pub scheduler: String,
    /// Its [`LrScheduler::state_dict`].
    pub state: Value,
}

mod sealed {
    use std::any::Any;

    use crate::checkpoint::dtype::{Values, ValuesMut};
    use crate::checkpoint::format::CheckpointMeta;
    use crate::error::Result;

    /// A staged load of one optimizer, as `Any` (it is typed by the optimizer's algorithm).
    pub type AnyStaged = Box<dyn Any>;

    /// An optimizer's state tensors: (tensor name, shape, values in their own dtype).
    pub type StateTensors<'a> = Vec<(String, Vec<usize>, Values<'a>)>;

    /// The pieces of the binary checkpoint code a training checkpoint drives.
    pub trait Sealed<T> {
        /// The identity of the arena the optimizer was built for.
        fn arena_identity(&self) -> u64;
        /// The state's metadata and its buffers: (tensor name, shape, values).
        fn state_tensors(&self) -> Result<(CheckpointMeta, StateTensors<'_>)>;
        /// The whole state dict as JSON, for an optimizer whose state is not in tensors.
        fn state_dict_value(&self) -> Result<Option<serde_json::Value>>;
        /// Checks `meta` (and the JSON state dict, for an optimizer that has one) against the
        /// optimizer and stages buffers for it.
        fn stage(
            &self,
            meta: &CheckpointMeta,
            state_dict: Option<&serde_json::Value>,
        ) -> Result<AnyStaged>;
        /// The staged (parameter number, buffer, shape) slots.
        fn staged_slots(&self, staged: &AnyStaged) -> Vec<(usize, String, Vec<usize>)>;
        /// One staged slot's values.
        fn staged_slot<'s>(
            &self,
            staged: &'s mut AnyStaged,
            index: usize,
            name: &str,
        ) -> Option<ValuesMut<'s>>;
        /// Swaps a staged load in. Cannot fail.
        fn commit(&mut self, staged: AnyStaged);
    }
}

use sealed::{AnyStaged, Sealed};

/// An optimizer a training checkpoint can hold: every [`Optimizer`] (`Adam`, `AdamW`, `SGD`,
/// `Muon`, ...). Sealed: its methods are the binary checkpoint's.
pub trait TrainingOptimizer<T: Float>: Sealed<T> + GroupHyperparams {
    /// torch's class name (`"AdamW"`).
    fn kind(&self) -> &'static str;
}

impl<T: Float, A: Algorithm> TrainingOptimizer<T> for Optimizer<T, A> {
    fn kind(&self) -> &'static str {
        A::NAME
    }
}

impl<T: Float, A: Algorithm> Sealed<T> for Optimizer<T, A> {
    fn arena_identity(&self) -> u64 {
        Optimizer::arena_identity(self)
    }
    fn state_tensors(&self) -> Result<(CheckpointMeta, sealed::StateTensors<'_>)> {
        let mut body = Body::new()?;
        let meta = body.push_optimizer(self, "")?;
        Ok((meta, body.into_tensors()))
    }
    fn state_dict_value(&self) -> Result<Option<Value>> {
        Ok(None)
    }
    fn stage(&self, meta: &CheckpointMeta, state_dict: Option<&Value>) -> Result<AnyStaged> {
        if state_dict.is_some() {
            return Err(Error::Checkpoint(format!(
                "a {} state is saved in tensors, but the checkpoint has a JSON state dict for it",
                A::NAME
            )));
        }
        Ok(Box::new(super::stage_optimizer(self, meta, MatchBy::Name)?))
    }
    fn staged_slots(&self, staged: &AnyStaged) -> Vec<(usize, String, Vec<usize>)> {
        let staged = staged
            .downcast_ref::<crate::optimizer::Staged<T, A>>()
            .expect("staged by this optimizer");
        staged
            .slots()
            .map(|(i, n, s)| (i, n.to_string(), s.to_vec()))
            .collect()
    }
    fn staged_slot<'s>(
        &self,
        staged: &'s mut AnyStaged,
        index: usize,
        name: &str,
    ) -> Option<ValuesMut<'s>> {
        staged
            .downcast_mut::<crate::optimizer::Staged<T, A>>()
            .expect("staged by this optimizer")
            .slot_mut(index, name)
    }
    fn commit(&mut self, staged: AnyStaged) {
        let staged = staged
            .downcast::<crate::optimizer::Staged<T, A>>()
            .expect("staged by this optimizer");
        self.commit_staged(*staged);
    }
}

/// L-BFGS: its state (flat vectors and a history over the group's parameters) is saved as its
/// JSON state dict ([`LBFGS::state_dict`]) in the metadata, and matched by parameter name on
/// load, as [`LBFGS::load_state_dict`] does; no tensors.
impl<T: Float> TrainingOptimizer<T> for LBFGS<T> {
    fn kind(&self) -> &'static str {
        "LBFGS"
    }
}

impl<T: Float> Sealed<T> for LBFGS<T> {
    fn arena_identity(&self) -> u64 {
        LBFGS::arena_identity(self)
    }
    fn state_tensors(&self) -> Result<(CheckpointMeta, sealed::StateTensors<'_>)> {
        let sd = self.state_dict();
        let meta = CheckpointMeta {
            format: format::FORMAT_NAME.to_string(),
            version: format::FORMAT_VERSION,
            optimizer: "LBFGS".to_string(),
            dtype: T::DTYPE.to_string(),
            param_groups: sd.param_groups,
            state: Vec::new(),
            params: None,
        };
        Ok((meta, Vec::new()))
    }
    fn state_dict_value(&self) -> Result<Option<Value>> {
        Ok(Some(serde_json::to_value(self.state_dict())?))
    }
    fn stage(&self, meta: &CheckpointMeta, state_dict: Option<&Value>) -> Result<AnyStaged> {
        let Some(v) = state_dict else {
            return Err(Error::Checkpoint(
                "the checkpoint has no JSON state dict for this LBFGS optimizer".to_string(),
            ));
        };
        if !meta.state.is_empty() {
            return Err(Error::Checkpoint(
                "an LBFGS state is saved as JSON, but the checkpoint has tensors for it"
                    .to_string(),
            ));
        }
        let dtype = v.get("dtype").and_then(Value::as_str).unwrap_or_default();
        let load = if dtype == <f64 as Float>::DTYPE {
            let sd: LBFGSStateDict<f64> = serde_json::from_value(v.clone())
                .map_err(|e| Error::StateDict(format!("LBFGS state dict: {e}")))?;
            self.prepare_load(&sd, MatchBy::Name)?
        } else {
            let sd: LBFGSStateDict<f32> = serde_json::from_value(v.clone())
                .map_err(|e| Error::StateDict(format!("LBFGS state dict: {e}")))?;
            self.prepare_load(&sd, MatchBy::Name)?
        };
        Ok(Box::new(load))
    }
    fn staged_slots(&self, _staged: &AnyStaged) -> Vec<(usize, String, Vec<usize>)> {
        Vec::new()
    }
    fn staged_slot<'s>(
        &self,
        _staged: &'s mut AnyStaged,
        _index: usize,
        _name: &str,
    ) -> Option<ValuesMut<'s>> {
        None
    }
    fn commit(&mut self, staged: AnyStaged) {
        let load = staged
            .downcast::<crate::optim::lbfgs::LBFGSLoad<T>>()
            .expect("staged by this optimizer");
        self.commit_load(*load);
    }
}

/// Tensor-name prefix of half buffer `name`'s parameters.
fn half_prefix(name: &str) -> String {
    format!("half.{name}.")
}

/// A [`HalfBuffer`] of any element type, as a training load restores it.
trait HalfTarget {
    fn arena_id(&self) -> u64;
    fn infos(&self) -> &[ParamInfo];
    fn dtype(&self) -> FileDtype;
    fn commit(&mut self, values: Values<'_>, present: Vec<bool>);
}

impl<H: Storage> HalfTarget for HalfBuffer<H> {
    fn arena_id(&self) -> u64 {
        HalfBuffer::arena_id(self)
    }
    fn infos(&self) -> &[ParamInfo] {
        HalfBuffer::infos(self)
    }
    fn dtype(&self) -> FileDtype {
        FileDtype::from_name(H::DTYPE).expect("a storage type is a file dtype")
    }
    fn commit(&mut self, values: Values<'_>, present: Vec<bool>) {
        self.commit_loaded(values, present)
    }
}

/// Tensor-name prefix of optimizer `name`'s state.
fn optim_prefix(name: &str) -> String {
    format!("optim.{name}.")
}

fn check_name(what: &str, name: &str, taken: &[&str]) -> Result<()> {
    if name.is_empty() {
        return Err(Error::CheckpointName(format!(
            "a {what} in a training checkpoint needs a name"
        )));
    }
    if taken.contains(&name) {
        return Err(Error::CheckpointName(format!(
            "two {what}s named `{name}` in one training checkpoint"
        )));
    }
    Ok(())
}

/// A whole training state to save: borrows the arena and, by name, any number of optimizers
/// and schedulers, a [`GradScaler`], a step counter and metadata. See the [module
/// docs](self).
pub struct TrainingCheckpoint<'a, T: Float> {
    arena: &'a Arena<T>,
    optimizers: Vec<(String, &'a dyn TrainingOptimizer<T>)>,
    schedulers: Vec<(String, &'a dyn LrScheduler)>,
    scaler: Option<&'a GradScaler>,
    step: u64,
    metadata: BTreeMap<String, Value>,
    halves: Vec<HalfSource<'a>>,
}

/// A [`HalfBuffer`] given to a [`TrainingCheckpoint`], of any element type.
struct HalfSource<'a> {
    name: String,
    arena_id: u64,
    infos: &'a [ParamInfo],
    values: Values<'a>,
    present: &'a [bool],
}

impl<'a> TrainingCheckpoint<'a, f32> {
    /// Adds a [`HalfBuffer`] of the arena (a mixed-precision step's bf16/f16 parameter copy,
    /// or half gradients) under `name`: each present parameter is stored in the buffer's own
    /// dtype, no widening.
    pub fn half_buffer<H: Storage>(mut self, name: &str, buf: &'a HalfBuffer<H>) -> Self {
        self.halves.push(HalfSource {
            name: name.to_string(),
            arena_id: buf.arena_id(),
            infos: buf.infos(),
            values: buf.values(),
            present: buf.present(),
        });
        self
    }
}

impl<'a, T: Float> TrainingCheckpoint<'a, T> {
    /// A checkpoint of `arena`'s parameters (by name); add the rest with the builder methods.
    pub fn new(arena: &'a Arena<T>) -> Self {
        TrainingCheckpoint {
            arena,
            optimizers: Vec::new(),
            schedulers: Vec::new(),
            scaler: None,
            step: 0,
            metadata: BTreeMap::new(),
            halves: Vec::new(),
        }
    }

    /// Adds optimizer `opt` (built on the arena) under `name`.
    pub fn optimizer(mut self, name: &str, opt: &'a dyn TrainingOptimizer<T>) -> Self {
        self.optimizers.push((name.to_string(), opt));
        self
    }

    /// Adds scheduler `sched` under `name`.
    pub fn scheduler(mut self, name: &str, sched: &'a dyn LrScheduler) -> Self {
        self.schedulers.push((name.to_string(), sched));
        self
    }

    /// Adds the loss scaler.
    pub fn scaler(mut self, scaler: &'a GradScaler) -> Self {
        self.scaler = Some(scaler);
        self
    }

    /// Sets the step counter saved (0 unless set).
    pub fn step(mut self, step: u64) -> Self {
        self.step = step;
        self
    }

    /// Adds a metadata entry (any JSON: a data loader's position, an RNG state, ...).
    pub fn metadata(mut self, key: &str, value: Value) -> Self {
        self.metadata.insert(key.to_string(), value);
        self
    }

    /// Saves to `path`, atomically. Returns the file's size in bytes.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<u64> {
        self.save_with(&StdFs, path)
    }

    /// [`TrainingCheckpoint::save`] through another [`SaveTarget`] (a test double that fails
    /// on cue).
    pub fn save_with<S: SaveTarget>(&self, target: &S, path: impl AsRef<Path>) -> Result<u64> {
        let (meta, body) = self.encode()?;
        let json = serde_json::to_string(&meta)?;
        atomic::write_atomic(target, path.as_ref(), |w| body.write(w, json))
    }

    /// Writes the checkpoint to `w` (not atomic: [`TrainingCheckpoint::save`] is, for files).
    /// Returns the number of bytes written.
    pub fn write<W: Write + ?Sized>(&self, w: &mut W) -> Result<u64> {
        let (meta, body) = self.encode()?;
        body.write(w, serde_json::to_string(&meta)?)
    }

    fn encode(&self) -> Result<(TrainingMeta, Body<'a, T>)> {
        let mut names: Vec<&str> = Vec::new();
        for (name, opt) in &self.optimizers {
            check_name("optimizer", name, &names)?;
            names.push(name);
            if opt.arena_identity() != self.arena.id() {
                return Err(Error::ArenaMismatch(format!(
                    "optimizer `{name}` ({}) was built for another arena",
                    opt.kind()
                )));
            }
        }
        let mut snames: Vec<&str> = Vec::new();
        for (name, _) in &self.schedulers {
            check_name("scheduler", name, &snames)?;
            snames.push(name);
        }
        let mut hnames: Vec<&str> = Vec::new();
        for HalfSource { name, arena_id, .. } in &self.halves {
            check_name("half buffer", name, &hnames)?;
            hnames.push(name);
            if *arena_id != self.arena.id() {
                return Err(Error::ArenaMismatch(format!(
                    "half buffer `{name}` was built for another arena"
                )));
            }
        }
        let mut body = Body::new()?;
        let params = body.push_params(self.arena);
        let mut half_buffers = Vec::with_capacity(self.halves.len());
        for HalfSource {
            name,
            infos,
            values,
            present,
            ..
        } in &self.halves
        {
            let prefix = half_prefix(name);
            let mut stored = Vec::new();
            for (info, &p) in infos.iter().zip(present.iter()) {
                if p {
                    body.push(
                        format!("{prefix}{}", info.name),
                        info.shape.clone(),
                        values.slice(info.range()),
                    );
                    stored.push(info.name.clone());
                }
            }
            half_buffers.push(HalfEntry {
                name: name.clone(),
                dtype: values.dtype().name().to_string(),
                present: stored,
            });
        }
        let mut optimizers = Vec::with_capacity(self.optimizers.len());
        for (name, opt) in &self.optimizers {
            let opt: &'a dyn TrainingOptimizer<T> = *opt;
            let (checkpoint, tensors) = opt.state_tensors()?;
            let prefix = optim_prefix(name);
            for (tensor, shape, values) in tensors {
                body.push(format!("{prefix}{tensor}"), shape, values);
            }
            let initial_lr = (0..opt.num_groups())
                .map(|g| opt.group_initial_lr(g))
                .collect::<Result<_>>()?;
            optimizers.push(OptimizerEntry {
                name: name.clone(),
                checkpoint,
                initial_lr,
                state_dict: opt.state_dict_value()?,
            });
        }
        let schedulers = self
            .schedulers
            .iter()
            .map(|(name, s)| {
                Ok(SchedulerEntry {
                    name: name.clone(),
                    scheduler: s.name().to_string(),
                    state: s.state_dict()?,
                })
            })
            .collect::<Result<_>>()?;
        let meta = TrainingMeta {
            format: TRAINING_FORMAT_NAME.to_string(),
            version: TRAINING_FORMAT_VERSION,
            dtype: T::DTYPE.to_string(),
            params,
            optimizers,
            schedulers,
            scaler: self.scaler.cloned(),
            step: self.step,
            metadata: self.metadata.clone(),
            half_buffers,
        };
        Ok((meta, body))
    }
}

/// What [`TrainingRestore::load`] returns besides the restored objects.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedTraining {
    /// The step counter saved.
    pub step: u64,
    /// The metadata saved, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The file's size in bytes.
    pub bytes: u64,
}

/// What [`inspect_training`] finds in a training checkpoint.
#[derive(Debug, Clone)]
pub struct TrainingInfo {
    /// The metadata.
    pub meta: TrainingMeta,
    /// Every tensor but the checksum one, in file order.
    pub tensors: Vec<TensorEntry>,
    /// The file's length in bytes.
    pub file_len: u64,
}

/// A whole training state to load: borrows, mutably and by the names they were saved under,
/// the arena, the optimizers, the schedulers and the scaler. See the [module docs](self).
pub struct TrainingRestore<'a, T: Float> {
    arena: &'a mut Arena<T>,
    optimizers: Vec<(String, &'a mut dyn TrainingOptimizer<T>)>,
    schedulers: Vec<(String, &'a mut dyn LrScheduler)>,
    scaler: Option<&'a mut GradScaler>,
    halves: Vec<(String, &'a mut dyn HalfTarget)>,
}

/// Where a training checkpoint's tensors go.
enum TrainDest {
    Param(std::ops::Range<usize>),
    Optim(usize, usize, String),
    /// Half buffer number, element range.
    Half(usize, std::ops::Range<usize>),
}

impl<'a> TrainingRestore<'a, f32> {
    /// Restores [`HalfBuffer`] `buf` (of the arena) from the one saved as `name`: its values,
    /// cast from the saved dtype to `H` as torch casts ([`super::dtype`]), and which
    /// parameters are present (the others are zeroed and absent).
    pub fn half_buffer<H: Storage>(mut self, name: &str, buf: &'a mut HalfBuffer<H>) -> Self {
        self.halves.push((name.to_string(), buf));
        self
    }
}

impl<'a, T: Float> TrainingRestore<'a, T> {
    /// A load into `arena` (every saved parameter, matched by name); add the rest with the
    /// builder methods.
    pub fn new(arena: &'a mut Arena<T>) -> Self {
        TrainingRestore {
            arena,
            optimizers: Vec::new(),
            schedulers: Vec::new(),
            scaler: None,
            halves: Vec::new(),
        }
    }

    /// Restores optimizer `opt` (built on the arena) from the one saved as `name`.
    pub fn optimizer(mut self, name: &str, opt: &'a mut dyn TrainingOptimizer<T>) -> Self {
        self.optimizers.push((name.to_string(), opt));
        self
    }

    /// Restores scheduler `sched` from the one saved as `name` (same kind, same closures).
    pub fn scheduler(mut self, name: &str, sched: &'a mut dyn LrScheduler) -> Self {
        self.schedulers.push((name.to_string(), sched));
        self
    }

    /// Restores the loss scaler.
    pub fn scaler(mut self, scaler: &'a mut GradScaler) -> Self {
        self.scaler = Some(scaler);
        self
    }

    /// Loads the file at `path`. On any error nothing has changed.
    pub fn load(self, path: impl AsRef<Path>) -> Result<LoadedTraining> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening `{}`", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading `{}`", path.display()), e))?
            .len();
        self.read(&mut std::io::BufReader::with_capacity(1 << 16, file), len)
    }

    /// Loads a checkpoint of `file_len` bytes from `r`. On any error nothing has changed.
    pub fn read<R: Read + ?Sized>(self, r: &mut R, file_len: u64) -> Result<LoadedTraining> {
        let TrainingRestore {
            arena,
            mut optimizers,
            mut schedulers,
            scaler,
            mut halves,
        } = self;
        let RawHeader {
            meta_json,
            tensors,
            data_crc,
            header_len,
            file_len,
        } = read_raw_header(r, file_len)?;
        let meta = parse_training_meta(&meta_json)?;
        FileDtype::from_name(&meta.dtype)?;
        // The model first: the arena must have exactly the saved parameters.
        let mut expected: Expected<TrainDest> = Default::default();
        for (name, shape, range) in plan_params(arena.infos(), &meta.params)? {
            expected.insert(name, (shape, Dest::Take(TrainDest::Param(range))));
        }
        // Names and kinds: exactly what was saved.
        for (name, opt) in &optimizers {
            if opt.arena_identity() != arena.id() {
                return Err(Error::ArenaMismatch(format!(
                    "optimizer `{name}` ({}) was built for another arena than the one given",
                    opt.kind()
                )));
            }
        }
        let entries = match_names(
            "optimizer",
            optimizers.iter().map(|(n, o)| (n.as_str(), o.kind())),
            meta.optimizers
                .iter()
                .map(|e| (e.name.as_str(), e.checkpoint.optimizer.as_str())),
        )?;
        let sched_entries = match_names(
            "scheduler",
            schedulers.iter().map(|(n, s)| (n.as_str(), s.name())),
            meta.schedulers
                .iter()
                .map(|e| (e.name.as_str(), e.scheduler.as_str())),
        )?;
        match (&meta.scaler, &scaler) {
            (Some(_), None) => {
                return Err(Error::StateDict(
                    "the checkpoint holds a GradScaler but none was given to load it into"
                        .to_string(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::StateDict(
                    "a GradScaler was given but the checkpoint holds none".to_string(),
                ))
            }
            _ => {}
        }
        if let Some(s) = &meta.scaler {
            s.validate()
                .map_err(|e| Error::StateDict(format!("GradScaler: {e}")))?;
        }
        // Half buffers: exactly the saved ones, each of the arena, each stored parameter one of
        // the arena's (its shape is checked against the tensor table).
        for (name, h) in &halves {
            if h.arena_id() != arena.id() {
                return Err(Error::ArenaMismatch(format!(
                    "half buffer `{name}` was built for another arena than the one given"
                )));
            }
        }
        let half_entries = match_names(
            "half buffer",
            halves.iter().map(|(n, _)| (n.as_str(), "HalfBuffer")),
            meta.half_buffers
                .iter()
                .map(|e| (e.name.as_str(), "HalfBuffer")),
        )?;
        let mut half_staged = Vec::with_capacity(halves.len());
        for (k, (name, h)) in halves.iter().enumerate() {
            let entry = &meta.half_buffers[half_entries[k]];
            FileDtype::from_name(&entry.dtype)
                .map_err(|e| prefix_error(&format!("half buffer `{name}`"), e))?;
            let mut present = vec![false; h.infos().len()];
            let prefix = half_prefix(name);
            for p in &entry.present {
                let Some(i) = h.infos().iter().position(|i| &i.name == p) else {
                    return Err(Error::StateDict(format!(
                        "half buffer `{name}` stores parameter `{p}`, which the arena does not \
                         have"
                    )));
                };
                if present[i] {
                    return Err(Error::Checkpoint(format!(
                        "half buffer `{name}` stores parameter `{p}` twice"
                    )));
                }
                present[i] = true;
                let info = &h.infos()[i];
                expected.insert(
                    format!("{prefix}{p}"),
                    (
                        info.shape.clone(),
                        Dest::Take(TrainDest::Half(k, info.range())),
                    ),
                );
            }
            let len = h.infos().last().map_or(0, |i| i.offset + i.len);
            half_staged.push((Owned::zeros(h.dtype(), len), present));
        }
        // Stage every optimizer and plan its tensors.
        let mut staged: Vec<AnyStaged> = Vec::with_capacity(optimizers.len());
        for (k, (name, opt)) in optimizers.iter().enumerate() {
            let entry = &meta.optimizers[entries[k]];
            let s = opt
                .stage(&entry.checkpoint, entry.state_dict.as_ref())
                .map_err(|e| prefix_error(&format!("optimizer `{name}`"), e))?;
            if entry.initial_lr.len() != opt.num_groups() {
                return Err(Error::StateDict(format!(
                    "optimizer `{name}`: {} initial_lr values for {} param groups",
                    entry.initial_lr.len(),
                    opt.num_groups()
                )));
            }
            if let Some(x) = entry.initial_lr.iter().flatten().find(|x| !x.is_finite()) {
                return Err(Error::StateDict(format!(
                    "optimizer `{name}`: initial_lr {x:?}"
                )));
            }
            let prefix = optim_prefix(name);
            for (index, buffer, shape) in opt.staged_slots(&s) {
                expected.insert(
                    format!("{prefix}{}", format::state_tensor(index, &buffer)),
                    (shape, Dest::Take(TrainDest::Optim(k, index, buffer))),
                );
            }
            staged.push(s);
        }
        let mut values: Vec<T> = zeroed(arena.len());
        let at = stream_data(r, &tensors, expected, data_crc, |dest, read| match dest {
            TrainDest::Param(range) => read(float_values_mut(&mut values[range])),
            TrainDest::Optim(k, index, buffer) => read(
                optimizers[k]
                    .1
                    .staged_slot(&mut staged[k], index, &buffer)
                    .expect("every announced slot exists"),
            ),
            TrainDest::Half(k, range) => read(half_staged[k].0.slice_mut(range)),
        })?;
        debug_assert_eq!(header_len + at, file_len);
        // Scheduler states: each loaded in turn, the earlier ones put back if one fails.
        let mut old = Vec::with_capacity(schedulers.len());
        for k in 0..schedulers.len() {
            let before = match schedulers[k].1.state_dict() {
                Ok(v) => v,
                Err(e) => {
                    restore_schedulers(&mut schedulers, &old);
                    return Err(e);
                }
            };
            if let Err(e) = schedulers[k]
                .1
                .raw_load(&meta.schedulers[sched_entries[k]].state)
            {
                restore_schedulers(&mut schedulers, &old);
                return Err(prefix_error(&format!("scheduler `{}`", schedulers[k].0), e));
            }
            old.push(before);
        }
        // Nothing can fail from here on.
        for ((k, (_, opt)), s) in optimizers.iter_mut().enumerate().zip(staged) {
            opt.commit(s);
            for (g, &x) in meta.optimizers[entries[k]].initial_lr.iter().enumerate() {
                opt.set_group_initial_lr(g, x)
                    .expect("the group count was checked");
            }
        }
        arena.params_mut().copy_from_slice(&values);
        for ((_, h), (values, present)) in halves.iter_mut().zip(half_staged) {
            h.commit(values.values(), present);
        }
        if let (Some(dst), Some(src)) = (scaler, meta.scaler) {
            *dst = src;
        }
        Ok(LoadedTraining {
            step: meta.step,
            metadata: meta.metadata,
            bytes: file_len,
        })
    }
}

/// Puts back the states of the first `old.len()` schedulers.
fn restore_schedulers(schedulers: &mut [(String, &mut dyn LrScheduler)], old: &[Value]) {
    for ((_, s), state) in schedulers.iter_mut().zip(old) {
        // Written by the same scheduler a moment ago: it loads back.
        let _ = s.raw_load(state);
    }
}

fn prefix_error(what: &str, e: Error) -> Error {
    match e {
        Error::StateDict(m) => Error::StateDict(format!("{what}: {m}")),
        Error::Checkpoint(m) => Error::Checkpoint(format!("{what}: {m}")),
        Error::Scheduler(m) => Error::Scheduler(format!("{what}: {m}")),
        other => Error::StateDict(format!("{what}: {other}")),
    }
}

/// Pairs the (name, kind) given with the (name, kind) saved: every one given must be saved
/// with the same kind, and every one saved must be given. Returns, for each one given, the
/// index of its saved entry.
fn match_names<'n>(
    what: &str,
    given: impl Iterator<Item = (&'n str, &'n str)>,
    saved: impl Iterator<Item = (&'n str, &'n str)>,
) -> Result<Vec<usize>> {
    let saved: Vec<(&str, &str)> = saved.collect();
    let mut out = Vec::new();
    let mut used = vec![false; saved.len()];
    for (name, kind) in given {
        let Some(i) = saved.iter().position(|(n, _)| *n == name) else {
            let names: Vec<&str> = saved.iter().map(|(n, _)| *n).collect();
            return Err(Error::StateDict(format!(
                "the checkpoint has no {what} named `{name}` (it has {what}s {names:?})"
            )));
        };
        if used[i] {
            return Err(Error::StateDict(format!("{what} `{name}` was given twice")));
        }
        if saved[i].1 != kind {
            return Err(Error::StateDict(format!(
                "{what} `{name}` was saved from {}, this is {kind}",
                saved[i].1
            )));
        }
        used[i] = true;
        out.push(i);
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(Error::StateDict(format!(
            "the checkpoint holds {what} `{}` ({}), which was not given to load it into",
            saved[i].0, saved[i].1
        )));
    }
    Ok(out)
}

/// Parses a training checkpoint's metadata JSON, checking the format name and version first.
pub fn parse_training_meta(json: &str) -> Result<TrainingMeta> {
    let bad = |m: String| Error::Checkpoint(m);
    let value: Value = serde_json::from_str(json)
        .map_err(|e| bad(format!("the `optarena` metadata is not JSON: {e}")))?;
    match value.get("format").and_then(Value::as_str) {
        Some(TRAINING_FORMAT_NAME) => {}
        Some(format::FORMAT_NAME) => {
            return Err(bad(
                "this is an optimizer checkpoint, not a training checkpoint: load it with \
                 `Optimizer::load_checkpoint`"
                    .to_string(),
            ))
        }
        Some(other) => {
            return Err(bad(format!(
                "format `{other}` is not an optarena training checkpoint \
                 (`{TRAINING_FORMAT_NAME}`)"
            )))
        }
        None => return Err(bad("the metadata has no `format` field".to_string())),
    }
    match value.get("version").and_then(Value::as_u64) {
        Some(v) if v == TRAINING_FORMAT_VERSION as u64 => {}
        Some(v) => {
            return Err(bad(format!(
                "training checkpoint version {v} is not supported (this build reads version \
                 {TRAINING_FORMAT_VERSION})"
            )))
        }
        None => return Err(bad("the metadata has no `version` number".to_string())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("the metadata is invalid: {e}")))
}

/// Reads a training checkpoint's metadata and tensor table from `r` (`file_len` bytes) and
/// verifies both checksums and that every tensor is one the metadata announces, without
/// loading it anywhere.
pub fn inspect_training_reader<R: Read + ?Sized>(r: &mut R, file_len: u64) -> Result<TrainingInfo> {
    let RawHeader {
        meta_json,
        tensors,
        data_crc,
        file_len,
        ..
    } = read_raw_header(r, file_len)?;
    let meta = parse_training_meta(&meta_json)?;
    FileDtype::from_name(&meta.dtype)?;
    let mut expected: Expected<()> = Default::default();
    for p in &meta.params {
        expected.insert(format::param_tensor(&p.name), (p.shape.clone(), Dest::Skip));
    }
    for o in &meta.optimizers {
        let prefix = optim_prefix(&o.name);
        let shapes: BTreeMap<usize, Vec<usize>> = o
            .checkpoint
            .param_groups
            .iter()
            .flat_map(|g| &g.params)
            .map(|p| (p.index, p.shape.clone()))
            .collect();
        for s in &o.checkpoint.state {
            for b in &s.buffers {
                // A buffer has its parameter's shape, except factored or flattened ones
                // (Adafactor's row and column moments): their shape is the file's.
                let name = format!("{prefix}{}", format::state_tensor(s.index, b));
                let shape = tensors
                    .iter()
                    .find(|t| t.name == name)
                    .map(|t| t.shape.clone())
                    .or_else(|| shapes.get(&s.index).cloned())
                    .unwrap_or_default();
                expected.insert(name, (shape, Dest::Skip));
            }
        }
    }
    for h in &meta.half_buffers {
        FileDtype::from_name(&h.dtype)?;
        let prefix = half_prefix(&h.name);
        for p in &h.present {
            let shape = meta
                .params
                .iter()
                .find(|i| &i.name == p)
                .map(|i| i.shape.clone())
                .ok_or_else(|| {
                    Error::Checkpoint(format!(
                        "half buffer `{}` stores parameter `{p}`, which the checkpoint's arena \
                         does not have",
                        h.name
                    ))
                })?;
            expected.insert(format!("{prefix}{p}"), (shape, Dest::Skip));
        }
    }
    if let Some(s) = &meta.scaler {
        s.validate()
            .map_err(|e| Error::Checkpoint(format!("GradScaler: {e}")))?;
    }
    stream_data::<R, ()>(r, &tensors, expected, data_crc, |(), _| Ok(()))?;
    Ok(TrainingInfo {
        meta,
        tensors,
        file_len,
    })
}

/// [`inspect_training_reader`] on a file.
pub fn inspect_training(path: impl AsRef<Path>) -> Result<TrainingInfo> {
    let path = path.as_ref();
    let file =
        File::open(path).map_err(|e| Error::io(format!("opening `{}`", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading `{}`", path.display()), e))?
        .len();
    inspect_training_reader(&mut std::io::BufReader::with_capacity(1 << 20, file), len)
}
