//! Sharded checkpoints that reshard: every rank writes its shard in the binary checkpoint
//! format, rank 0 a manifest of the arena's layout, the groups and which elements each file
//! holds; any world size loads them back.
//!
//! # The directory
//! - `manifest.json`: [`Manifest`] (format name and version, optimizer kind, dtype, world
//!   size, the arena's parameters with their offsets and shapes, each group's parameters, and
//!   per rank its element range, its file and the pieces of parameters it holds), with a
//!   CRC-32 of its body.
//! - `shard-<rank>.safetensors`: the rank's optimizer state and parameter values, in the
//!   format of [`crate::checkpoint`] (its own checksums), as the optimizer over that rank's
//!   pieces saved them. A piece that is a whole parameter keeps its name and shape; a part of
//!   one keeps its name with a flat shape.
//!
//! # Atomicity
//! The files are written into `<dir>.tmp` (each one atomically, then synced); when every rank
//! has written its file, rank 0 moves an existing `<dir>` to `<dir>.old`, renames `<dir>.tmp`
//! to `<dir>`, syncs the parent and removes `<dir>.old`. A failure on any rank before that
//! leaves `<dir>` as it was and every rank gets an error. A crash between the two renames
//! leaves the previous checkpoint complete in `<dir>.old`. Every rank must see the same
//! directory (a shared file system; on one machine, any directory).
//!
//! # Loading at another world size
//! Each rank reads only the files whose elements overlap its new shard, one at a time, and
//! rebuilds its pieces' state from them: buffers are sliced and joined element for element,
//! `step` and the per-parameter scalars (the same in every piece of a parameter) are taken
//! as they are. Nothing is rounded, so the run continues bit for bit as an unbroken run at the
//! new world size fed the same averaged gradients. A plain single-process checkpoint
//! ([`Optimizer::save_checkpoint`] with the arena) is read as a world of one.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::comm::{CommElem, Communicator};
use crate::arena::{Arena, ArenaBuilder, ParamInfo};
use crate::checkpoint::{self, StdFs};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::optimizer::{Algorithm, Optimizer};
use crate::state::{MatchBy, ParamStateDict, StateDict};

/// Name of the manifest's format.
pub const MANIFEST_FORMAT: &str = "optarena-sharded";
/// Version of [`Manifest`]'s layout.
pub const MANIFEST_VERSION: u32 = 1;

/// What a sharded checkpoint holds and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// torch's class name of the optimizer.
    pub optimizer: String,
    /// `"float32"` or `"float64"`.
    pub dtype: String,
    /// The number of ranks that wrote it.
    pub world_size: usize,
    /// The arena's parameters (names, shapes, offsets).
    pub layout: Vec<ParamInfo>,
    /// Each group's parameters, as arena positions.
    pub groups: Vec<Vec<usize>>,
    /// One entry per rank.
    pub shards: Vec<ShardEntry>,
}

/// One rank's file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// The file's name in the directory (`None` for a rank whose shard is empty).
    pub file: Option<String>,
    /// The arena elements it covers.
    pub elems: Range<usize>,
    /// The parameters it holds a piece of: arena position and element range (arena
    /// coordinates), in arena order.
    pub pieces: Vec<(usize, Range<usize>)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    manifest: Manifest,
    /// CRC-32 (zlib's) of `manifest` serialised as compact JSON.
    crc32: u32,
}

const MANIFEST_FILE: &str = "manifest.json";

