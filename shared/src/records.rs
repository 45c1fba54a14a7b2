//! Every JSON-lines record kind the tools exchange, one struct per `kind`.
//!
//! Writers build these structs and readers decode them, so a field renamed
//! here is renamed for every tool at once, and `tests/records.rs` checks
//! that each struct round-trips and that the field lists in the tools'
//! `--help` and README agree with it. Field order is output order: the
//! fed-embed summaries keep the alphabetical order their first (map-based)
//! writer produced, so their bytes did not change when they became structs.
//!
//! A record's `kind` is a zero-sized tag ([`Tag`]): it always serialises as
//! the kind's name, and decoding a line of another kind into the struct fails
//! instead of silently reading the wrong fields. [`next`] skips records of
//! other kinds, as every reader here does.

use crate::error::Result;
use crate::jsonl::{KindOnly, Reader};
use crate::recompute::Recompute;
use serde::{Deserialize, Serialize};
use std::io::BufRead;

/// A record type and the `kind` that names it on the wire.
pub trait Record: Serialize + for<'de> Deserialize<'de> {
    const KIND: &'static str;
    /// The field names in declaration (= output) order. Read from the
    /// `Deserialize` impl; a struct that flattens another lists its own
    /// around the flattened one's (serde declares no list for it).
    fn fields() -> Vec<&'static str> {
        struct_fields::<Self>().to_vec()
    }
}

/// The `kind` field of record `R`: serialises as `R::KIND`, accepts only it.
pub struct Tag<R>(std::marker::PhantomData<fn() -> R>);

impl<R> Default for Tag<R> {
    fn default() -> Self {
        Tag(std::marker::PhantomData)
    }
}
impl<R> Clone for Tag<R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Tag<R> {}
impl<R> PartialEq for Tag<R> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<R: Record> std::fmt::Debug for Tag<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", R::KIND)
    }
}

impl<R: Record> Serialize for Tag<R> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(R::KIND)
    }
}

impl<'de, R: Record> Deserialize<'de> for Tag<R> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let k = std::borrow::Cow::<'de, str>::deserialize(d)?;
        if k == R::KIND {
            Ok(Tag::default())
        } else {
            Err(serde::de::Error::custom(format!(
                "kind is \"{k}\", expected \"{}\"",
                R::KIND
            )))
        }
    }
}

/// `Ty => "kind"` pairs: each type's [`Record`] impl, and the list of the
/// kinds (`ALL_KINDS`, or the const named after `const` for a tool's own
/// block in a submodule; [`all_kinds`] joins them).
macro_rules! kinds {
    (const $all:ident; $($ty:ident => $name:literal $(: $fields:expr)?),* $(,)?) => {
        $(impl $crate::records::Record for $ty {
            const KIND: &'static str = $name;
            $(fn fields() -> Vec<&'static str> {
                $fields
            })?
        })*
        /// The kinds of this block, for tests and documentation.
        pub const $all: &[&str] = &[$($name),*];
    };
    ($($ty:ident => $name:literal $(: $fields:expr)?),* $(,)?) => {
        kinds! { const ALL_KINDS; $($ty => $name $(: $fields)?),* }
    };
}

// One file per tool whose kinds live apart from the list below.
mod fed_aggregate;
pub use fed_aggregate::{
    Aggregate, ClientUpdate, ClientUpdateError, DpReport, FedraAlloc, SkippedClient,
    FED_AGGREGATE_KINDS,
};

/// Every kind defined in this module and its per-tool files.
pub fn all_kinds() -> Vec<&'static str> {
    [ALL_KINDS, FED_AGGREGATE_KINDS].concat()
}

