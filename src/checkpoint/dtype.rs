//! The element types a checkpoint's tensors are stored in, and the casts between them on load.
//!
//! Every float tensor is written in its buffer's own dtype (safetensors `F32`, `F64`, `BF16`,
//! `F16`): an optimizer with bf16 state ([`crate::StatePrecision::Bf16`]) writes `BF16`
//! tensors, a [`crate::HalfBuffer`] its own half type. A load reads each tensor in the dtype
//! the file says and casts it into its destination as torch's `tensor.to(dtype)` does (and as
//! `Optimizer.load_state_dict` casts state to the parameter's dtype):
//!
//! - widening (`bf16`/`f16` -> `f32` -> `f64`) is exact;
//! - `f64 -> f32` rounds to nearest, ties to even (C's `static_cast<float>`);
//! - `f32 -> bf16` is `c10::BFloat16`'s round-to-nearest-even ([`crate::mixed::bf16_bits_from_f32`]),
//!   `f32 -> f16` is `c10::Half`'s (IEEE round to nearest even): both overflow to ±infinity,
//!   keep infinities and give a NaN for a NaN (torch's scalar quiet NaN for bf16);
//! - `f64 -> bf16` and `f64 -> f16` go through f32 first, as torch's copy kernel converts a
//!   double to `c10::BFloat16` / `c10::Half` (both are constructed from a `float`), so a
//!   double is rounded twice: `tests/checkpoint_half.rs` checks this against torch's own casts
//!   (`scripts/gen_half_checkpoint_fixtures.py`);
//! - `bf16 <-> f16` go through f32 (exact), then round.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::format::FileDtype;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::mixed::{bf16_bits_from_f32, Storage};

/// A tensor's values to write, borrowed in their own element type.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    /// `F32`.
    F32(&'a [f32]),
    /// `F64`.
    F64(&'a [f64]),
    /// `BF16`.
    Bf16(&'a [bf16]),
    /// `F16`.
    F16(&'a [f16]),
}

/// A destination for a tensor's values, in its own element type (the cast is chosen from the
/// file's dtype and this one).
#[derive(Debug)]
pub enum ValuesMut<'a> {
    /// `f32` storage.
    F32(&'a mut [f32]),
    /// `f64` storage.
    F64(&'a mut [f64]),
    /// `bf16` storage.
    Bf16(&'a mut [bf16]),
    /// `f16` storage.
    F16(&'a mut [f16]),
}

/// A [`Float`] slice as [`Values`].
pub fn float_values<T: Float>(s: &[T]) -> Values<'_> {
    // `T` is `f32` or `f64` (Float is sealed), so the casts below are between a type and
    // itself: same size, same alignment.
    match T::DTYPE {
        "float32" => Values::F32(bytemuck::cast_slice(s)),
        _ => Values::F64(bytemuck::cast_slice(s)),
    }
}

/// A [`Float`] slice as [`ValuesMut`].
pub fn float_values_mut<T: Float>(s: &mut [T]) -> ValuesMut<'_> {
    match T::DTYPE {
        "float32" => ValuesMut::F32(bytemuck::cast_slice_mut(s)),
        _ => ValuesMut::F64(bytemuck::cast_slice_mut(s)),
    }
}

impl<'a> Values<'a> {
    /// The file dtype these values are written as.
    pub fn dtype(&self) -> FileDtype {
        match self {
            Values::F32(_) => FileDtype::F32,
            Values::F64(_) => FileDtype::F64,
            Values::Bf16(_) => FileDtype::Bf16,
            Values::F16(_) => FileDtype::F16,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(s) => s.len(),
            Values::F64(s) => s.len(),
            Values::Bf16(s) => s.len(),
            Values::F16(s) => s.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes in the file.
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// The values' native-endian bytes (little-endian bytes on little-endian machines).
    pub(crate) fn ne_bytes(&self) -> &'a [u8] {
        match *self {
            Values::F32(s) => bytemuck::cast_slice(s),
            Values::F64(s) => bytemuck::cast_slice(s),
            Values::Bf16(s) => bytemuck::cast_slice(s.reinterpret_cast()),
            Values::F16(s) => bytemuck::cast_slice(s.reinterpret_cast()),
        }
    }

    /// Elements `r`.
    pub fn slice(&self, r: std::ops::Range<usize>) -> Values<'a> {
        match *self {
            Values::F32(s) => Values::F32(&s[r]),
            Values::F64(s) => Values::F64(&s[r]),
            Values::Bf16(s) => Values::Bf16(&s[r]),
            Values::F16(s) => Values::F16(&s[r]),
        }
    }

    /// Each element widened to f64 (exact), for tests and small tensors.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Values::F32(s) => s.iter().map(|&x| x as f64).collect(),
            Values::F64(s) => s.to_vec(),
            Values::Bf16(s) => s.iter().map(|&x| x.to_f32() as f64).collect(),
            Values::F16(s) => s.iter().map(|&x| x.to_f32() as f64).collect(),
        }
    }
}

impl ValuesMut<'_> {
    /// The destination's element type.
    pub fn dtype(&self) -> FileDtype {
        match self {
            ValuesMut::F32(_) => FileDtype::F32,
            ValuesMut::F64(_) => FileDtype::F64,
            ValuesMut::Bf16(_) => FileDtype::Bf16,
            ValuesMut::F16(_) => FileDtype::F16,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            ValuesMut::F32(s) => s.len(),
            ValuesMut::F64(s) => s.len(),
            ValuesMut::Bf16(s) => s.len(),
            ValuesMut::F16(s) => s.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The destination's native-endian bytes, to read a tensor of its own dtype into.
    fn ne_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            ValuesMut::F32(s) => bytemuck::cast_slice_mut(s),
            ValuesMut::F64(s) => bytemuck::cast_slice_mut(s),
            ValuesMut::Bf16(s) => bytemuck::cast_slice_mut(s.reinterpret_cast_mut()),
            ValuesMut::F16(s) => bytemuck::cast_slice_mut(s.reinterpret_cast_mut()),
        }
    }

    /// A sub-range of the destination.
    pub(crate) fn slice(&mut self, r: std::ops::Range<usize>) -> ValuesMut<'_> {
        match self {
            ValuesMut::F32(s) => ValuesMut::F32(&mut s[r]),
            ValuesMut::F64(s) => ValuesMut::F64(&mut s[r]),
            ValuesMut::Bf16(s) => ValuesMut::Bf16(&mut s[r]),
            ValuesMut::F16(s) => ValuesMut::F16(&mut s[r]),
        }
    }
}