pub(crate) fn shard_file(rank: usize) -> String {
    format!("shard-{rank:05}.safetensors")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} `{}`", path.display()), e)
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| io("reading", &path, e))?;
        let file: ManifestFile = serde_json::from_str(&text).map_err(|e| {
            Error::Checkpoint(format!(
                "`{}` is not a sharded-checkpoint manifest: {e}",
                path.display()
            ))
        })?;
        let body = serde_json::to_string(&file.manifest)?;
        if crc32fast::hash(body.as_bytes()) != file.crc32 {
            return Err(Error::Checkpoint(format!(
                "`{}`: the checksum does not match (the manifest is corrupt)",
                path.display()
            )));
        }
        let m = file.manifest;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(Error::Checkpoint(format!(
                "`{}` is format {} version {}, not {MANIFEST_FORMAT} version {MANIFEST_VERSION}",
                path.display(),
                m.format,
                m.version
            )));
        }
        m.check()?;
        Ok(m)
    }

    /// The pieces cover every element exactly once, inside their shard and parameter.
    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Checkpoint(format!("inconsistent manifest: {what}")));
        if self.shards.len() != self.world_size {
            return bad(format!(
                "{} shards for world size {}",
                self.shards.len(),
                self.world_size
            ));
        }
        let len = self.layout.last().map_or(0, |p| p.offset + p.len);
        let mut at = 0;
        for (r, s) in self.shards.iter().enumerate() {
            if s.elems.start != at || s.elems.end < s.elems.start || s.elems.end > len {
                return bad(format!("shard {r} covers {:?}", s.elems));
            }
            let mut covered = s.elems.start;
            for (i, e) in &s.pieces {
                let Some(info) = self.layout.get(*i) else {
                    return bad(format!("shard {r} names parameter {i}"));
                };
                if e.start != covered
                    || e.end <= e.start
                    || e.start < info.offset
                    || e.end > info.offset + info.len
                {
                    return bad(format!("shard {r}'s piece {e:?} of `{}`", info.name));
                }
                covered = e.end;
            }
            if covered != s.elems.end {
                return bad(format!(
                    "shard {r}'s pieces end at {covered}, not {}",
                    s.elems.end
                ));
            }
            if s.file.is_none() != s.pieces.is_empty() {
                return bad(format!("shard {r}'s file"));
            }
            at = s.elems.end;
        }
        if at != len {
            return bad(format!("the shards end at {at}, the arena at {len}"));
        }
        for g in &self.groups {
            if g.iter().any(|&i| i >= self.layout.len()) {
                return bad("a group names a parameter out of range".into());
            }
        }
        Ok(())
    }

    /// The manifest of a single-process checkpoint: one file holding every parameter.
    fn single(
        layout: &[ParamInfo],
        groups: Vec<Vec<usize>>,
        optimizer: &str,
        dtype: &str,
        file: String,
    ) -> Manifest {
        let len = layout.last().map_or(0, |p| p.offset + p.len);
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            optimizer: optimizer.into(),
            dtype: dtype.into(),
            world_size: 1,
            layout: layout.to_vec(),
            groups,
            shards: vec![ShardEntry {
                file: (!layout.is_empty()).then_some(file),
                elems: 0..len,
                pieces: layout
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i, p.range()))
                    .collect(),
            }],
        }
    }
}

/// The arena of one shard's pieces (whole parameters keep their shape), as the optimizer over
/// the shard registers them.
pub(crate) fn piece_arena<T: Float>(
    layout: &[ParamInfo],
    pieces: &[(usize, Range<usize>)],
    values: impl Fn(usize, Range<usize>) -> Vec<T>,
) -> Result<Arena<T>> {
    let mut b = ArenaBuilder::<T>::new();
    for (i, e) in pieces {
        let info = &layout[*i];
        let shape = if e.len() == info.len {
            info.shape.clone()
        } else {
            vec![e.len()]
        };
        b.param(&info.name, &shape, &values(*i, e.clone()))?;
    }
    Ok(b.build())
}

/// The optimizer over a shard's pieces: every group on every shard (empty where it has none of
/// the group's parameters).
pub(crate) fn piece_optimizer<T: Float, A: Algorithm>(
    arena: &Arena<T>,
    pieces: &[(usize, Range<usize>)],
    groups: &[Vec<usize>],
    overrides: &[Vec<crate::optimizer::Override<A::Config>>],
    defaults: A::Config,
) -> Result<Optimizer<T, A>> {
    let mut opt = Optimizer::<T, A>::without_groups(arena, defaults)?;
    for (g, members) in groups.iter().enumerate() {
        let mine = pieces
            .iter()
            .enumerate()
            .filter(|(_, (i, _))| members.contains(i))
            .map(|(p, _)| p)
            .collect();
        opt.add_resolved_group(mine, overrides.get(g).map_or(&[][..], |o| &o[..]))?;
    }
    Ok(opt)
}