kinds! {
    Route => "route",
    RouteHist => "route_hist",
    MemPlan => "mem_plan",
    MemPlanSummary => "mem_plan_summary",
    ChunkRun => "chunk_run",
    FedEmbedSubspace => "fed_embed_subspace",
    FedEmbedD3aWeights => "fed_embed_d3a_weights",
    FedEmbedEnsemble => "fed_embed_ensemble",
    FedEmbedPrototypes => "fed_embed_prototypes",
    FedEmbedPseudoLabel => "fed_embed_pseudo_label",
    FedEmbedCluster => "fed_embed_cluster",
    FedEmbedNoise => "fed_embed_noise",
    FedEmbedKeys => "fed_embed_keys",
    FedEmbedAdaptWeights => "fed_embed_adapt_weights",
    FedEmbedPromptSample => "fed_embed_prompt_sample",
    DiffuseSynthSample => "sample",
    DiffuseSynthDescription => "description",
    MofaPredict => "mofa_predict":
        [&["kind", "id"][..], struct_fields::<MofaMetrics>(), &["assumed"]].concat(),
    MofaTune => "mofa_tune":
        [&["rank", "strategy", "kind", "id"][..], struct_fields::<MofaMetrics>()].concat(),
    MofaTuneSummary => "mofa_tune_summary",
    MofaCalibRow => "mofa_calib_row",
    MofaCalibrate => "mofa_calibrate",
}

/// The next record of kind `R` from `r`, skipping other kinds; `None` at end.
pub fn next<R: Record, B: BufRead>(r: &mut Reader<B>) -> Result<Option<R>> {
    loop {
        let kind = match r.next_line()? {
            None => return Ok(None),
            Some(line) => serde_json::from_str::<KindOnly>(line),
        };
        if kind.map_err(|e| r.decode_error(&e))?.kind.as_deref() != Some(R::KIND) {
            continue;
        }
        return serde_json::from_str::<R>(r.current_line())
            .map(Some)
            .map_err(|e| r.decode_error(&e));
    }
}

// ---------------------------------------------------------------- routing

/// One micro-batch's routing from one source rank (route-hist's input).
/// route-hist decodes it with a counting fast path (`route_record.rs`, no
/// per-token vectors) over these same fields.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Route {
    pub kind: Tag<Route>,
    pub layer: u64,
    pub step: u64,
    /// The source (EP) rank that routed these tokens.
    pub rank: u64,
    /// Per token, its experts.
    pub topk: Vec<Vec<u64>>,
}

/// Per-(layer, step) expert and EP-rank histogram (route-hist's output;
/// read by mem-plan, chunk-run and mofa-predict).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RouteHist {
    pub kind: Tag<RouteHist>,
    pub layer: u64,
    pub step: u64,
    pub experts: u64,
    pub topk: u64,
    pub tokens: u64,
    /// (token, expert) pairs routed to each expert.
    pub counts: Vec<u64>,
    pub ep: u64,
    /// Token copies each EP rank receives (experts on ranks contiguously).
    pub rank_counts: Vec<u64>,
    /// (max(counts) - mean) / mean.
    pub max_vio: f64,
    /// [source rank][destination rank] token copies.
    pub a2a: Vec<Vec<u64>>,
    /// Pairs over Megatron's capacity (only with --capacity-factor).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dropped: Option<u64>,
}

// ---------------------------------------------------------------- mem-plan

/// Activation bytes under each recompute mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct Acts {
    pub none: u64,
    pub full: u64,
    pub chunked: u64,
}

/// mem-plan's record per MoE layer and EP rank.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MemPlan {
    pub kind: Tag<MemPlan>,
    pub layer: u64,
    pub moe_layer: u64,
    pub stage: u64,
    pub rank: u64,
    pub tokens_received: u64,
    /// Static memory of the whole GPU (all its layers, embedding/head).
    pub static_bytes: u64,
    /// This layer's share of it.
    pub layer_static_bytes: u64,
    pub ckpt_bytes: u64,
    pub act_bytes: Acts,
    pub chunks: u64,
    pub peak_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fits: Option<bool>,
}

/// TP, PP, EP, CP, DP, virtual pipeline stages and the world size.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub tp: u64,
    pub pp: u64,
    pub ep: u64,
    pub cp: u64,
    pub dp: u64,
    pub vpp: u64,
    pub world: u64,
}

