//! Saved optimizer state: what `state_dict()` returns and `load_state_dict()` takes.
//!
//! Unlike torch, which numbers parameters by position only (pytorch/pytorch#1489), every saved
//! parameter carries its arena offset, name and shape, so a checkpoint can be matched to a
//! freshly built (even reordered) model by name, and a mismatch is named instead of silently
//! loading the wrong buffer into the wrong parameter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::float::Float;
use crate::hyper::HyperValue;

/// Version of the [`StateDict`] layout. Bumped on any incompatible change.
pub const STATE_DICT_FORMAT: u32 = 1;

/// A serialisable snapshot of an optimizer: its groups' hyperparameters and every parameter's
/// state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDict<T> {
    /// [`STATE_DICT_FORMAT`] at the time of saving.
    pub format: u32,
    /// torch's class name of the optimizer (`"Adam"`).
    pub optimizer: String,
    /// `"float32"` or `"float64"`.
    pub dtype: String,
    /// One entry per param group, in order.
    pub param_groups: Vec<GroupDict>,
    /// One entry per parameter that has state, in parameter-number order.
    #[serde(bound(serialize = "T: Float", deserialize = "T: Float"))]
    pub state: Vec<ParamStateDict<T>>,
}

/// The `dtype` field of a JSON state dict (the rest of the document is not read), so the
/// document's values can be parsed in the type they were saved in and then cast.
pub(crate) fn json_dtype(json: &str) -> crate::error::Result<String> {
    #[derive(Deserialize)]
    struct DtypeOnly {
        dtype: String,
    }
    Ok(serde_json::from_str::<DtypeOnly>(json)?.dtype)
}

/// One param group: its hyperparameters and the parameters it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDict {
    /// Every hyperparameter by torch's name. Infinite values (ASGD's `t0 = inf`) are written
    /// as the strings `"Infinity"` / `"-Infinity"` (`"NaN"` for NaN), as buffers' are.
    #[serde(
        serialize_with = "non_finite::serialize_hyper",
        deserialize_with = "non_finite::deserialize_hyper"
    )]
    pub hyperparams: BTreeMap<String, HyperValue>,
    /// The group's parameters, in order: arena (registration) order, whatever order the
    /// group was given in. Their offsets show the group's runs of consecutive parameters.
    pub params: Vec<ParamRef>,
}

/// How a saved parameter is identified: never by pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamRef {
    /// Parameter number across all groups (torch's state-dict key): group 0's parameters
    /// first, then group 1's, as torch numbers them in the order the groups list them.
    pub index: usize,
    /// Registered name.
    pub name: String,
    /// Offset in the arena it was saved from.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
}

/// One parameter's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamStateDict<T> {
    /// The parameter's number ([`ParamRef::index`]).
    pub index: usize,
    /// Steps taken, for optimizers that count them (torch's `state["step"]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Per-parameter scalars besides `step` (ASGD's `eta` and `mu`, NAdam's `mu_product`).
    /// Non-finite values are written as buffers' are (ASGD's `eta` is rounded to f32 as torch
    /// keeps it, so a huge `lr` makes it infinite).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "non_finite::serialize",
        deserialize_with = "non_finite::deserialize_scalars"
    )]
    pub scalars: BTreeMap<String, f64>,
    /// State buffers by torch's name (`exp_avg`, `momentum_buffer`, ...), each the
    /// parameter's length, row-major; shaped state (Adafactor's `row_var` and `col_var`) as
    /// long as its own shape, row-major. In JSON, NaN and infinities are written as the
    /// strings `"NaN"`, `"Infinity"` and `"-Infinity"` (JSON has no such numbers).
    #[serde(
        serialize_with = "non_finite::serialize",
        deserialize_with = "non_finite::deserialize",
        bound(serialize = "T: Float", deserialize = "T: Float")
    )]
    pub buffers: BTreeMap<String, Vec<T>>,
}

/// serde_json writes NaN and infinities as `null`, which does not read back as a number: a
/// state that met one non-finite gradient could be saved but never loaded. Buffer values are
/// written as numbers when finite and as the strings Python's `json` module uses otherwise.
pub(crate) mod non_finite {
    use std::collections::BTreeMap;

    use serde::de::{self, Deserializer, Visitor};
    use serde::{Deserialize, Serialize, Serializer};

    use crate::float::Float;

    struct Elem<T>(T);