/// One element read from a file, before the cast: f64 values stay f64 (so `f64 -> f32`
/// rounds once), every other dtype is widened to f32 exactly.
#[derive(Clone, Copy)]
enum Wide {
    F32(f32),
    F64(f64),
}

impl Wide {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        match self {
            Wide::F32(x) => x as f64,
            Wide::F64(x) => x,
        }
    }
    /// torch's cast to f32: exact from the narrower types, round to nearest from f64.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        match self {
            Wide::F32(x) => x,
            Wide::F64(x) => x as f32,
        }
    }
}

/// `x` cast to bf16 as torch casts an f64 tensor (through f32: see the module docs).
pub fn bf16_from_f64(x: f64) -> bf16 {
    bf16::from_bits(bf16_bits_from_f32(x as f32))
}

/// `x` cast to f16 as torch casts an f64 tensor (through f32: see the module docs).
pub fn f16_from_f64(x: f64) -> f16 {
    f16::from_f32(x as f32)
}

/// Decodes element `i` of little-endian `bytes` in dtype `src`.
#[inline(always)]
fn decode(src: FileDtype, b: &[u8]) -> Wide {
    match src {
        FileDtype::F32 => Wide::F32(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        FileDtype::F64 => Wide::F64(f64::from_le_bytes(b.try_into().expect("8 bytes"))),
        FileDtype::Bf16 => {
            Wide::F32(bf16::from_bits(u16::from_le_bytes(b.try_into().expect("2 bytes"))).to_f32())
        }
        FileDtype::F16 => Wide::F32(f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32()),
    }
}

/// Casts little-endian `bytes` of dtype `src` (exactly `dst.len()` elements) into `dst`, as
/// torch's `tensor.to(dtype)` does (see the module docs).
pub fn cast_le_bytes(src: FileDtype, bytes: &[u8], dst: ValuesMut<'_>) -> Result<()> {
    let size = src.size();
    if bytes.len() != dst.len() * size {
        return Err(Error::Checkpoint(format!(
            "{} bytes of {} cannot fill {} elements",
            bytes.len(),
            src.name(),
            dst.len()
        )));
    }
    let it = bytes.chunks_exact(size).map(|b| decode(src, b));
    match dst {
        ValuesMut::F32(d) => d.iter_mut().zip(it).for_each(|(d, x)| *d = x.to_f32()),
        ValuesMut::F64(d) => d.iter_mut().zip(it).for_each(|(d, x)| *d = x.to_f64()),
        ValuesMut::Bf16(d) => d
            .iter_mut()
            .zip(it)
            .for_each(|(d, x)| *d = <bf16 as Storage>::from_f32(x.to_f32())),
        ValuesMut::F16(d) => d
            .iter_mut()
            .zip(it)
            .for_each(|(d, x)| *d = <f16 as Storage>::from_f32(x.to_f32())),
    }
    Ok(())
}

/// Casts `src` into `dst` (as long) as torch's `dst.copy_(src)` does: see the module docs.
pub fn cast(src: Values<'_>, mut dst: ValuesMut<'_>) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::Checkpoint(format!(
            "a cast of {} elements into {}",
            src.len(),
            dst.len()
        )));
    }
    if src.dtype() == dst.dtype() {
        dst.ne_bytes_mut().copy_from_slice(src.ne_bytes());
        return Ok(());
    }
    let wide = |i: usize| match src {
        Values::F32(s) => Wide::F32(s[i]),
        Values::F64(s) => Wide::F64(s[i]),
        Values::Bf16(s) => Wide::F32(s[i].to_f32()),
        Values::F16(s) => Wide::F32(s[i].to_f32()),
    };
    match dst {
        ValuesMut::F32(d) => d
            .iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = wide(i).to_f32()),
        ValuesMut::F64(d) => d
            .iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = wide(i).to_f64()),
        ValuesMut::Bf16(d) => d
            .iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = <bf16 as Storage>::from_f32(wide(i).to_f32())),
        ValuesMut::F16(d) => d
            .iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = <f16 as Storage>::from_f32(wide(i).to_f32())),
    }
    Ok(())
}