/// Rebuilds the state and parameter values of `target` pieces (arena position, element range,
/// in `target_opt`'s arena order) from the checkpoint in `dir` described by `manifest`:
/// returns the state dict to load into `target_opt` and the pieces' values back to back.
pub(crate) fn assemble<T: Float, A: Algorithm>(
    dir: &Path,
    manifest: &Manifest,
    target: &[(usize, Range<usize>)],
    target_opt: &Optimizer<T, A>,
    defaults: &A::Config,
) -> Result<(StateDict<T>, Vec<T>)> {
    if manifest.optimizer != A::NAME {
        return Err(Error::Checkpoint(format!(
            "the checkpoint was saved by the {} optimizer, not {}",
            manifest.optimizer,
            A::NAME
        )));
    }
    let mut sd = target_opt.state_dict();
    sd.state.clear();
    let index: BTreeMap<&str, usize> = sd
        .param_groups
        .iter()
        .flat_map(|g| g.params.iter().map(|p| (p.name.as_str(), p.index)))
        .collect();
    let total: usize = target.iter().map(|(_, e)| e.len()).sum();
    let mut values = vec![T::ZERO; total];
    // Where each target piece's values start in `values`.
    let mut starts = Vec::with_capacity(target.len());
    let mut at = 0;
    for (_, e) in target {
        starts.push(at);
        at += e.len();
    }
    // Per target piece: its state being assembled, and how many of its elements are filled.
    let mut states: Vec<Option<ParamStateDict<T>>> = vec![None; target.len()];
    let mut filled = vec![0usize; target.len()];
    let mut hyper_from: Option<Vec<BTreeMap<String, crate::hyper::HyperValue>>> = None;
    for shard in &manifest.shards {
        let Some(file) = &shard.file else { continue };
        let overlaps = |(i, e): &(usize, Range<usize>)| {
            shard
                .pieces
                .iter()
                .any(|(j, f)| j == i && f.start < e.end && e.start < f.end)
        };
        if hyper_from.is_some() && !target.iter().any(overlaps) {
            continue;
        }
        // This file's pieces, loaded into an optimizer over them.
        let mut arena = piece_arena::<T>(&manifest.layout, &shard.pieces, |_, e| {
            vec![T::ZERO; e.len()]
        })?;
        let mut opt = piece_optimizer::<T, A>(
            &arena,
            &shard.pieces,
            &manifest.groups,
            &[],
            defaults.clone(),
        )?;
        opt.load_checkpoint(dir.join(file), Some(&mut arena), MatchBy::Name)?;
        let saved = opt.state_dict();
        if hyper_from.is_none() {
            hyper_from = Some(
                saved
                    .param_groups
                    .iter()
                    .map(|g| g.hyperparams.clone())
                    .collect(),
            );
        }
        let by_name: BTreeMap<&str, &ParamStateDict<T>> = saved
            .param_groups
            .iter()
            .flat_map(|g| g.params.iter())
            .filter_map(|p| {
                saved
                    .state
                    .iter()
                    .find(|s| s.index == p.index)
                    .map(|s| (p.name.as_str(), s))
            })
            .collect();
        for (k, (i, e)) in target.iter().enumerate() {
            for (p, (j, f)) in shard.pieces.iter().enumerate() {
                if j != i || f.end <= e.start || e.end <= f.start {
                    continue;
                }
                let lo = e.start.max(f.start);
                let hi = e.end.min(f.end);
                let name = manifest.layout[*i].name.as_str();
                let handle = arena.param_at(p).expect("piece position");
                values[starts[k] + lo - e.start..starts[k] + hi - e.start]
                    .copy_from_slice(&arena.value(handle)[lo - f.start..hi - f.start]);
                filled[k] += hi - lo;
                let old = by_name.get(name);
                let entry = &mut states[k];
                match (old, entry.as_mut()) {
                    (None, None) => {}
                    (Some(old), None) if filled[k] == hi - lo => {
                        let whole_old = f.len() == manifest.layout[*i].len;
                        let whole_new = e.len() == manifest.layout[*i].len;
                        let mut st = ParamStateDict {
                            index: index.get(name).copied().ok_or_else(|| {
                                Error::Checkpoint(format!(
                                    "`{name}` is in no group of this optimizer"
                                ))
                            })?,
                            step: old.step,
                            scalars: old.scalars.clone(),
                            buffers: BTreeMap::new(),
                        };
                        for (b, v) in &old.buffers {
                            if v.len() == f.len() {
                                let mut nb = vec![T::ZERO; e.len()];
                                nb[lo - e.start..hi - e.start]
                                    .copy_from_slice(&v[lo - f.start..hi - f.start]);
                                st.buffers.insert(b.clone(), nb);
                            } else if whole_old && whole_new {
                                // Shaped state of a whole parameter.
                                st.buffers.insert(b.clone(), v.clone());
                            } else {
                                return Err(Error::Checkpoint(format!(
                                    "`{name}`'s buffer `{b}` is shaped state and cannot be cut into shards"
                                )));
                            }
                        }
                        *entry = Some(st);
                    }
                    (Some(old), Some(st)) if st.step == old.step && st.scalars == old.scalars => {
                        for (b, v) in &old.buffers {
                            let Some(nb) = st
                                .buffers
                                .get_mut(b)
                                .filter(|nb| nb.len() == e.len() && v.len() == f.len())
                            else {
                                return Err(Error::Checkpoint(format!(
                                    "`{name}`'s buffer `{b}` differs between shards"
                                )));
                            };
                            nb[lo - e.start..hi - e.start]
                                .copy_from_slice(&v[lo - f.start..hi - f.start]);
                        }
                    }
                    _ => {
                        return Err(Error::Checkpoint(format!(
                        "the shards disagree on the state of `{name}` (step, scalars or presence)"
                    )))
                    }
                }
            }
        }
    }
    for (k, (i, e)) in target.iter().enumerate() {
        if filled[k] != e.len() {
            return Err(Error::Checkpoint(format!(
                "the checkpoint covers {} of the {} elements of `{}` this rank needs",
                filled[k],
                e.len(),
                manifest.layout[*i].name
            )));
        }
    }
    if let Some(h) = hyper_from {
        if h.len() != sd.param_groups.len() {
            return Err(Error::Checkpoint(format!(
                "the checkpoint has {} param groups, this optimizer {}",
                h.len(),
                sd.param_groups.len()
            )));
        }
        for (g, hyper) in sd.param_groups.iter_mut().zip(h) {
            g.hyperparams = hyper;
        }
    }
    sd.state = states.into_iter().flatten().collect();
    sd.state.sort_by_key(|s| s.index);
    Ok((sd, values))
}

