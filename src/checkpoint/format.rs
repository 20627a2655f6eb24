//! The file layout: a safetensors file whose `__metadata__` holds one JSON entry describing the
//! optimizer, and whose first tensor holds the checksums.
//!
//! ```text
//! [u64 LE: header length N] [N bytes: safetensors JSON header, space-padded to 8]
//! [optarena.crc32: U32 x 2 = crc32(bytes 0..8+N), crc32(every byte after this tensor)]
//! [state.<number>.<buffer> tensors, in parameter-number then buffer order]
//! [param.<name> tensors, in arena order, when the parameters were included]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde::{Deserialize, Serialize};

use crate::arena::ParamInfo;
use crate::error::{Error, Result};
use crate::state::GroupDict;

/// The value of the metadata's `format` field.
pub const FORMAT_NAME: &str = "optarena-checkpoint";
/// Version of the checkpoint layout this build writes and reads. Bumped on any incompatible
/// change.
pub const FORMAT_VERSION: u32 = 1;
/// The `__metadata__` key holding [`CheckpointMeta`] as JSON.
pub const METADATA_KEY: &str = "optarena";
/// The name of the checksum tensor: two little-endian `u32`, the CRC-32 (as zlib's) of the
/// length prefix and header, then of every data byte after this tensor.
pub const CRC_TENSOR: &str = "optarena.crc32";
/// The largest header read (safetensors' own limit).
pub const MAX_HEADER: u64 = 100_000_000;

/// Name of the tensor holding buffer `buffer` of parameter number `index`.
pub fn state_tensor(index: usize, buffer: &str) -> String {
    format!("state.{index}.{buffer}")
}

/// Name of the tensor holding the values of parameter `name`.
pub fn param_tensor(name: &str) -> String {
    format!("param.{name}")
}

/// Everything a checkpoint says besides tensor values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] at the time of saving.
    pub version: u32,
    /// torch's class name of the optimizer (`"Adam"`).
    pub optimizer: String,
    /// The dtype of the optimizer's parameters (the arena's): `"float32"` or `"float64"`.
    /// Each tensor has its own dtype in the tensor table: the buffer's own (`BF16` for bf16
    /// optimizer state); a load casts each into its destination ([`super::dtype`]).
    pub dtype: String,
    /// One entry per param group: hyperparameters and parameters (number, name, offset,
    /// shape), as in a [`StateDict`](crate::StateDict).
    pub param_groups: Vec<GroupDict>,
    /// One entry per parameter with state, in parameter-number order.
    pub state: Vec<StateMeta>,
    /// The arena's parameters whose values are stored (as `param.<name>` tensors), in arena
    /// order; `None` when the checkpoint holds optimizer state only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<ParamInfo>>,
}

/// One parameter's state: scalars here, buffers as `state.<index>.<name>` tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateMeta {
    /// The parameter's number (a [`ParamRef::index`](crate::state::ParamRef)).
    pub index: usize,
    /// Steps taken, for optimizers that count them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Per-parameter scalars besides `step` (ASGD's `eta` and `mu`, NAdam's `mu_product`);
    /// NaN and infinities as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "crate::state::non_finite::serialize",
        deserialize_with = "crate::state::non_finite::deserialize_scalars"
    )]
    pub scalars: BTreeMap<String, f64>,
    /// Names of its buffers, each stored as a tensor of the parameter's shape.
    pub buffers: Vec<String>,
}

/// The float element types of a checkpoint's tensors (and of the buffers they load into).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDtype {
    /// `F32`.
    F32,
    /// `F64`.
    F64,
    /// `BF16`: bf16 optimizer state, a bf16 [`crate::HalfBuffer`], torch's bfloat16 tensors.
    Bf16,
    /// `F16`: an f16 [`crate::HalfBuffer`], torch's float16 tensors.
    F16,
}

impl FileDtype {
    /// From torch's dtype name (the metadata's `dtype`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "float32" => Ok(FileDtype::F32),
            "float64" => Ok(FileDtype::F64),
            "bfloat16" => Ok(FileDtype::Bf16),
            "float16" => Ok(FileDtype::F16),
            other => Err(Error::Checkpoint(format!(
                "dtype `{other}` is not supported (float32, float64, bfloat16 or float16)"
            ))),
        }
    }
    /// From a tensor's safetensors dtype; `None` for a dtype that is not one of these four.
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FileDtype::F32),
            Dtype::F64 => Some(FileDtype::F64),
            Dtype::BF16 => Some(FileDtype::Bf16),
            Dtype::F16 => Some(FileDtype::F16),
            _ => None,
        }
    }
    /// The safetensors dtype.
    pub fn safetensors(self) -> Dtype {
        match self {
            FileDtype::F32 => Dtype::F32,
            FileDtype::F64 => Dtype::F64,
            FileDtype::Bf16 => Dtype::BF16,
            FileDtype::F16 => Dtype::F16,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FileDtype::F32 => 4,
            FileDtype::F64 => 8,
            FileDtype::Bf16 | FileDtype::F16 => 2,
        }
    }
    /// torch's name.
    pub fn name(self) -> &'static str {
        match self {
            FileDtype::F32 => "float32",
            FileDtype::F64 => "float64",
            FileDtype::Bf16 => "bfloat16",
            FileDtype::F16 => "float16",
        }
    }
}