/// One pipeline stage of a mem-plan summary.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StageSummary {
    pub stage: u64,
    pub layers: u64,
    pub moe_layers: u64,
    pub m_g: u64,
    pub static_bytes: u64,
    pub ckpt_bytes: u64,
    /// s'_max of eq. (8): token copies one MoE layer may receive unchunked.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub s_max: Option<i64>,
    pub peak_bytes: Acts,
    pub chunks: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fits: Option<bool>,
}

/// mem-plan's last record: the plan as a whole.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MemPlanSummary {
    pub kind: Tag<MemPlanSummary>,
    pub model: String,
    pub params: u64,
    pub layers: u64,
    pub moe_layers: u64,
    pub layout: Layout,
    pub micro_batch: u64,
    pub seq: u64,
    pub dtype: String,
    pub optimizer: String,
    pub zero: u64,
    pub routing: String,
    pub hist_records: u64,
    pub hist_layers: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_bytes: Option<u64>,
    pub alpha: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub budget_bytes: Option<u64>,
    pub chunk_bins: Vec<u64>,
    pub chunks: u64,
    pub peak_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fits: Option<bool>,
    pub dominant: String,
    pub why: String,
    pub stages: Vec<StageSummary>,
}

// ---------------------------------------------------------------- chunk-run

/// One chunk-run step under one recompute mode.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ChunkRun {
    pub kind: Tag<ChunkRun>,
    pub step: u64,
    pub recompute: String,
    pub chunks: u64,
    pub chunks_per_layer: Vec<u64>,
    pub layers: u64,
    pub tokens: u64,
    pub max_expert_tokens: u64,
    pub peak_act_bytes: u64,
    pub predicted_act_bytes: u64,
    pub peak_bytes: u64,
    pub device: String,
    pub dtype: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_reserved_bytes: Option<u64>,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub loss: f64,
}

// ---------------------------------------------------------------- fed-embed
// Fields in alphabetical order (see the module comment).

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedSubspace {
    pub dim: u64,
    pub energy: f64,
    pub kind: Tag<FedEmbedSubspace>,
    pub numerical_rank: u64,
    pub output: String,
    pub rank: u64,
    pub samples: u64,
    pub sigma_max: f64,
    pub sigma_r: f64,
}

