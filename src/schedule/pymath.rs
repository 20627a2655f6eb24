//! Python's float and int semantics where torch's schedulers rely on them (`/`, `%`, `//`,
//! `**`, `max`, `bisect`), with Python's exceptions as [`Error::Scheduler`].

use crate::error::{Error, Result};

/// Python's `a / b` on floats: `ZeroDivisionError` instead of infinity.
pub(crate) fn div(a: f64, b: f64) -> Result<f64> {
    if b == 0.0 {
        return Err(Error::Scheduler("float division by zero".into()));
    }
    Ok(a / b)
}

/// Python's `a % b` on ints (the sign of `b`).
pub(crate) fn py_mod(a: i64, b: i64) -> Result<i64> {
    if b == 0 {
        return Err(Error::Scheduler("integer modulo by zero".into()));
    }
    let r = a.wrapping_rem(b);
    Ok(if r != 0 && ((r < 0) != (b < 0)) {
        r + b
    } else {
        r
    })
}

/// Python's `a // b` on ints (floor).
pub(crate) fn py_floordiv(a: i64, b: i64) -> Result<i64> {
    if b == 0 {
        return Err(Error::Scheduler(
            "integer division or modulo by zero".into(),
        ));
    }
    let q = a.wrapping_div(b);
    Ok(if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    })
}

/// Python's `a ** b` on floats (libm `pow`, as CPython's `float_pow`), with its errors.
pub(crate) fn py_pow(a: f64, b: f64) -> Result<f64> {
    if a == 0.0 && b < 0.0 {
        return Err(Error::Scheduler(
            "0.0 cannot be raised to a negative power".into(),
        ));
    }
    if a < 0.0 && b.is_finite() && b.fract() != 0.0 {
        return Err(Error::Scheduler(format!(
            "{a:?} ** {b:?} is a complex number"
        )));
    }
    Ok(a.powf(b))
}

/// Python's `max(a, b)`: `b` only if `b > a`.
pub(crate) fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `bisect.bisect_right`, step for step (so unsorted lists behave as in torch).
pub(crate) fn bisect_right(a: &[i64], x: i64) -> usize {
    let (mut lo, mut hi) = (0, a.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if x < a[mid] {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// An epoch passed to `step(epoch)` for a scheduler that counts whole epochs.
pub(crate) fn whole_epoch(name: &str, epoch: f64) -> Result<i64> {
    if !epoch.is_finite() || epoch.fract() != 0.0 || epoch.abs() > 9.0e15 {
        return Err(Error::Scheduler(format!(
            "{name}.step(epoch) needs a whole epoch, got {epoch:?} (only \
             CosineAnnealingWarmRestarts takes fractional epochs)"
        )));
    }
    Ok(epoch as i64)
}

/// Serde for floats that may be infinite (`ReduceLROnPlateau`'s `best`): JSON has no
/// infinity, so they are written as the strings `"inf"`, `"-inf"`, `"nan"`.
pub(crate) mod float_or_inf {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else if x.is_nan() {
            s.serialize_str("nan")
        } else if *x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Num(x) => Ok(x),
            Repr::Str(s) => match s.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"inf\", \"-inf\" or \"nan\", got {other:?}"
                ))),
            },
        }
    }
}