/// One tensor of the file, in data order.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Its name (`state.0.exp_avg`, `param.fc.weight`).
    pub name: String,
    /// Its safetensors dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub data_offsets: (usize, usize),
}

/// A checked header: the metadata and the tensor table, the checksum tensor removed.
#[derive(Debug, Clone)]
pub struct Header {
    /// The metadata.
    pub meta: CheckpointMeta,
    /// Every tensor but the checksum one, in data order.
    pub tensors: Vec<TensorEntry>,
    /// The expected CRC-32 of the data after the checksum tensor.
    pub data_crc: u32,
    /// Bytes of the length prefix and header (where the data section starts).
    pub header_len: u64,
    /// Total file length.
    pub file_len: u64,
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::Checkpoint(msg.to_string())
}

/// Maps a read error: an early end of file is a truncated checkpoint.
pub fn read_error(e: std::io::Error, what: &str) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        corrupt(format!(
            "the file ends inside {what}: it is truncated (shorter than its header says)"
        ))
    } else {
        Error::io(format!("reading {what}"), e)
    }
}

/// Builds the prefix-and-header bytes for `tensors` (name, dtype, shape, in data order, the
/// checksum tensor first) and `meta`.
pub fn build_header(
    meta: &CheckpointMeta,
    tensors: &[(String, Dtype, Vec<usize>)],
) -> Result<Vec<u8>> {
    build_header_json(serde_json::to_string(meta)?, tensors)
}

/// [`build_header`] with the `__metadata__["optarena"]` JSON given as text (the training
/// checkpoint's metadata is not a [`CheckpointMeta`]).
pub fn build_header_json(json: String, tensors: &[(String, Dtype, Vec<usize>)]) -> Result<Vec<u8>> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let metadata = Metadata::new(
        Some(HashMap::from([(METADATA_KEY.to_string(), json)])),
        infos,
    )
    .map_err(|e| Error::serde("safetensors header", e))?;
    let mut header = serde_json::to_vec(&metadata)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

/// What a file that starts with `prefix` looks like when it is text rather than a binary
/// checkpoint (whose first eight bytes are a little-endian header length, far below any
/// length that spells printable text).
fn text_kind(prefix: &[u8; 8]) -> Option<&'static str> {
    let printable = prefix
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    match prefix.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | Some(b'[') if printable => Some("`{` or `[`, like a JSON document"),
        _ if printable => Some("printable text"),
        _ => None,
    }
}

/// A checked header whose `__metadata__["optarena"]` JSON is not parsed yet.
#[derive(Debug, Clone)]
pub struct RawHeader {
    /// The `__metadata__["optarena"]` JSON.
    pub meta_json: String,
    /// Every tensor but the checksum one, in data order.
    pub tensors: Vec<TensorEntry>,
    /// The expected CRC-32 of the data after the checksum tensor.
    pub data_crc: u32,
    /// Bytes of the length prefix and header (where the data section starts).
    pub header_len: u64,
    /// Total file length.
    pub file_len: u64,
}

/// Reads and checks the length prefix, the header and the checksum tensor of a file of
/// `file_len` bytes. The header's CRC is verified before anything in it is believed, and
/// nothing is allocated beyond what the file length allows.
pub fn read_header<R: Read + ?Sized>(r: &mut R, file_len: u64) -> Result<Header> {
    let raw = read_raw_header(r, file_len)?;
    Ok(Header {
        meta: parse_meta(&raw.meta_json)?,
        tensors: raw.tensors,
        data_crc: raw.data_crc,
        header_len: raw.header_len,
        file_len: raw.file_len,
    })
}

