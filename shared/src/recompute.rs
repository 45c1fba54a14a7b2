//! Activation recompute (checkpointing) modes, one enum for every tool:
//! mem-plan's and mofa-predict's memory models (none / selective / full),
//! chunk-run's step driver (none / full / chunked:C / auto) and mem-plan's
//! prediction of chunk-run's peaks.

use std::fmt;

/// What a training step keeps for backward and what it recomputes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recompute {
    /// Keep every activation.
    None,
    /// Recompute only the attention core (QK^T, softmax, dropout).
    Selective,
    /// Keep each layer's input; recompute the layer in backward.
    Full,
    /// MemFine FCDA: route once, then run the experts C token chunks at a
    /// time, recomputing chunk by chunk in backward.
    Chunked(u64),
    /// MACT: per layer, C = ceil(s'' / s'_max) rounded up to a bin.
    Auto,
}

impl Recompute {
    /// The mode's name without its chunk count (the `recompute` field of
    /// chunk_run records, mofa-predict's strategy key).
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
            Recompute::Chunked(_) => "chunked",
            Recompute::Auto => "auto",
        }
    }
}

/// `none`, `selective`, `full`, `chunked:C` or `auto`, as the flags spell it.
impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recompute::Chunked(c) => write!(f, "chunked:{c}"),
            m => f.write_str(m.name()),
        }
    }
}

/// Bad spellings are usage errors (exit 2).
impl std::str::FromStr for Recompute {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Recompute> {
        match s {
            "none" => Ok(Recompute::None),
            "selective" => Ok(Recompute::Selective),
            "full" => Ok(Recompute::Full),
            "auto" => Ok(Recompute::Auto),
            _ => match s.strip_prefix("chunked:").map(str::parse::<u64>) {
                Some(Ok(c)) if c >= 1 => Ok(Recompute::Chunked(c)),
                _ => Err(crate::Error::input(format!(
                    "'{s}': use none, selective, full, chunked:C (C >= 1) or auto"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for s in ["none", "selective", "full", "chunked:4", "auto"] {
            assert_eq!(s.parse::<Recompute>().unwrap().to_string(), s);
        }
        for bad in ["chunked:0", "chunked", "chunked:x", "Full", ""] {
            assert!(bad.parse::<Recompute>().is_err(), "{bad}");
        }
        assert_eq!(Recompute::Chunked(3).name(), "chunked");
    }
}