/// One teacher (client basis) in a d3a-weights summary.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct D3aClient {
    pub basis: String,
    pub client: u64,
    pub mean_cos: f64,
    pub mean_weight: f64,
    pub rank: u64,
    pub top_teacher: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedD3aWeights {
    pub clients: u64,
    pub kind: Tag<FedEmbedD3aWeights>,
    pub output: String,
    /// Share of samples whose top teacher is their own domain's client
    /// (only when the features carry domains).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub own_domain_top: Option<f64>,
    pub per_client: Vec<D3aClient>,
    pub samples: u64,
    pub temperature: f64,
    pub top_k: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedEnsemble {
    pub classes: u64,
    pub combine: String,
    pub kind: Tag<FedEmbedEnsemble>,
    pub mean_entropy: f64,
    pub output: String,
    pub samples: u64,
    pub teachers: u64,
    pub temperature: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedPrototypes {
    pub classes: u64,
    pub dim: u64,
    pub kind: Tag<FedEmbedPrototypes>,
    pub max_count: i64,
    pub min_count: i64,
    pub output: String,
    pub samples: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedPseudoLabel {
    /// Only when the features file has true labels.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accuracy: Option<f64>,
    pub classes: u64,
    pub kind: Tag<FedEmbedPseudoLabel>,
    pub mean_confidence: f64,
    pub metric: String,
    pub output: String,
    pub rejected: u64,
    pub samples: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedCluster {
    pub centroid_rows: u64,
    pub classes: u64,
    pub dim: u64,
    pub inertia: f64,
    pub k: u64,
    pub kind: Tag<FedEmbedCluster>,
    pub output: String,
    pub raw_rows: u64,
    pub rows: u64,
    pub samples: u64,
    pub seed: u64,
    pub skipped_unlabelled: u64,
}

/// What `noise` did to the shared rows. The DP fields (`clip` .. `epsilon`)
/// are present only with --clip.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedNoise {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clip: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clipped_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clipped_rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delta: Option<f64>,
    pub dim: u64,
    /// null when sigma is 0: no privacy.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "present"
    )]
    pub epsilon: Option<Option<f64>>,
    pub kind: Tag<FedEmbedNoise>,
    /// Largest row norm before clipping.
    pub max_row_norm: f64,
    /// Mean row norm after clipping and noise: what is uploaded.
    pub mean_norm_after: f64,
    /// Mean row norm of the input.
    pub mean_norm_before: f64,
    /// Mean row norm after clipping, before noise: the signal that is uploaded.
    pub mean_norm_clipped: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub noise_multiplier: Option<f64>,
    /// Mean L2 norm of the noise added to a row.
    pub noise_norm: f64,
    pub output: String,
    pub rows: u64,
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sensitivity: Option<f64>,
    pub sigma: f64,
    pub tensor: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedKeys {
    pub ctx: u64,
    pub dim: u64,
    pub domains: u64,
    pub kind: Tag<FedEmbedKeys>,
    pub output: String,
    pub seed: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedAdaptWeights {
    pub domains: u64,
    pub kind: Tag<FedEmbedAdaptWeights>,
    pub output: String,
    pub prompts_shape: Vec<u64>,
    pub samples: u64,
    pub temperature: f64,
    pub top_domain_counts: Vec<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FedEmbedPromptSample {
    pub kind: Tag<FedEmbedPromptSample>,
    pub mc_samples: u64,
    pub mean_var: f64,
    pub output: String,
    pub output_kind: String,
    pub prompt_shape: Vec<u64>,
    pub samples: u64,
    pub seed: u64,
}

// ---------------------------------------------------------------- diffuse-synth
// Fields in alphabetical order: the first writer built these with `json!`
// (a sorted map), and the bytes stay as they were.

/// One generated sample (diffuse-synth's manifest line, one per sample).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiffuseSynthSample {
    /// --class, as given.
    pub class: Option<i64>,
    /// --client, as given.
    pub client: Option<String>,
    /// The sample's index in the whole job (shards count from their first).
    pub index: u64,
    pub kind: Tag<DiffuseSynthSample>,
    /// The safetensors file, or the sample's PNG with --png-dir.
    pub path: String,
    /// The sample's derived seed (with --seed).
    pub seed: Option<u64>,
}

/// A learned FedDEO description (`diffuse-synth describe`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiffuseSynthDescription {
    /// Images the SGD drew from.
    pub images: u64,
    pub kind: Tag<DiffuseSynthDescription>,
    /// Denoising loss at the first and the last step (f32, as computed).
    pub loss_first: Option<f32>,
    pub loss_last: Option<f32>,
    pub path: String,
    pub steps: u64,
}

// ---------------------------------------------------------------- mofa-predict

/// Seconds per iteration by cause on the pipeline stage that sets the pace;
/// the terms sum to `iter_s`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq)]
pub struct MofaBreakdown {
    pub compute_s: f64,
    pub recompute_s: f64,
    pub tp_comm_s: f64,
    pub cp_comm_s: f64,
    pub ep_comm_s: f64,
    pub pp_bubble_s: f64,
    pub pp_p2p_s: f64,
    pub dp_comm_exposed_s: f64,
    pub optimizer_s: f64,
}

/// mofa-predict's fault-tolerance block.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct MofaFt {
    /// Mean time between job interruptions, hours (null without failures).
    pub job_mtbf_h: Option<f64>,
    pub ckpt_s: f64,
    pub restart_s: f64,
    /// Checkpoint interval used (given, or Daly's optimum); null without failures.
    pub ckpt_interval_s: Option<f64>,
    /// Expected interruptions over the run (null without run.tokens).
    pub expected_failures: Option<f64>,
    /// Useful training time / wall time.
    pub goodput: f64,
}

/// What mofa-predict predicts for one job: the body shared by
/// `mofa_predict` and `mofa_tune` (flattened into both).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaMetrics {
    pub iter_s: f64,
    /// Model FLOP/s per GPU (no recompute), TFLOP/s.
    pub tflops_per_gpu: f64,
    /// Hardware FLOP/s per GPU including recomputed FLOPs, TFLOP/s.
    pub hw_tflops_per_gpu: f64,
    pub mfu: f64,
    pub tokens_per_s: f64,
    pub mem_gb_per_gpu: f64,
    pub fits: bool,
    pub breakdown: MofaBreakdown,
    pub ft: MofaFt,
    /// Wall-clock days for run.tokens including failures (null without it).
    pub train_days: Option<f64>,
    pub params_b: f64,
    pub gpus: u64,
    /// The largest breakdown term, or `fault_tolerance`.
    pub bottleneck: String,
}