/// Reads one tensor of dtype `src` from `r` into `dst`, checksumming the bytes read: straight
/// into the destination's memory when the dtypes agree (little-endian machines), else in pieces
/// through `scratch`, cast as [`cast_le_bytes`] says.
pub(crate) fn read_into<R: std::io::Read + ?Sized>(
    r: &mut R,
    crc: &mut crc32fast::Hasher,
    src: FileDtype,
    mut dst: ValuesMut<'_>,
    scratch: &mut Vec<u8>,
    what: &str,
) -> Result<()> {
    let n = dst.len();
    let piece = super::PIECE;
    if cfg!(target_endian = "little") && src == dst.dtype() {
        for bytes in dst.ne_bytes_mut().chunks_mut(piece * src.size()) {
            r.read_exact(bytes)
                .map_err(|e| super::format::read_error(e, what))?;
            crc.update(bytes);
        }
        return Ok(());
    }
    let mut at = 0;
    while at < n {
        let k = piece.min(n - at);
        scratch.resize(k * src.size(), 0);
        r.read_exact(scratch)
            .map_err(|e| super::format::read_error(e, what))?;
        crc.update(scratch);
        cast_le_bytes(src, scratch, dst.slice(at..at + k))?;
        at += k;
    }
    Ok(())
}

/// Calls `f` with `v`'s little-endian bytes: without a copy on little-endian machines, in
/// byte-swapped pieces otherwise.
pub(crate) fn with_le_bytes(
    v: Values<'_>,
    f: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let bytes = v.ne_bytes();
    if cfg!(target_endian = "little") {
        return f(bytes);
    }
    let size = v.dtype().size();
    let mut buf = Vec::with_capacity(bytes.len().min(super::PIECE * size));
    for piece in bytes.chunks(super::PIECE * size) {
        buf.clear();
        buf.extend_from_slice(piece);
        buf.chunks_exact_mut(size).for_each(<[u8]>::reverse);
        f(&buf)?;
    }
    Ok(())
}

/// Owned values of one element type: a load's staging buffer for a destination of that type.
#[derive(Debug, Clone)]
pub(crate) enum Owned {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Owned {
    /// `n` zeros of `dtype`.
    pub(crate) fn zeros(dtype: FileDtype, n: usize) -> Self {
        match dtype {
            FileDtype::F32 => Owned::F32(vec![0.0; n]),
            FileDtype::F64 => Owned::F64(vec![0.0; n]),
            FileDtype::Bf16 => Owned::Bf16(vec![bf16::ZERO; n]),
            FileDtype::F16 => Owned::F16(vec![f16::ZERO; n]),
        }
    }

    /// Every element.
    pub(crate) fn values(&self) -> Values<'_> {
        match self {
            Owned::F32(v) => Values::F32(v),
            Owned::F64(v) => Values::F64(v),
            Owned::Bf16(v) => Values::Bf16(v),
            Owned::F16(v) => Values::F16(v),
        }
    }

    /// Elements `r`, to write.
    pub(crate) fn slice_mut(&mut self, r: std::ops::Range<usize>) -> ValuesMut<'_> {
        match self {
            Owned::F32(v) => ValuesMut::F32(&mut v[r]),
            Owned::F64(v) => ValuesMut::F64(&mut v[r]),
            Owned::Bf16(v) => ValuesMut::Bf16(&mut v[r]),
            Owned::F16(v) => ValuesMut::F16(&mut v[r]),
        }
    }
}