/// Checks `manifest` against the arena layout and groups of the run loading it.
pub(crate) fn check_compatible(
    manifest: &Manifest,
    layout: &[ParamInfo],
    groups: &[Vec<usize>],
    dtype: &str,
) -> Result<()> {
    let _ = dtype; // f32 <-> f64 state is cast as the binary format casts it.
    if manifest.layout != layout {
        let theirs: Vec<&str> = manifest.layout.iter().map(|p| p.name.as_str()).collect();
        let ours: Vec<&str> = layout.iter().map(|p| p.name.as_str()).collect();
        return Err(Error::Checkpoint(format!(
            "the checkpoint's arena layout differs from this one (its parameters {theirs:?}, \
             these {ours:?}, or their shapes or offsets)"
        )));
    }
    if manifest.groups != groups {
        return Err(Error::Checkpoint(format!(
            "the checkpoint's param groups {:?} differ from this optimizer's {groups:?}",
            manifest.groups
        )));
    }
    Ok(())
}

/// Every group's parameters (arena positions) of `opt`.
pub(crate) fn group_positions<T: Float, A: Algorithm>(
    opt: &Optimizer<T, A>,
) -> Result<Vec<Vec<usize>>> {
    (0..opt.num_groups())
        .map(|g| Ok(opt.group_handles(g)?.map(|p| p.index()).collect()))
        .collect()
}

/// The manifest of a single-process checkpoint file `path` saved with the arena, for
/// [`assemble`] (it reads `dir.join(file)`).
pub(crate) fn single_file_manifest<T: Float, A: Algorithm>(
    path: &Path,
    layout: &[ParamInfo],
    groups: Vec<Vec<usize>>,
) -> Result<(PathBuf, Manifest)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let file = path
        .file_name()
        .ok_or_else(|| {
            Error::bad_path(
                std::io::ErrorKind::InvalidInput,
                format!("`{}`", path.display()),
                "it names no file",
            )
        })?
        .to_string_lossy()
        .into_owned();
    Ok((
        dir,
        Manifest::single(layout, groups, A::NAME, T::DTYPE, file),
    ))
}