/// One job's prediction (mofa-predict's output per input line).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaPredict {
    pub kind: Tag<MofaPredict>,
    /// The input line's `id`, as given (any JSON value; null when absent).
    pub id: serde_json::Value,
    #[serde(flatten)]
    pub metrics: MofaMetrics,
    /// Defaults the job took, as `field=value`.
    pub assumed: Vec<String>,
}

/// The attention kernel, by generation: what it costs depends on it far
/// more than on anything else at long context.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttnKernel {
    /// Unfused: scores as batched GEMMs, softmax/dropout passes through HBM
    /// (Megatron 2021-22, `flash_attn: false`).
    None,
    /// FlashAttention (v1, Dao et al. 2022) or its Triton port.
    Fa1,
    /// FlashAttention-2 (Dao 2023): what `flash_attn: true` means.
    Fa2,
    /// FlashAttention-3 / cuDNN fused attention on Hopper (Shah et al. 2024).
    Fa3,
}

/// A submodule Megatron-Core's selective recompute can re-run in the
/// backward (`TransformerConfig.recompute_modules`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeModule {
    /// The attention core (Megatron's default).
    CoreAttn,
    /// The MoE experts' activation function.
    MoeAct,
    /// The layer norms that are modules of their own.
    Layernorm,
    /// MLA's up projections and RoPE.
    MlaUpProj,
    /// A dense layer's MLP.
    Mlp,
    /// The whole MoE layer: router, dispatch, experts, combine.
    Moe,
    /// The MoE layer's shared experts.
    SharedExperts,
}

impl RecomputeModule {
    /// Every module, in Megatron's documentation order.
    pub const ALL: [RecomputeModule; 7] = [
        RecomputeModule::CoreAttn,
        RecomputeModule::MoeAct,
        RecomputeModule::Layernorm,
        RecomputeModule::MlaUpProj,
        RecomputeModule::Mlp,
        RecomputeModule::Moe,
        RecomputeModule::SharedExperts,
    ];

