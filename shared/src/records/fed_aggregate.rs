//! fed-aggregate's record kinds: the client manifest it reads, the FedRA
//! allocation it writes and reads back, and the summary it prints.
//!
//! The summary's fields are in alphabetical order: its first writer built
//! it as a `serde_json` map (sorted keys), and the struct keeps those bytes.

use super::Tag;
use serde::{Deserialize, Serialize};

kinds! {
    const FED_AGGREGATE_KINDS;
    ClientUpdate => "client_update",
    FedraAlloc => "fedra_alloc",
    Aggregate => "aggregate",
}

/// One client's update in a manifest (fed-aggregate's input; written by
/// `ftk.flwr` and the Flower reference scripts).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(try_from = "RawClientUpdate")]
pub struct ClientUpdate {
    pub kind: Tag<ClientUpdate>,
    /// Client id; a JSON number is read as its decimal text (Flower's node
    /// ids are integers).
    pub cid: String,
    /// The client's safetensors file, relative to the manifest's directory.
    pub path: String,
    /// Example count, or any non-negative weight (Flower's message API
    /// weights by a float metric).
    pub num_examples: f64,
}

/// A `client_update` line as written, so that a missing or ill-typed field
/// gets a message that names the client and says what is expected.
#[derive(Deserialize)]
struct RawClientUpdate {
    kind: Tag<ClientUpdate>,
    cid: Option<serde_json::Value>,
    path: Option<String>,
    num_examples: Option<serde_json::Value>,
}

/// What is wrong with a `client_update` line.
#[derive(Debug, thiserror::Error)]
pub enum ClientUpdateError {
    #[error("client_update needs \"cid\" (a string or number)")]
    NoCid,
    #[error("client '{0}' has no \"path\" to its safetensors file")]
    NoPath(String),
    #[error("client '{cid}' needs \"num_examples\" as a non-negative number, got {got}")]
    BadNumExamples { cid: String, got: String },
}

impl TryFrom<RawClientUpdate> for ClientUpdate {
    type Error = ClientUpdateError;

    fn try_from(r: RawClientUpdate) -> Result<Self, ClientUpdateError> {
        let cid = match r.cid {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(ClientUpdateError::NoCid),
        };
        let Some(path) = r.path else {
            return Err(ClientUpdateError::NoPath(cid));
        };
        let num_examples = match r.num_examples.as_ref().and_then(|v| v.as_f64()) {
            Some(n) if n.is_finite() && n >= 0.0 => n,
            _ => {
                let got = r
                    .num_examples
                    .map_or("nothing".to_string(), |v| v.to_string());
                return Err(ClientUpdateError::BadNumExamples { cid, got });
            }
        };
        Ok(ClientUpdate {
            kind: r.kind,
            cid,
            path,
            num_examples,
        })
    }
}

/// One row of FedRA's allocation matrix (`fed-aggregate fedra-alloc`; read
/// back by `--alloc`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedraAlloc {
    pub kind: Tag<FedraAlloc>,
    pub round: u64,
    pub client: usize,
    pub cid: String,
    pub num_layers: usize,
    pub capacity: usize,
    /// Held global layers, increasing.
    pub layers: Vec<usize>,
    /// `A[i, :]`: 1 where the layer is held.
    pub mask: Vec<u8>,
}

/// fed-aggregate's summary (aggregation and `merge`). Optional fields are
/// present only when they apply.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Always "f64": the accumulator precision.
    pub accumulator: String,
    /// Client (or partial) tensor bytes read.
    pub bytes_read: u64,
    /// Clients behind the result (a merge counts the partials' clients).
    pub clients: u64,
    /// DP clip norm (--clip-norm, or the partials' recorded one).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clip_norm: Option<f64>,
    /// Clients whose update was clipped (with --clip-norm).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clipped: Option<u64>,
    /// DP noise and its accounting (with --noise-multiplier).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dp: Option<DpReport>,
    /// FedOpt client learning rate, recorded only (--eta-l).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eta_l: Option<f64>,
    /// "message" with --flower-api message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub flower_api: Option<String>,
    pub kind: Tag<Aggregate>,
    /// Wall time (left out with --no-timing).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ms: Option<u64>,
    pub params: u64,
    /// The --partial-out file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partial: Option<String>,
    /// Partials merged (`merge`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partials: Option<u64>,
    /// The round this step completed (server optimisers, --state).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub round: Option<u64>,
    /// Clients Krum/MultiKrum/Bulyan kept.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub selected: Option<Vec<String>>,
    /// Clients --skip-bad dropped, with the reason.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped: Option<Vec<SkippedClient>>,
    pub strategy: String,
    pub tensors: u64,
}

/// A client --skip-bad left out.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SkippedClient {
    pub cid: String,
    pub error: String,
}

/// The DP noise added to an aggregate and its per-round (epsilon, delta).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DpReport {
    pub accounting: String,
    pub delta: f64,
    /// null when the noise multiplier is 0 (no privacy).
    pub epsilon: Option<f64>,
    pub noise_multiplier: f64,
    pub noise_std: f64,
}
