//! Named tensors into and out of the checkpoint file, for the savable types that are not an
//! [`Optimizer`](crate::Optimizer) ([`AveragedModel`](crate::AveragedModel),
//! [`SparseAdam`](crate::SparseAdam)): the same layout, header encoder, checksums and
//! streaming as [`super::write`] and [`super::read`], with the tensor list given by the caller.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Range;

use safetensors::tensor::Dtype;

use super::dtype::{self, float_values, float_values_mut, Values};
use super::format::{build_header, CheckpointMeta, FileDtype, Header, CRC_TENSOR};
use super::{data_checksum, write_error};
use crate::error::{Error, Result};
use crate::float::Float;

/// A tensor to write: its name, shape and values (in the checkpoint's float dtype).
pub(crate) struct Out<'a, T> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: &'a [T],
}

/// A tensor to write after the float ones, as little-endian bytes of another dtype (an
/// `I64 []` counter such as torch's `n_averaged` buffer).
pub(crate) struct RawOut {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Writes a checkpoint of `meta` with the float tensors `values` (in order), then `raw`: the
/// checksum tensor first, the header's and the data's CRC-32 computed as [`super::write`]
/// does. Returns the bytes written.
pub(crate) fn write_tensors<T: Float, W: Write + ?Sized>(
    w: &mut W,
    meta: &CheckpointMeta,
    values: &[Out<'_, T>],
    raw: &[RawOut],
) -> Result<u64> {
    let dtype = FileDtype::from_name(T::DTYPE)?;
    let mut table: Vec<(String, Dtype, Vec<usize>)> =
        vec![(CRC_TENSOR.to_string(), Dtype::U32, vec![2])];
    for t in values {
        debug_assert_eq!(t.shape.iter().product::<usize>(), t.values.len());
        table.push((t.name.clone(), dtype.safetensors(), t.shape.clone()));
    }
    for t in raw {
        debug_assert_eq!(
            t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8,
            t.bytes.len()
        );
        table.push((t.name.clone(), t.dtype, t.shape.clone()));
    }
    let header = build_header(meta, &table)?;
    let slices: Vec<Values<'_>> = values.iter().map(|t| float_values(t.values)).collect();
    // The raw tensors' bytes continue the CRC of the float data.
    let mut data_crc = crc32fast::Hasher::new_with_initial(data_checksum(&slices));
    for t in raw {
        data_crc.update(&t.bytes);
    }
    let mut header_crc = crc32fast::Hasher::new();
    header_crc.update(&header);
    let mut head = header;
    head.extend_from_slice(&header_crc.finalize().to_le_bytes());
    head.extend_from_slice(&data_crc.finalize().to_le_bytes());
    w.write_all(&head).map_err(write_error)?;
    let mut total = head.len() as u64;
    for s in &slices {
        dtype::with_le_bytes(*s, &mut |b| w.write_all(b)).map_err(write_error)?;
        total += s.byte_len() as u64;
    }
    for t in raw {
        w.write_all(&t.bytes).map_err(write_error)?;
        total += t.bytes.len() as u64;
    }
    Ok(total)
}

/// Where a tensor read from the file goes.
pub(crate) enum Into {
    /// Elements `range` of staged float buffer number `buf`, cast from the file's dtype.
    Values { buf: usize, range: Range<usize> },
    /// Raw little-endian bytes, into raw slot number `slot` (a tensor of another dtype).
    Raw { slot: usize, dtype: Dtype },
    /// Read and checksummed, not kept.
    Skip,
}

/// What a tensor must look like, and where its data goes.
pub(crate) struct Expected {
    pub shape: Vec<usize>,
    pub into: Into,
}

fn bad(msg: String) -> Error {
    Error::Checkpoint(msg)
}

/// Reads the data section described by `header` (already read from `r` by
/// [`super::format::read_header`]) into the staged buffers: every tensor of the file must be
/// one of `expected` (by name), with its shape and dtype (any float dtype, unless
/// [`Into::Raw`] says which), every expected tensor must be there, the tensors must follow
/// each other in data order, and the data's CRC-32 must be the stored one. Float values are
/// cast to `T` as [`super::read`] casts them ([`super::dtype`]). Nothing is allocated beyond a read buffer: the
/// destinations are the caller's, sized from its own layout.
pub(crate) fn read_tensors<T: Float, R: Read + ?Sized>(
    r: &mut R,
    header: &Header,
    mut expected: BTreeMap<String, Expected>,
    bufs: &mut [&mut [T]],
    raws: &mut [Vec<u8>],
) -> Result<()> {
    FileDtype::from_name(&header.meta.dtype)?;
    let mut plan = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        let Some(e) = expected.remove(&t.name) else {
            return Err(bad(format!(
                "tensor `{}` is not described by the metadata",
                t.name
            )));
        };
        match e.into {
            Into::Raw { dtype, .. } if t.dtype != dtype => {
                return Err(bad(format!(
                    "tensor `{}` has dtype {:?}, it must be {dtype:?}",
                    t.name, t.dtype
                )));
            }
            Into::Raw { .. } => {}
            _ if FileDtype::from_safetensors(t.dtype).is_none() => {
                return Err(bad(format!(
                    "tensor `{}` has dtype {:?}; a checkpoint's tensors are F32, F64, BF16 or F16",
                    t.name, t.dtype
                )));
            }
            _ => {}
        }
        if t.shape != e.shape {
            return Err(bad(format!(
                "tensor `{}` has shape {:?}, the metadata says {:?}",
                t.name, t.shape, e.shape
            )));
        }
        plan.push((t, e.into));
    }
    if let Some(name) = expected.keys().next() {
        return Err(bad(format!(
            "tensor `{name}` is described by the metadata but missing"
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut scratch = Vec::new();
    let mut at = 8usize; // after the checksum tensor
    for (t, into) in plan {
        let n_bytes = t.data_offsets.1 - t.data_offsets.0;
        if t.data_offsets.0 != at && n_bytes != 0 {
            return Err(bad(format!(
                "tensor `{}` is not where the data continues",
                t.name
            )));
        }
        let what = format!("tensor `{}`", t.name);
        match into {
            Into::Values { buf, range } => {
                let src = FileDtype::from_safetensors(t.dtype).expect("checked above");
                if range.len() * src.size() != n_bytes {
                    return Err(bad(format!(
                        "tensor `{}` holds {n_bytes} bytes, not {} elements of {}",
                        t.name,
                        range.len(),
                        src.name()
                    )));
                }
                dtype::read_into(
                    r,
                    &mut crc,
                    src,
                    float_values_mut(&mut bufs[buf][range]),
                    &mut scratch,
                    &what,
                )?
            }
            Into::Raw { slot, .. } => {
                let dst = &mut raws[slot];
                dst.resize(n_bytes, 0);
                r.read_exact(dst)
                    .map_err(|e| super::format::read_error(e, &what))?;
                crc.update(dst);
            }
            Into::Skip => super::skip_bytes(r, &mut crc, n_bytes, &mut scratch, &what)?,
        }
        at = t.data_offsets.1;
    }
    let got = crc.finalize();
    if got != header.data_crc {
        return Err(bad(format!(
            "data checksum mismatch (stored {:#010x}, computed {got:#010x}): the tensor data is \
             corrupt",
            header.data_crc
        )));
    }
    Ok(())
}

/// Opens `path` for a load: the file and its length.
pub(crate) fn open(path: &std::path::Path) -> Result<(std::io::BufReader<std::fs::File>, u64)> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening `{}`", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading `{}`", path.display()), e))?
        .len();
    Ok((std::io::BufReader::with_capacity(1 << 16, file), len))
}