/// Loads the sharded checkpoint in `dir` (written at any world size) into a plain
/// single-process optimizer over `arena`, parameter values included. On any error nothing has
/// changed.
pub fn load_sharded<T: Float, A: Algorithm>(
    dir: impl AsRef<Path>,
    opt: &mut Optimizer<T, A>,
    arena: &mut Arena<T>,
) -> Result<()> {
    let dir = dir.as_ref();
    let manifest = Manifest::read(dir)?;
    check_compatible(&manifest, arena.infos(), &group_positions(opt)?, T::DTYPE)?;
    let target: Vec<(usize, Range<usize>)> = arena
        .infos()
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.range()))
        .collect();
    let (sd, values) = assemble::<T, A>(dir, &manifest, &target, opt, opt.defaults())?;
    opt.load_state_dict(&sd, MatchBy::Name)?;
    arena.params_mut().copy_from_slice(&values);
    Ok(())
}

/// Every rank's `ok`: `Ok` when all are true, else an error naming the failed ranks (the
/// failing rank itself returns its own error before calling this with `false`).
pub(crate) fn agree<C: Communicator>(comm: &C, ok: bool, what: &str) -> Result<()> {
    let n = comm.size();
    let mut all = vec![0u64; n];
    comm.all_gather(&[u64::from(ok)], &mut all, &vec![1; n])?;
    let failed: Vec<usize> = (0..n).filter(|&r| all[r] == 0).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "{what} failed on rank(s) {failed:?}"
        )))
    }
}

/// Runs `f` on every rank and makes the outcome collective: every rank returns an error when
/// any rank's `f` failed (its own error on the failing rank).
pub(crate) fn collectively<C: Communicator, R>(
    comm: &C,
    what: &str,
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    match f() {
        Ok(r) => {
            agree(comm, true, what)?;
            Ok(r)
        }
        Err(e) => {
            let _ = agree(comm, false, what);
            Err(e)
        }
    }
}

/// Saves every rank's shard into `dir` (see the [module docs](self)); collective.
pub(crate) fn save_shards<C: Communicator, T: Float + CommElem, A: Algorithm>(
    comm: &C,
    dir: &Path,
    manifest: &Manifest,
    shard_opt: &Optimizer<T, A>,
    shard_arena: &Arena<T>,
) -> Result<()> {
    let rank = comm.rank();
    if dir.as_os_str().is_empty() || dir.ends_with("..") || dir.to_string_lossy().ends_with('/') {
        // Refused alike on every rank, before anything is written.
        return Err(Error::bad_path(
            std::io::ErrorKind::InvalidInput,
            format!("`{}`", dir.display()),
            "give the checkpoint directory a name (no trailing `/`)",
        ));
    }
    let tmp = with_suffix(dir, ".tmp");
    let old = with_suffix(dir, ".old");
    collectively(comm, "preparing the checkpoint directory", || {
        if rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| io("removing the stale", &tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| io("creating", &tmp, e))?;
        }
        Ok(())
    })?;
    collectively(comm, "writing the shards", || {
        if let Some(file) = &manifest.shards[rank].file {
            shard_opt.save_checkpoint(tmp.join(file), Some(shard_arena))?;
        }
        if rank == 0 {
            let body = serde_json::to_string(manifest)?;
            let file = ManifestFile {
                crc32: crc32fast::hash(body.as_bytes()),
                manifest: manifest.clone(),
            };
            let text = serde_json::to_string_pretty(&file)?;
            checkpoint::atomic::write_atomic(&StdFs, &tmp.join(MANIFEST_FILE), |w| {
                w.write_all(text.as_bytes())
                    .map_err(|e| Error::io("writing the manifest", e))?;
                Ok(text.len() as u64)
            })?;
        }
        Ok(())
    })
    .inspect_err(|_| {
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    })?;
    collectively(comm, "committing the checkpoint", || {
        if rank == 0 {
            let had_old = dir.exists();
            if had_old {
                if old.exists() {
                    std::fs::remove_dir_all(&old).map_err(|e| io("removing", &old, e))?;
                }
                std::fs::rename(dir, &old).map_err(|e| io("moving aside", dir, e))?;
            }
            if let Err(e) = std::fs::rename(&tmp, dir) {
                if had_old {
                    let _ = std::fs::rename(&old, dir);
                }
                return Err(io("renaming into place", &tmp, e));
            }
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            if let Ok(f) = std::fs::File::open(&parent) {
                let _ = f.sync_all();
            }
            if had_old {
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        Ok(())
    })
}