    impl<T: Float> Serialize for Elem<T> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let x = self.0.to_f64();
            if x.is_finite() {
                self.0.serialize(s)
            } else if x.is_nan() {
                s.serialize_str("NaN")
            } else if x > 0.0 {
                s.serialize_str("Infinity")
            } else {
                s.serialize_str("-Infinity")
            }
        }
    }

    struct Values<'a, T>(&'a [T]);

    impl<T: Float> Serialize for Values<'_, T> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|&x| Elem(x)))
        }
    }

    /// A map of value lists or of single values, non-finite numbers as strings.
    pub fn serialize<S: Serializer, V: Encode>(
        map: &BTreeMap<String, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, Encoded(v))))
    }

    /// What [`serialize`] writes a map's values as.
    pub trait Encode {
        /// Serialises with non-finite numbers as strings.
        fn encode<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
    }

    impl<T: Float> Encode for Vec<T> {
        fn encode<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            Values(self).serialize(s)
        }
    }

    impl Encode for f64 {
        fn encode<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            Elem(*self).serialize(s)
        }
    }

    struct Encoded<'a, V>(&'a V);

    impl<V: Encode> Serialize for Encoded<'_, V> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.encode(s)
        }
    }

    fn number(x: f64) -> serde_json::Value {
        if x.is_finite() {
            serde_json::json!(x)
        } else {
            serde_json::Value::String(
                if x.is_nan() {
                    "NaN"
                } else if x > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                }
                .to_string(),
            )
        }
    }

    fn unnumber(v: &serde_json::Value) -> Option<f64> {
        match v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => match s.as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                _ => None,
            },
            _ => None,
        }
    }

    /// Hyperparameters, numbers that are not finite as strings.
    pub fn serialize_hyper<S: Serializer>(
        map: &BTreeMap<String, crate::hyper::HyperValue>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use crate::hyper::HyperValue as H;
        s.collect_map(map.iter().map(|(k, v)| {
            let j = match v {
                H::Number(x) => number(*x),
                H::Pair(a, b) => serde_json::json!([number(*a), number(*b)]),
                H::OptPair(a, b) => {
                    serde_json::json!([a.map_or(serde_json::Value::Null, number), number(*b)])
                }
                H::Triple(a, b, c) => serde_json::json!([number(*a), number(*b), number(*c)]),
                other => serde_json::to_value(other).unwrap_or(serde_json::Value::Null),
            };
            (k, j)
        }))
    }

    /// Reads what [`serialize_hyper`] wrote (and plain JSON hyperparameters).
    pub fn deserialize_hyper<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, crate::hyper::HyperValue>, D::Error> {
        use crate::hyper::HyperValue as H;
        use serde_json::Value as J;
        let m: BTreeMap<String, J> = BTreeMap::deserialize(d)?;
        m.into_iter()
            .map(|(k, v)| {
                let h = match &v {
                    J::Bool(b) => H::Bool(*b),
                    J::Null => H::None,
                    J::Number(_) => H::Number(unnumber(&v).unwrap_or(f64::NAN)),
                    J::String(s) => match unnumber(&v) {
                        Some(x) => H::Number(x),
                        None => H::Str(s.clone()),
                    },
                    J::Array(a) if a.len() == 2 => match (&a[0], unnumber(&a[1])) {
                        (J::Null, Some(b)) => H::OptPair(None, b),
                        (x, Some(b)) => match unnumber(x) {
                            Some(a) => H::Pair(a, b),
                            None => return Err(de::Error::custom(format!("`{k}`: bad pair {v}"))),
                        },
                        _ => return Err(de::Error::custom(format!("`{k}`: bad pair {v}"))),
                    },
                    J::Array(a) if a.len() == 3 => {
                        match (unnumber(&a[0]), unnumber(&a[1]), unnumber(&a[2])) {
                            (Some(x), Some(y), Some(z)) => H::Triple(x, y, z),
                            _ => return Err(de::Error::custom(format!("`{k}`: bad triple {v}"))),
                        }
                    }
                    other => {
                        return Err(de::Error::custom(format!(
                            "`{k}`: unsupported hyperparameter value {other}"
                        )))
                    }
                };
                Ok((k, h))
            })
            .collect()
    }

    /// Reads what [`serialize`] wrote for a map of single f64 values.
    pub fn deserialize_scalars<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, f64>, D::Error> {
        let m: BTreeMap<String, Elem<f64>> = BTreeMap::deserialize(d)?;
        Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
    }

    struct ElemVisitor<T>(std::marker::PhantomData<T>);

    impl<T: Float> Visitor<'_> for ElemVisitor<T> {
        type Value = Elem<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Elem<T>, E> {
            Ok(Elem(T::from_f64(v)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Elem<T>, E> {
            Ok(Elem(T::from_f64(v as f64)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Elem<T>, E> {
            Ok(Elem(T::from_f64(v as f64)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Elem<T>, E> {
            match v {
                "NaN" => Ok(Elem(T::from_f64(f64::NAN))),
                "Infinity" => Ok(Elem(T::from_f64(f64::INFINITY))),
                "-Infinity" => Ok(Elem(T::from_f64(f64::NEG_INFINITY))),
                other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
            }
        }
    }

    impl<'de, T: Float> Deserialize<'de> for Elem<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ElemVisitor(std::marker::PhantomData))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Float>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<T>>, D::Error> {
        let m: BTreeMap<String, Vec<Elem<T>>> = BTreeMap::deserialize(d)?;
        Ok(m.into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|e| e.0).collect()))
            .collect())
    }
}

/// How `load_state_dict` pairs saved parameters with the optimizer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatchBy {
    /// The i-th parameter of saved group g goes to the i-th parameter of group g (torch's rule).
    /// Shapes must still agree (torch does not check them); names may differ, so a model whose
    /// parameters were renamed still loads.
    #[default]
    Position,
    /// Each saved parameter goes to the parameter of the same name in the same group, so a
    /// model whose parameters were registered in another order still loads correctly.
    Name,
}