/// [`read_header`] without parsing the metadata JSON.
pub fn read_raw_header<R: Read + ?Sized>(r: &mut R, file_len: u64) -> Result<RawHeader> {
    if file_len < 8 {
        return Err(corrupt(format!(
            "the file is {file_len} bytes, too short for a safetensors header (truncated?)"
        )));
    }
    let mut prefix = [0u8; 8];
    r.read_exact(&mut prefix)
        .map_err(|e| read_error(e, "the header length"))?;
    if let Some(kind) = text_kind(&prefix) {
        return Err(corrupt(format!(
            "not an optarena checkpoint: it starts with {kind} (a JSON state dict is loaded \
             with `load_state_dict_json`)"
        )));
    }
    let n = u64::from_le_bytes(prefix);
    if n > file_len - 8 {
        return Err(corrupt(format!(
            "the header length says {n} bytes but only {} follow (truncated, or not a \
             safetensors file)",
            file_len - 8
        )));
    }
    if n > MAX_HEADER {
        return Err(corrupt(format!(
            "the header length says {n} bytes, over the {MAX_HEADER}-byte limit"
        )));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header)
        .map_err(|e| read_error(e, "the header"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&prefix);
    crc.update(&header);
    let header_crc = crc.finalize();
    let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| {
        corrupt(format!(
            "the safetensors header does not parse ({e}): the file is corrupt or not a \
             safetensors file"
        ))
    })?;
    let data_len = file_len - 8 - n;
    let described = metadata.data_len() as u64;
    if described != data_len {
        return Err(corrupt(if described > data_len {
            format!(
                "the header describes {described} bytes of tensor data but the file holds \
                 {data_len}: it is truncated"
            )
        } else {
            format!(
                "the file holds {data_len} bytes of tensor data but the header describes only \
                 {described}: trailing bytes"
            )
        }));
    }
    let crc_info = metadata.info(CRC_TENSOR).ok_or_else(|| {
        corrupt(format!(
            "no `{CRC_TENSOR}` tensor: not an optarena checkpoint (a plain safetensors file?)"
        ))
    })?;
    if crc_info.dtype != Dtype::U32 || crc_info.shape != [2] || crc_info.data_offsets != (0, 8) {
        return Err(corrupt(format!(
            "the `{CRC_TENSOR}` tensor must be U32 [2] at the start of the data, it is {:?} {:?} \
             at {:?}",
            crc_info.dtype, crc_info.shape, crc_info.data_offsets
        )));
    }
    let mut sums = [0u8; 8];
    r.read_exact(&mut sums)
        .map_err(|e| read_error(e, "the checksums"))?;
    let want_header = u32::from_le_bytes(sums[..4].try_into().expect("4 bytes"));
    let data_crc = u32::from_le_bytes(sums[4..].try_into().expect("4 bytes"));
    if want_header != header_crc {
        return Err(corrupt(format!(
            "header checksum mismatch (stored {want_header:#010x}, computed {header_crc:#010x}): \
             the header is corrupt"
        )));
    }
    let meta_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| corrupt(format!("no `{METADATA_KEY}` entry in `__metadata__`")))?
        .clone();
    let tensors = metadata
        .offset_keys()
        .into_iter()
        .filter(|name| name != CRC_TENSOR)
        .map(|name| {
            let info = metadata.info(&name).expect("listed by offset_keys");
            TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data_offsets: info.data_offsets,
                name,
            }
        })
        .collect();
    Ok(RawHeader {
        meta_json,
        tensors,
        data_crc,
        header_len: 8 + n,
        file_len,
    })
}

/// Parses the metadata JSON, checking the format name and version before anything else so a
/// newer file says so instead of failing on a field it does not know.
pub fn parse_meta(json: &str) -> Result<CheckpointMeta> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| corrupt(format!("the `{METADATA_KEY}` metadata is not JSON: {e}")))?;
    match value.get("format").and_then(|v| v.as_str()) {
        Some(FORMAT_NAME) => {}
        Some(super::training::TRAINING_FORMAT_NAME) => {
            return Err(corrupt(
                "this is a training checkpoint (arena, optimizers, schedulers, scaler): load it \
                 with `TrainingCheckpoint::load`",
            ))
        }
        Some(other) => {
            return Err(corrupt(format!(
                "format `{other}` is not an optarena checkpoint (`{FORMAT_NAME}`)"
            )))
        }
        None => return Err(corrupt("the metadata has no `format` field")),
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == FORMAT_VERSION as u64 => {}
        Some(v) => {
            return Err(corrupt(format!(
                "format version {v} is not supported (this build reads version {FORMAT_VERSION})"
            )))
        }
        None => return Err(corrupt("the metadata has no `version` number")),
    }
    serde_json::from_value(value).map_err(|e| corrupt(format!("the metadata is invalid: {e}")))
}