    /// The name Megatron's `--recompute-modules` takes.
    pub fn name(self) -> &'static str {
        match self {
            RecomputeModule::CoreAttn => "core_attn",
            RecomputeModule::MoeAct => "moe_act",
            RecomputeModule::Layernorm => "layernorm",
            RecomputeModule::MlaUpProj => "mla_up_proj",
            RecomputeModule::Mlp => "mlp",
            RecomputeModule::Moe => "moe",
            RecomputeModule::SharedExperts => "shared_experts",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// A set of [`RecomputeModule`]s as bits (`tune` copies the strategy for
/// every candidate; a bit set copies for free), written as a list of names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(from = "Vec<RecomputeModule>", into = "Vec<RecomputeModule>")]
pub struct RecomputeModules(u8);

impl RecomputeModules {
    /// Megatron-Core's default: `["core_attn"]`.
    pub const MEGATRON_DEFAULT: RecomputeModules = RecomputeModules(1);

    pub fn has(self, m: RecomputeModule) -> bool {
        self.0 & (1 << m as u8) != 0
    }

    pub fn with(self, m: RecomputeModule) -> Self {
        RecomputeModules(self.0 | (1 << m as u8))
    }
}

impl From<Vec<RecomputeModule>> for RecomputeModules {
    fn from(v: Vec<RecomputeModule>) -> Self {
        v.into_iter().fold(RecomputeModules(0), |s, m| s.with(m))
    }
}

impl From<RecomputeModules> for Vec<RecomputeModule> {
    fn from(s: RecomputeModules) -> Self {
        RecomputeModule::ALL
            .into_iter()
            .filter(|m| s.has(*m))
            .collect()
    }
}

/// How context-parallel ranks exchange K and V.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpComm {
    /// Ring attention (Megatron / Transformer Engine): K/V blocks travel the
    /// ring while each step's attention runs; only what outlasts it shows.
    Ring,
    /// All-gather K/V before attention, reduce-scatter dK/dV after it, on
    /// the critical path (Llama 3, Dubey et al. 2024 §3.3.2).
    AllGather,
}

/// The parallel layout and options of one strategy as mofa-predict
/// resolved it: its time and memory models read this struct, and the
/// `mofa_tune` record carries it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaStrategy {
    pub tp: u64,
    pub pp: u64,
    pub dp: u64,
    pub cp: u64,
    pub ep: u64,
    pub vpp: u64,
    pub mbs: u64,
    pub gbs: u64,
    /// `none`, `selective` or `full`.
    #[serde(with = "by_name")]
    pub recompute: Recompute,
    pub zero: u64,
    pub sp: bool,
    pub flash_attn: bool,
    /// `none`, `fa1`, `fa2` or `fa3`.
    pub attn_kernel: AttnKernel,
    pub overlap_grad_reduce: bool,
    /// ZeRO 1/2 parameter all-gather under the next forward.
    pub overlap_param_gather: bool,
    /// Tensor-parallel collectives pipelined with the GEMMs (Megatron/TE
    /// userbuffers, PyTorch async TP).
    pub tp_comm_overlap: bool,
    /// MoE all-to-all hidden under another micro-batch's compute.
    pub ep_comm_overlap: bool,
    /// Expert tensor parallel size (Megatron's default: tp).
    pub etp: u64,
    /// Bytes per gradient element in the data-parallel reduction (fp32
    /// main grads = 4; FSDP PURE / DeepSpeed fp16 = 2).
    pub grad_bytes: f64,
    pub moe_imbalance: f64,
    /// ZeRO-3 gathers and reduce-scatters leave through each rank's own
    /// NIC (a flat ring) instead of a node's every NIC: DeepSpeed's stage 3
    /// gathers each parameter's partitions with per-rank collectives over
    /// the flat data-parallel group, with no intra-node stage (set for
    /// `framework` naming DeepSpeed with zero 3).
    pub z3_rank_nic: bool,
    /// Selective recompute is torchtitan's op-level policy: every op's
    /// output is saved except every second matmul's and the non-matmul
    /// ops' (norms, activations, rotary), which re-run in the backward.
    pub sac_op: bool,
    /// MoE tokens dispatched by DeepEP: a token crosses to each remote
    /// node holding one of its experts once, and NVLink fans it out there.
    pub deepep: bool,
    /// `ring` or `allgather`.
    pub cp_comm: CpComm,
    /// What "selective" re-runs under Megatron-Core, as the job gave it
    /// (`strategy.recompute_modules`); absent: Megatron's default
    /// `["core_attn"]`, and the records leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_modules: Option<RecomputeModules>,
}

