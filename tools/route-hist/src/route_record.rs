//! Decoding one JSON-lines `route` record while counting its top-k ids in
//! place: no per-token vectors are built, which is what made the generic
//! decode spend ~40% of its time in the allocator (bench/README.md).

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Top-k ids alone do not tell the expert count.
pub const NEED_EXPERTS: &str =
    "a top-k trace does not say how many experts the model has; pass --experts E or --model config.json";

/// What the record said, beside the counts written into the unit buffer.
#[derive(Default, Debug)]
pub struct Decoded {
    pub is_route: bool,
    pub layer: Option<u64>,
    pub step: Option<u64>,
    pub rank: Option<u64>,
    /// Tokens (rows of `topk`), if the field was present.
    pub rows: Option<u64>,
}

/// Decodes a record, adding each (token, expert) pair to `unit[expert]`.
/// `k` is the top-k width: checked against every row, learned from the first
/// row when unknown.
pub struct RecordSeed<'a> {
    pub experts: Option<usize>,
    pub k: &'a mut Option<usize>,
    pub unit: &'a mut [u64],
}

enum Field {
    Kind,
    Layer,
    Step,
    Rank,
    Topk,
    Other,
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "kind" => Field::Kind,
                    "layer" => Field::Layer,
                    "step" => Field::Step,
                    "rank" => Field::Rank,
                    "topk" => Field::Topk,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// `true` when the value is the string "route".
struct IsRoute;

impl<'de> DeserializeSeed<'de> for IsRoute {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for IsRoute {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == "route")
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = Decoded;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Decoded, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = Decoded;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Decoded, A::Error> {
        let RecordSeed { experts, k, unit } = self;
        let mut out = Decoded::default();
        let mut kind_seen = false;
        let mut deferred: Option<&'de RawValue> = None;

        while let Some(field) = m.next_key::<Field>()? {
            match field {
                Field::Kind => {
                    out.is_route = m.next_value_seed(IsRoute)?;
                    kind_seen = true;
                }
                Field::Layer => out.layer = Some(m.next_value()?),
                Field::Step => out.step = Some(m.next_value()?),
                Field::Rank => out.rank = Some(m.next_value()?),
                // Count only once the record is known to be a route record; a
                // topk ahead of its kind is kept as raw text and counted below.
                Field::Topk if kind_seen && !out.is_route => {
                    m.next_value::<IgnoredAny>()?;
                }
                Field::Topk if kind_seen => {
                    out.rows = Some(m.next_value_seed(rows(experts, &mut *k, &mut *unit)?)?)
                }
                Field::Topk => deferred = Some(m.next_value::<&'de RawValue>()?),
                Field::Other => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let (Some(raw), true) = (deferred, out.is_route) {
            let mut d = serde_json::Deserializer::from_str(raw.get());
            let n = rows(experts, k, unit)?.deserialize(&mut d).map_err(|e| {
                let msg = e.to_string();
                de::Error::custom(
                    msg.rfind(" at line ")
                        .map_or(msg.as_str(), |i| &msg[..i])
                        .to_string(),
                )
            })?;
            out.rows = Some(n);
        }
        Ok(out)
    }
}

fn rows<'b, E: de::Error>(
    experts: Option<usize>,
    k: &'b mut Option<usize>,
    unit: &'b mut [u64],
) -> Result<Rows<'b>, E> {
    let experts = experts.ok_or_else(|| E::custom(NEED_EXPERTS))?;
    Ok(Rows { experts, k, unit })
}

struct Rows<'a> {
    experts: usize,
    k: &'a mut Option<usize>,
    unit: &'a mut [u64],
}

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = u64;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of top-k rows, one list of expert ids per token")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<u64, S::Error> {
        let mut row = 0u64;
        while seq
            .next_element_seed(Row {
                row,
                experts: self.experts,
                k: &mut *self.k,
                unit: &mut *self.unit,
            })?
            .is_some()
        {
            row += 1;
        }
        Ok(row)
    }
}

struct Row<'a> {
    row: u64,
    experts: usize,
    k: &'a mut Option<usize>,
    unit: &'a mut [u64],
}

impl<'de> DeserializeSeed<'de> for Row<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Row<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of expert ids")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let mut n = 0usize;
        while let Some(e) = seq.next_element::<i64>()? {
            if e < 0 || e as usize >= self.experts {
                return Err(de::Error::custom(format!(
                    "topk row {} names expert {e}, outside 0..{}; check --experts",
                    self.row, self.experts
                )));
            }
            self.unit[e as usize] += 1;
            n += 1;
        }
        match *self.k {
            Some(k) if k != n => Err(de::Error::custom(format!(
                "topk row {} has {n} entries, expected {k} (every token must list the same number of experts)",
                self.row
            ))),
            Some(_) => Ok(()),
            None => {
                *self.k = Some(n);
                Ok(())
            }
        }
    }
}