impl MofaStrategy {
    /// `tp=8,pp=4,...` as tables print it, `mofa_tune` records carry it as
    /// their `id`, and `--strategy` accepts it.
    pub fn compact(&self) -> String {
        format!(
            "tp={},pp={},dp={},cp={},ep={},vpp={},mbs={},gbs={},recompute={},zero={},sp={}",
            self.tp,
            self.pp,
            self.dp,
            self.cp,
            self.ep,
            self.vpp,
            self.mbs,
            self.gbs,
            self.recompute,
            self.zero,
            self.sp
        )
    }
}

/// A value written as its `Display` form and read through `FromStr`.
mod by_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One ranked strategy of `mofa-predict tune`: the prediction's fields
/// after the rank and the strategy.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaTune {
    pub rank: u64,
    pub strategy: MofaStrategy,
    pub kind: Tag<MofaTune>,
    /// The strategy in `tp=..,pp=..` form.
    pub id: serde_json::Value,
    #[serde(flatten)]
    pub metrics: MofaMetrics,
}

/// The last line of `mofa-predict tune` (fields in alphabetical order, as
/// its first, map-based writer produced them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaTuneSummary {
    /// Cluster defaults the base job took.
    pub assumed: Vec<String>,
    pub candidates: u64,
    /// Absent under --no-timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Candidates that fit in memory.
    pub fitting: u64,
    pub kind: Tag<MofaTuneSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategies_per_s: Option<f64>,
}

/// One corpus row as `mofa-predict calibrate` predicted it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaCalibRow {
    pub kind: Tag<MofaCalibRow>,
    pub id: String,
    pub source: String,
    pub confidence: String,
    pub metric: String,
    pub measured: f64,
    /// With the shipped constants (in-sample).
    pub predicted: f64,
    pub ape: f64,
    /// With constants fitted without this row's source (null when the
    /// source was not predicted).
    pub loso_predicted: Option<f64>,
    pub loso_ape: Option<f64>,
    /// + too fast, − too slow (percent of the measured rate).
    pub loso_speed_error: Option<f64>,
    pub fits: bool,
}

/// One source left out: its rows' mean error and the constants fitted
/// without it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaSourceLoso {
    pub fitted_without: std::collections::BTreeMap<String, f64>,
    pub insample_mape: f64,
    pub loso_mape: f64,
    pub n: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaWorstSource {
    pub mape: f64,
    pub source: String,
}

/// A fault-tolerance figure fitted on one published report and predicted
/// for another.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaCrossCheck {
    pub ape: f64,
    pub fit_on: String,
    pub predict: String,
    pub predicted: f64,
    pub published: f64,
}

/// The fault-tolerance model against published reliability reports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaFtReport {
    /// Checkpoint write rate, GB/s.
    pub ckpt_gbs: Vec<MofaCrossCheck>,
    /// Mean APE of the shipped default failure rate on the reports it was
    /// not fitted on.
    pub mtbf_default_mape: f64,
    /// Job MTBF, hours.
    pub mtbf_h: Vec<MofaCrossCheck>,
    pub note: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaGemmEff {
    pub a100: f64,
    pub h100: f64,
}

/// The summary line of `mofa-predict calibrate` (fields in alphabetical
/// order, as its first, map-based writer produced them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MofaCalibrate {
    /// Leave-one-source-out MAPE of a constant-MFU-per-GPU predictor.
    pub baseline_constant_mfu_loso_mape: f64,
    /// The time model's constants as shipped.
    pub calib: std::collections::BTreeMap<String, f64>,
    pub fit_iters: u64,
    /// Constants refitted on every source (null without --fit).
    pub fitted_on_all: Option<std::collections::BTreeMap<String, f64>>,
    pub ft: MofaFtReport,
    pub gemm_eff: MofaGemmEff,
    pub insample_mape_mean_over_sources: f64,
    pub kind: Tag<MofaCalibrate>,
    pub loso_by_source: std::collections::BTreeMap<String, MofaSourceLoso>,
    /// The headline: mean over sources of each source's LOSO MAPE.
    pub loso_mape_mean_over_sources: f64,
    pub loso_mape_worst_source: Option<MofaWorstSource>,
    pub n_counted: u64,
    pub n_rows: u64,
    pub n_sources: u64,
}

// ---------------------------------------------------------------- schema

/// The field names of record `R`, in declaration (= output) order.
pub fn fields<R: Record>() -> Vec<&'static str> {
    R::fields()
}

/// The field names of struct `T` as its `Deserialize` impl declares them
/// (empty for a struct with a `#[serde(flatten)]` field).
pub fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut got: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldsOf(&mut got));
    got
}

/// A deserializer that only learns the field list of the struct asked for.
struct FieldsOf<'a>(&'a mut &'static [&'static str]);

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field list read")
    }
}

impl std::error::Error for Stop {}

impl serde::de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> serde::Deserializer<'de> for FieldsOf<'_> {
    type Error = Stop;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        _: V,
    ) -> std::result::Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> std::result::Result<V::Value, Stop> {
        *self.0 = fields;
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// The field names a help text documents for `kind`: the quoted names at
/// the top level of the first `{"kind":"<kind>", ...}` in `text` (nested
/// `{...}` and `[...]` are skipped), and whether the list ends in `...`
/// (some fields left out on purpose).
pub fn documented_fields(text: &str, kind: &str) -> Option<(Vec<String>, bool)> {
    let start = text.find(&format!("{{\"kind\":\"{kind}\""))?;
    let b = text.as_bytes();
    let (mut depth, mut i) = (0usize, start);
    let (mut names, mut elided, mut after_colon) = (vec![], false, false);
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some((names, elided));
                }
            }
            b':' if depth == 1 => after_colon = true,
            b',' if depth == 1 => after_colon = false,
            b'.' if depth == 1 && text[i..].starts_with("...") => {
                elided = true;
                i += 2;
            }
            b'"' => {
                let end = i + 1 + text[i + 1..].find('"')?;
                if depth == 1 && !after_colon {
                    names.push(text[i + 1..end].to_string());
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// A field that may be absent (outer `None`) or present as null (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_writes_its_kind_and_refuses_others() {
        let t: Tag<RouteHist> = Tag::default();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"route_hist\"");
        assert!(serde_json::from_str::<Tag<RouteHist>>("\"route\"").is_err());
        assert!(serde_json::from_str::<Tag<RouteHist>>("\"route_hist\"").is_ok());
    }

    #[test]
    fn field_lists_come_from_the_structs() {
        assert_eq!(fields::<Route>(), ["kind", "layer", "step", "rank", "topk"]);
        let help =
            "out: {\"kind\":\"route\",\"layer\":L,\"step\",\"rank\",\"topk\":[[e,e],...]} more";
        let (names, elided) = documented_fields(help, "route").unwrap();
        assert_eq!(names, ["kind", "layer", "step", "rank", "topk"]);
        assert!(!elided);
        let (names, elided) =
            documented_fields("{\"kind\":\"x\",\"a\":{\"b\",\"c\"},...}", "x").unwrap();
        assert_eq!((names, elided), (vec!["kind".into(), "a".into()], true));
        assert!(documented_fields("nothing here", "x").is_none());
    }

    #[test]
    fn next_skips_other_kinds_and_names_the_line() {
        let data = "{\"kind\":\"route\",\"layer\":0,\"step\":0,\"rank\":2,\"topk\":[[1]]}\n\
                    {\"kind\":\"chunk_run\"}\n\
                    {\"kind\":\"route\",\"layer\":1}\n";
        let mut r = Reader::new("t.jsonl", data.as_bytes());
        let a: Route = next(&mut r).unwrap().unwrap();
        assert_eq!((a.layer, a.rank, a.topk.clone()), (0, 2, vec![vec![1]]));
        let e = next::<Route, _>(&mut r).unwrap_err().to_string();
        assert!(e.contains("t.jsonl: line 3") && e.contains("step"), "{e}");
        assert!(next::<Route, _>(&mut r).unwrap().is_none());
    }
}
