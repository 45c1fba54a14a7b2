//! The input schema: one JSON object per prediction, checked field by field so
//! every error names the line and the field (`<stdin>: line 3: strategy.tp:
//! must be a positive integer, got 0`).
//!
//! ```text
//! {"id", "model": {"arch","layers","hidden","heads","kv_heads","ffn","vocab","seq",
//!   "params_b","head_dim","tie_embeddings","sliding_window","window_layers",
//!   "moe": null | {"experts","topk","expert_ffn","shared_experts","shared_ffn","moe_layers",
//!                  "expert_bias"}},
//!  "cluster": {"gpu","peak_tflops","gpus","gpus_per_node","hbm_gb","hbm_gbs",
//!   "intra_node_gbps","inter_node_gbps","gemm_eff","attn_tflops"},
//!  "strategy": {"tp","pp","dp","cp","ep","vpp","mbs","gbs","recompute","zero","sp",
//!   "flash_attn","overlap_grad_reduce","moe_imbalance","cp_comm"},
//!  "run": {"tokens","gpu_failure_rate_per_hour","node_failure_rate_per_hour",
//!   "ckpt_write_gbps","restart_s","ckpt_interval_s"}}
//! ```
//! Defaults are listed in [`DEFAULTS_HELP`].

use crate::cluster::{self, Cluster};
use ftk::model::{Attention, Mlp, ModelConfig, Moe};
use ftk::{Error, Result};
use mem_plan::memory::Recompute;
use serde_json::{Map, Value};
use std::cell::RefCell;

/// Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of Models", §3.3.4 and
/// Table 5): 419 unexpected interruptions in a 54-day snapshot of pre-training
/// on 16,384 H100 GPUs: 419 / (54 · 24 · 16384) per GPU-hour.
pub const LLAMA3_GPU_FAILURES_PER_HOUR: f64 = 419.0 / (54.0 * 24.0 * 16384.0);
/// Llama 3 §3.3.4: Tectonic "sustains 2 TB/s" (7 TB/s peak) for checkpoints.
pub const LLAMA3_CKPT_WRITE_GBS: f64 = 2000.0;
/// Narayanan et al. 2021 §5.10: the 1T model's 13.8 TB checkpoint was
/// written at 273 GB/s from 384 nodes (Selene, Lustre): 0.71 GB/s per node.
/// The per-node rate of the checkpoint model, fitted on that one report.
pub const MEGATRON_1T_CKPT_GBS_PER_NODE: f64 = 273.0 / 384.0;
/// Restart cost (detect, reschedule, reload, warm up): an assumption, not a
/// published number; override with run.restart_s.
pub const DEFAULT_RESTART_S: f64 = 600.0;
/// Bytes per parameter in a checkpoint: bf16 weights plus fp32 master
/// weights, Adam m and v (2 + 12). Narayanan et al. 2021 §5.10 report 13.8 TB
/// for the 1T model, i.e. 13.7 bytes per parameter.
pub const CKPT_BYTES_PER_PARAM: f64 = 14.0;

pub const DEFAULTS_HELP: &str = "\
Defaults: model.arch llama (SwiGLU; gpt = GELU MLP, learned positions, tied embeddings),
kv_heads = heads, head_dim = hidden/heads, ffn = 4·hidden for gpt; moe.expert_ffn = ffn,
shared_experts 0, moe_layers = layers (dense layers first), expert_bias false; sliding_window none
(tokens a windowed layer attends back), window_layers = layers when a window is given. cluster: every field from the
gpu preset, gpus = tp·pp·cp·dp, gpus_per_node 8. strategy: tp pp cp ep vpp mbs 1,
dp = gpus/(tp·pp·cp), gbs = mbs·dp, recompute selective, zero 1, sp = (tp > 1),
flash_attn true, overlap_grad_reduce true, moe_imbalance 0 (max_vio of route-hist),
cp_comm ring (K/V passed around the context-parallel ring under the attention; allgather =
Llama 3's all-gather of K/V before attention, exposed). cluster.attn_tflops: the preset's
flash-attention rate (H100: FlashAttention-2, 335), scaled with an overridden peak.
run: gpu_failure_rate_per_hour 1.97e-5 (Llama 3: 419 interruptions / 54 days / 16,384 GPUs),
node_failure_rate_per_hour 0, ckpt_write_gbps 2000 (Llama 3's Tectonic, GB/s aggregate),
restart_s 600 (assumed), ckpt_interval_s = Young/Daly optimum; null means the default.";

/// The keys each object of the schema takes.
pub const ROOT_KEYS: &[&str] = &[
    "id",
    "model",
    "cluster",
    "strategy",
    "run",
    "seq",
    // What the job ran under: DeepSpeed's pipeline and ZeRO-3 differ.
    "framework",
    // Annotations of measurement rows (calibrate's corpus), not used by the model.
    "measured",
    "source",
    "split",
    "confidence",
    "note",
    "notes",
    "regime",
];
pub const MODEL_KEYS: &[&str] = &[
    "arch",
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "ffn",
    "vocab",
    "seq",
    "params_b",
    "head_dim",
    "tie_embeddings",
    "moe",
    "name",
    "active_params_b",
    "mla",
    "sliding_window",
    "window_layers",
];
pub const MLA_KEYS: &[&str] = &[
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
];
pub const MOE_KEYS: &[&str] = &[
    "experts",
    "topk",
    "expert_ffn",
    "shared_experts",
    "shared_ffn",
    "moe_layers",
    "expert_bias",
];
pub const CLUSTER_KEYS: &[&str] = &[
    "gpu",
    "peak_tflops",
    "gpus",
    "gpus_per_node",
    "hbm_gb",
    "hbm_gbs",
    "intra_node_gbps",
    "inter_node_gbps",
    "nic_gbps_per_node",
    "gemm_eff",
    "attn_tflops",
    "power_w",
    "rated_power_w",
];
pub const STRATEGY_KEYS: &[&str] = &[
    "tp",
    "pp",
    "dp",
    "cp",
    "ep",
    "vpp",
    "mbs",
    "gbs",
    "recompute",
    "zero",
    "sp",
    "flash_attn",
    "attn_kernel",
    "overlap_grad_reduce",
    "moe_imbalance",
    "cp_comm",
    "overlap_param_gather",
    "tp_comm_overlap",
    "ep_comm_overlap",
    "etp",
    "moe_dispatcher",
    "moe_force_balance",
    "grad_accum",
    "precision",
    "fsdp_mixed_precision",
    "grad_reduce_dtype",
    "pp_schedule",
    "recompute_modules",
];
pub const RUN_KEYS: &[&str] = &[
    "tokens",
    "gpu_failure_rate_per_hour",
    "node_failure_rate_per_hour",
    "ckpt_write_gbps",
    "ckpt_gbps_per_node",
    "restart_s",
    "ckpt_interval_s",
];

pub use ftk::records::{
    AttnKernel, CpComm, MofaStrategy as Strategy, RecomputeModule, RecomputeModules,
};

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Run {
    pub tokens: Option<f64>,
    pub gpu_failure_rate_per_hour: f64,
    pub node_failure_rate_per_hour: f64,
    /// Filesystem cap on the aggregate checkpoint write rate, GB/s.
    pub ckpt_write_gbps: f64,
    /// What one node writes, GB/s (the checkpoint rate is
    /// min(nodes · this, ckpt_write_gbps)).
    pub ckpt_gbps_per_node: f64,
    pub restart_s: f64,
    pub ckpt_interval_s: Option<f64>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            tokens: None,
            gpu_failure_rate_per_hour: LLAMA3_GPU_FAILURES_PER_HOUR,
            node_failure_rate_per_hour: 0.0,
            ckpt_write_gbps: LLAMA3_CKPT_WRITE_GBS,
            ckpt_gbps_per_node: MEGATRON_1T_CKPT_GBS_PER_NODE,
            restart_s: DEFAULT_RESTART_S,
            ckpt_interval_s: None,
        }
    }
}

/// One fully specified prediction.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: Value,
    pub model: ModelConfig,
    pub seq: u64,
    pub cluster: Cluster,
    pub strategy: Strategy,
    pub run: Run,
    /// `model.moe.expert_bias`: the experts' linear layers carry biases
    /// (gpt-oss); Megatron-Core adds the second one outside the grouped GEMM.
    pub expert_bias: bool,
    /// `framework` names DeepSpeed: its engines accumulate gradients in a
    /// pass of their own below ZeRO 3 ([`unfused_grad_accum_bytes`], taken
    /// with the strategy's `zero` where it is used, since `tune` varies it).
    pub deepspeed: bool,
    /// `strategy.precision` is bf16 (else fp16).
    pub bf16: bool,
    /// `framework` names torchtitan: "selective" recompute is its op-level
    /// policy (`sac_op`, taken with the strategy's `recompute`).
    pub torchtitan: bool,
    /// The strategy fields given explicitly whose defaults follow the
    /// layout; `tune` keeps these and re-derives the others per candidate.
    pub given: Given,
    /// HBM bytes per logit (tokens × vocab/TP) that the loss's memory-bound
    /// passes move, forward and backward: see [`cross_entropy_bytes`].
    pub ce_bytes: (f64, f64),
    /// `model.sliding_window`/`window_layers`; a Hugging Face gpt-oss config
    /// alternates 128-token windowed and full layers (`layer_types`).
    pub window: Option<Window>,
}

/// Strategy fields whose defaults depend on the layout (pp, zero,
/// recompute) or the framework, as the job gave them (None: not given).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Given {
    pub overlap_grad_reduce: Option<bool>,
    pub overlap_param_gather: Option<bool>,
    /// From `fsdp_mixed_precision` (DEFAULT/FULL 4 bytes, PURE 2) or
    /// `grad_reduce_dtype` (fp32 4, bf16/fp16 2).
    pub grad_bytes: Option<f64>,
}

/// Whether the data-parallel reduction overlaps the backward by default.
/// DeepSpeed's PipelineEngine reduces gradients after the whole schedule
/// (TrainSchedule ends with ReduceTiedGrads, ReduceGrads, OptimizerStep),
/// so nothing overlaps there; Megatron and FSDP overlap.
pub fn default_overlap_grad_reduce(pp: u64, deepspeed: bool) -> bool {
    !(pp > 1 && deepspeed)
}

/// Set the strategy fields that follow its own pp, zero and recompute and
/// the framework: the given value where the job gave one, else the
/// documented default. The parser and `tune` (which varies the layout on a
/// copy of the base job) both go through here, so a candidate gets the
/// defaults a job with its layout would get.
pub fn apply_layout_defaults(st: &mut Strategy, given: &Given, deepspeed: bool, torchtitan: bool) {
    st.overlap_grad_reduce = given
        .overlap_grad_reduce
        .unwrap_or_else(|| default_overlap_grad_reduce(st.pp, deepspeed));
    st.overlap_param_gather = given.overlap_param_gather.unwrap_or(st.overlap_grad_reduce);
    st.grad_bytes = given
        .grad_bytes
        .unwrap_or_else(|| default_grad_bytes(st.zero, deepspeed));
    st.sac_op = st.recompute == Recompute::Selective && torchtitan;
    st.z3_rank_nic = st.zero == 3 && deepspeed;
}

/// `strategy.recompute_modules`: Megatron-Core's list of what selective
/// recompute re-runs (`TransformerConfig.recompute_modules`, default
/// `["core_attn"]`). It means something only under "selective" and only
/// for Megatron's per-module policy, so it is an error with another
/// `recompute` or under torchtitan's op-level policy.
pub fn recompute_modules_of(
    o: &Obj,
    recompute: Recompute,
    framework: Option<&str>,
) -> Result<Option<RecomputeModules>> {
    let key = "recompute_modules";
    let list = match o.get(key) {
        None => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(o.err(key, format!("must be a list of module names, got {v}"))),
    };
    let names: Vec<&str> = RecomputeModule::ALL.iter().map(|m| m.name()).collect();
    let mut set = RecomputeModules::default();
    for v in list {
        let Some(name) = v.as_str() else {
            return Err(o.err(key, format!("must be a list of module names, got {v}")));
        };
        let Some(m) = RecomputeModule::from_name(name) else {
            let hint = match crate::keys::suggest(name, &names) {
                Some(s) => format!("; did you mean '{s}'?"),
                None => format!("; known modules: {}", names.join(", ")),
            };
            return Err(o.err(key, format!("unknown module '{name}'{hint}")));
        };
        set = set.with(m);
    }
    if recompute != Recompute::Selective {
        return Err(o.err(
            key,
            format!("applies to recompute selective only, got recompute {recompute}"),
        ));
    }
    if framework_is(framework, "torchtitan") {
        return Err(o.err(
            key,
            "is Megatron-Core's; torchtitan's selective recompute is its op-level policy",
        ));
    }
    Ok(Some(set))
}

/// Whether the job's free-text `framework` names `name` (lower case), e.g.
/// "Megatron-DeepSpeed" names "deepspeed".
pub fn framework_is(framework: Option<&str>, name: &str) -> bool {
    framework.is_some_and(|f| f.to_ascii_lowercase().contains(name))
}

/// Bytes per logit of the loss's elementwise passes, forward and backward.
/// Megatron's vocab-parallel cross entropy (`tensor_parallel/cross_entropy.py`)
/// forward: cast to fp32 (read 2, write 4), max (4), subtract the max in
/// place (4 + 4), exp in place (4 + 4), sum (4), divide by the sum in place
/// (4 + 4): 38; backward: the softmax times the loss gradient in place
/// (4 + 4), the cast back to bf16 (4 + 2): 14. PyTorch's `cross_entropy` on
/// fp32-cast logits moves about as much. NeMo's and Megatron-Bridge's model
/// configs turn on `cross_entropy_loss_fusion` (the "native" jit-fused
/// `fused_cross_entropy.py`): the cast and max in one kernel (2 + 4), the
/// subtract and exp in one (4 + 4), the sum (4) and the divide (4 + 4): 26
/// forward, the same 14 backward. llm-foundry's MPT defaults to `loss_fn:
/// fused_crossentropy`, flash-attn's Triton kernels: the forward reads the
/// bf16 logits once (2), the backward reads them and writes their
/// gradient (2 + 2).
pub fn cross_entropy_bytes(framework: Option<&str>) -> (f64, f64) {
    if framework_is(framework, "llm-foundry") {
        (2.0, 4.0)
    } else if framework_is(framework, "nemo") {
        (26.0, 14.0)
    } else {
        (38.0, 14.0)
    }
}

/// Bytes per gradient element reduced across data parallel when nothing
/// says otherwise: Megatron reduces its fp32 main grads; ZeRO-3 (DeepSpeed,
/// FSDP) reduce-scatters in the 16-bit compute type, and DeepSpeed's engines
/// reduce in the training dtype at every stage (`communication_data_type`
/// defaults to fp16 / bf16 when enabled).
pub fn default_grad_bytes(zero: u64, deepspeed: bool) -> f64 {
    if zero == 3 || deepspeed {
        2.0
    } else {
        4.0
    }
}

/// Bytes per parameter and micro-batch that a DeepSpeed engine spends/// Bytes per parameter and micro-batch that a DeepSpeed engine spends
/// accumulating gradients outside the GEMM. Megatron-DeepSpeed computes
/// each weight gradient as a fresh tensor (`grad_output.t().matmul(input)`;
/// its `gradient_accumulation_fusion` branch, which writes into Megatron's
/// fp32 `main_grad`, is commented out, and the BigScience fork predates
/// it) and DeepSpeed keeps no `main_grad`, so autograd's `AccumulateGrad`
/// adds it into the 16-bit `.grad` (fp16: read 2 + 2, write 2). Under bf16
/// DeepSpeed's `BF16_Optimizer` also folds the 16-bit gradients into its
/// fp32 copies after every micro-batch's backward (`update_hp_grads` in the
/// pipeline engine's `_exec_backward_pass`: read 2, read and write 4 + 4).
/// ZeRO-3 reduce-scatters each micro-batch's gradients instead (zero3.rs).
/// Returns the bytes (0 where the GEMM's epilogue accumulates, as Megatron's
/// `gradient_accumulation_fusion` does) and whether the first micro-batch
/// pays them too (bf16's fp32 fold does; fp16's `.grad +=` has nothing to
/// add to yet).
pub fn unfused_grad_accum_bytes(deepspeed: bool, zero: u64, bf16: bool) -> (f64, bool) {
    match (deepspeed && zero < 3, bf16) {
        (false, _) => (0.0, false),
        // autograd keeps the first micro-batch's gradient as `.grad`
        (true, false) => (6.0, false),
        (true, true) => (10.0, true),
    }
}

/// `model.sliding_window` (tokens) and `model.window_layers` (how many of
/// the layers use it): `None` when no window is given.
pub fn sliding_window_of(o: &Obj, layers: u64) -> Result<Option<Window>> {
    let Some(tokens) = o.opt_u64("sliding_window")? else {
        if o.opt_u64("window_layers")?.is_some() {
            return Err(o.err(
                "window_layers",
                "needs model.sliding_window; add it or drop this field",
            ));
        }
        return Ok(None);
    };
    if tokens == 0 {
        return Err(o.err("sliding_window", "must be a positive integer, got 0"));
    }
    let n = o.pos("window_layers", Some(layers))?;
    if n > layers {
        return Err(o.err(
            "window_layers",
            format!("exceeds model.layers ({layers}), got {n}"),
        ));
    }
    Ok(Some(Window { tokens, layers: n }))
}

/// Sliding-window attention on some of the layers (Mistral, gpt-oss).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub tokens: u64,
    pub layers: u64,
}

/// A JSON object with the dotted path of its fields, for messages, and the
/// list the defaults it hands out are written to.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    here: &'a str,
    assumed: Option<&'a RefCell<Vec<String>>>,
}

impl<'a> Obj<'a> {
    pub fn new(map: &'a Map<String, Value>, path: &str, here: &'a str) -> Self {
        Obj {
            map,
            path: path.into(),
            here,
            assumed: None,
        }
    }

    /// Record the defaults taken for missing or null fields in `list`.
    pub fn recording(mut self, list: &'a RefCell<Vec<String>>) -> Self {
        self.assumed = Some(list);
        self
    }

    /// Note that `key` took the default `val` (cluster and strategy
    /// fields only: model defaults are the architecture's conventions).
    pub fn assume(&self, key: &str, val: impl std::fmt::Display) {
        let full = self.name(key);
        let tracked = ["cluster.", "strategy."]
            .iter()
            .any(|p| full.starts_with(p));
        if let (Some(a), true) = (self.assumed, tracked) {
            a.borrow_mut().push(format!("{full}={val}"));
        }
    }

    /// Reject keys outside `known` (a misspelt key would leave its default
    /// in place and change the answer without a word).
    pub fn check_keys(&self, known: &[&str]) -> Result<()> {
        for k in self.map.keys() {
            if !known.contains(&k.as_str()) {
                return Err(self.err(k, crate::keys::unknown(k, known)));
            }
        }
        Ok(())
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.into()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::input(format!("{}: {}: {msg}", self.here, self.name(key)))
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A non-negative integer; `None` when absent or null.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x)),
                None => match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Ok(Some(f as u64)),
                    _ => Err(self.err(key, format!("must be a non-negative integer, got {v}"))),
                },
            },
        }
    }

    /// A positive integer, with a default when absent.
    pub fn pos(&self, key: &str, default: Option<u64>) -> Result<u64> {
        let given = self.opt_u64(key)?;
        if let (None, Some(d)) = (given, default) {
            self.assume(key, d);
        }
        match given.or(default) {
            Some(0) => Err(self.err(key, "must be a positive integer, got 0")),
            Some(x) => Ok(x),
            None => Err(self.err(key, "missing (required)")),
        }
    }

    /// A finite number; `None` when absent or null.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(key, format!("must be a finite number, got {v}"))),
            },
        }
    }

    /// A number > 0 (or >= 0 with `zero_ok`), with a default.
    pub fn num(&self, key: &str, default: Option<f64>, zero_ok: bool) -> Result<f64> {
        let given = self.opt_f64(key)?;
        if let (None, Some(d)) = (given, default) {
            self.assume(key, d);
        }
        match given.or(default) {
            Some(x) if x > 0.0 || (zero_ok && x == 0.0) => Ok(x),
            Some(x) => Err(self.err(
                key,
                format!("must be {}, got {x}", if zero_ok { ">= 0" } else { "> 0" }),
            )),
            None => Err(self.err(key, "missing (required)")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("must be a string, got {v}"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("must be true or false, got {v}"))),
        }
    }

    /// A nested object; `None` when absent or null.
    pub fn obj(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Obj {
                map: m,
                path: self.name(key),
                here: self.here,
                assumed: self.assumed,
            })),
            Some(v) => Err(self.err(key, format!("must be an object, got {v}"))),
        }
    }
}

/// The model object of the schema as a [`ModelConfig`] (so parameter counts
/// and memory use mem-plan's code) plus the sequence length.
pub fn model_from_obj(o: &Obj) -> Result<(ModelConfig, Option<u64>)> {
    o.check_keys(MODEL_KEYS)?;
    let arch = o.opt_str("arch")?.unwrap_or("llama").to_string();
    let gpt = matches!(arch.as_str(), "gpt" | "gpt2" | "gpt3" | "bloom" | "opt");
    let layers = o.pos("layers", None)?;
    let hidden = o.pos("hidden", None)?;
    let heads = o.pos("heads", None)?;
    let kv_heads = o.pos("kv_heads", Some(heads))?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(o.err(
            "kv_heads",
            format!("must divide heads ({heads}), got {kv_heads}"),
        ));
    }
    let head_dim = o.pos("head_dim", Some((hidden / heads).max(1)))?;
    let ffn = o.pos("ffn", gpt.then_some(4 * hidden))?;
    let vocab = o.pos("vocab", None)?;
    let seq = o.opt_u64("seq")?;
    // The same ceilings as ftk's config.json reader: a corrupt size must be
    // refused here, before per-layer vectors and loops are sized by it.
    for (v, key, max) in [
        (layers, "layers", 1u64 << 16),
        (hidden, "hidden", 1 << 20),
        (heads, "heads", 1 << 16),
        (kv_heads, "kv_heads", 1 << 16),
        (head_dim, "head_dim", 1 << 16),
        (ffn, "ffn", 1 << 22),
        (vocab, "vocab", 1 << 32),
    ] {
        if v > max {
            return Err(o.err(key, format!("must be at most {max}, got {v}")));
        }
    }
    if seq == Some(0) {
        return Err(o.err("seq", "must be a positive integer, got 0"));
    }
    if let Some(p) = o.opt_f64("params_b")? {
        if p <= 0.0 {
            return Err(o.err("params_b", format!("must be > 0, got {p}")));
        }
    }
    let tie = o.opt_bool("tie_embeddings")?.unwrap_or(gpt);
    // Multi-head latent attention (DeepSeek-V2/V3): `heads` query heads.
    let attention = match o.obj("mla")? {
        None => Attention::Gqa {
            heads,
            kv_heads,
            head_dim,
        },
        Some(a) => {
            a.check_keys(MLA_KEYS)?;
            Attention::Mla {
                heads,
                q_lora_rank: a.opt_u64("q_lora_rank")?.filter(|&r| r > 0),
                kv_lora_rank: a.pos("kv_lora_rank", None)?,
                qk_nope_head_dim: a.pos("qk_head_dim", None)?,
                qk_rope_head_dim: a.pos("qk_rope_head_dim", None)?,
                v_head_dim: a.pos("v_head_dim", Some(head_dim))?,
            }
        }
    };
    let (moe, is_moe) = match o.obj("moe")? {
        None => (None, vec![false; layers as usize]),
        Some(m) => {
            m.check_keys(MOE_KEYS)?;
            let experts = m.pos("experts", None)?;
            let topk = m.pos("topk", None)?;
            if topk > experts {
                return Err(m.err("topk", format!("exceeds experts ({experts}), got {topk}")));
            }
            let expert_ffn = m.pos("expert_ffn", Some(ffn))?;
            let shared_experts = m.opt_u64("shared_experts")?.unwrap_or(0);
            let shared_ffn = m.pos("shared_ffn", Some(expert_ffn))?;
            let moe_layers = m.pos("moe_layers", Some(layers))?;
            if moe_layers > layers {
                return Err(m.err(
                    "moe_layers",
                    format!("exceeds model.layers ({layers}), got {moe_layers}"),
                ));
            }
            m.opt_bool("expert_bias")?;
            let first_dense = layers - moe_layers;
            (
                Some(Moe {
                    experts,
                    topk,
                    expert_ffn,
                    shared_experts,
                    shared_ffn,
                    shared_gate: false,
                    norm_topk_prob: true,
                }),
                (0..layers).map(|i| i >= first_dense).collect(),
            )
        }
    };
    Ok((
        ModelConfig {
            arch,
            hidden,
            layers,
            vocab,
            ffn,
            max_seq: seq,
            tie_embeddings: tie,
            attention,
            attention_bias: gpt,
            qk_norm: false,
            learned_positions: gpt,
            mlp: if gpt { Mlp::Gelu } else { Mlp::SwiGlu },
            moe,
            is_moe,
            mtp_layers: 0,
            torch_dtype: None,
        },
        seq,
    ))
}

pub fn cluster_from_obj(
    o: Option<&Obj>,
    fallback: Option<&Cluster>,
    here: &str,
) -> Result<Cluster> {
    let Some(o) = o else {
        return fallback.cloned().ok_or_else(|| {
            Error::input(format!(
                "{here}: cluster: missing; give a cluster object or --cluster NAME ({})",
                cluster::PRESETS.join(", ")
            ))
        });
    };
    o.check_keys(CLUSTER_KEYS)?;
    let name = o.opt_str("gpu")?;
    let base = match name {
        Some(n) => cluster::preset(n),
        None => fallback.cloned(),
    };
    if let (Some(n), None) = (name, &base) {
        // A GPU without a preset is fine when the figures it needs are given.
        let need = ["peak_tflops", "hbm_gb", "hbm_gbs", "intra_node_gbps"];
        let mut missing: Vec<&str> = need.iter().copied().filter(|k| !o.has(k)).collect();
        if !o.has("inter_node_gbps") && !o.has("nic_gbps_per_node") {
            missing.push("inter_node_gbps (or nic_gbps_per_node)");
        }
        if !missing.is_empty() {
            return Err(o.err(
                "gpu",
                format!(
                    "unknown GPU '{n}' and no {} given; use a preset ({}) or give those figures",
                    missing.join(", "),
                    cluster::PRESETS.join(", ")
                ),
            ));
        }
    }
    let b = base.as_ref();
    let gpn = o.pos("gpus_per_node", Some(b.map_or(8, |c| c.gpus_per_node)))?;
    // "8x400 Gb/s NICs per node" is 3200 Gb/s per node: / 8 bits / 8 GPUs
    // = 50 GB/s per GPU per direction.
    let inter = match (
        o.opt_f64("inter_node_gbps")?,
        o.opt_f64("nic_gbps_per_node")?,
    ) {
        // Both given: fine when they say the same.
        (Some(g), Some(n)) if (g - n / 8.0 / gpn as f64).abs() <= 0.01 * g.abs() => g,
        (Some(g), Some(n)) => {
            return Err(o.err(
                "nic_gbps_per_node",
                format!(
                    "{n} Gb/s per node is {} GB/s per GPU over {gpn} GPUs, but inter_node_gbps is {g}; give one of them",
                    n / 8.0 / gpn as f64
                ),
            ))
        }
        (None, Some(n)) if n > 0.0 => n / 8.0 / gpn as f64,
        (None, Some(n)) => return Err(o.err("nic_gbps_per_node", format!("must be > 0, got {n}"))),
        _ => o.num("inter_node_gbps", b.map(|c| c.inter_node_gbps), false)?,
    };
    let c = Cluster {
        gpu: b
            .filter(|_| name.is_none_or(|n| cluster::resolve(n).is_some()))
            .map(|c| c.gpu.clone())
            .or(name.map(str::to_string))
            .unwrap_or_else(|| "custom".into()),
        peak_tflops: o.num("peak_tflops", b.map(|c| c.peak_tflops), false)?,
        gpus: o.opt_u64("gpus")?.or(b.map(|c| c.gpus)).unwrap_or(0),
        gpus_per_node: gpn,
        hbm_gb: o.num("hbm_gb", b.map(|c| c.hbm_gb), false)?,
        hbm_gbs: o.num("hbm_gbs", b.map(|c| c.hbm_gbs), false)?,
        intra_node_gbps: o.num("intra_node_gbps", b.map(|c| c.intra_node_gbps), false)?,
        inter_node_gbps: inter,
        gemm_eff: o.num(
            "gemm_eff",
            Some(b.map_or(cluster::H100_GEMM_EFF, |c| c.gemm_eff)),
            false,
        )?,
        attn_tflops: 0.0,
        clock: 1.0,
    };
    let peak = c.peak_tflops;
    let c = Cluster {
        attn_tflops: o.num(
            "attn_tflops",
            Some(b.map_or(cluster::ATTN_PEAK_FRACTION * peak, |c| {
                // A preset's figure scales with an overridden peak.
                c.attn_tflops * peak / c.peak_tflops
            })),
            false,
        )?,
        ..c
    };
    if c.gemm_eff > 1.0 {
        return Err(o.err("gemm_eff", format!("must be in (0, 1], got {}", c.gemm_eff)));
    }
    // A power limit below the part's rating lowers the sustained clock.
    let clock = match o.opt_f64("power_w")? {
        None => {
            if o.has("rated_power_w") {
                return Err(o.err(
                    "rated_power_w",
                    "given without power_w; give power_w (the limit the GPUs ran at) or leave both out",
                ));
            }
            1.0
        }
        Some(w) if w <= 0.0 => return Err(o.err("power_w", format!("must be > 0, got {w}"))),
        Some(w) => {
            let rated = match (o.opt_f64("rated_power_w")?, cluster::rated_power_w(&c.gpu)) {
                (Some(r), _) if r > 0.0 => r,
                (Some(r), _) => return Err(o.err("rated_power_w", format!("must be > 0, got {r}"))),
                (None, Some(r)) => r,
                (None, None) => {
                    return Err(o.err(
                        "power_w",
                        "needs rated_power_w for a GPU without a preset; give the power its peak_tflops holds at",
                    ))
                }
            };
            cluster::power_clock(w, rated)
        }
    };
    Ok(Cluster { clock, ..c })
}

/// Strategy fields; `gpus` = 0 when the cluster does not say.
/// `framework` (the record's root field, e.g. "Megatron-DeepSpeed") picks
/// framework defaults where frameworks differ.
pub fn strategy_from_obj(
    o: &Obj,
    model: &ModelConfig,
    gpus: u64,
    framework: Option<&str>,
) -> Result<(Strategy, Given)> {
    o.check_keys(STRATEGY_KEYS)?;
    let tp = o.pos("tp", Some(1))?;
    let pp = o.pos("pp", Some(1))?;
    let cp = o.pos("cp", Some(1))?;
    let ep = o.pos("ep", Some(1))?;
    // An interleaved schedule named without its virtual stages gets 4 (the
    // largest Megatron's examples use), fewer when the layers run out;
    // otherwise Megatron's default, no interleaving.
    let interleaved = o
        .opt_str("pp_schedule")?
        .is_some_and(|p| p.to_ascii_lowercase().contains("interleav"));
    let vpp_default = if interleaved && o.opt_u64("vpp")?.is_none() {
        let pp = o.opt_u64("pp")?.unwrap_or(1).max(1);
        (1..=4u64)
            .rev()
            .find(|v| pp * v <= model.layers)
            .unwrap_or(1)
    } else {
        1
    };
    let vpp = o.pos("vpp", Some(vpp_default))?;
    let mbs = o.pos("mbs", Some(1))?;
    let mp = tp * pp * cp;
    let given_dp = o.opt_u64("dp")?;
    let dp = match (given_dp, gpus) {
        (Some(0), _) => return Err(o.err("dp", "must be a positive integer, got 0")),
        (Some(d), 0) => d,
        (Some(d), g) if d * mp == g => d,
        (Some(d), g) => {
            return Err(o.err(
                "dp",
                format!("tp·pp·cp·dp = {} but cluster.gpus = {g}", d * mp),
            ))
        }
        (None, 0) => 1,
        (None, g) if g.is_multiple_of(mp) => g / mp,
        (None, g) => {
            return Err(o.err(
                "tp",
                format!("tp·pp·cp = {mp} does not divide cluster.gpus = {g}"),
            ))
        }
    };
    if given_dp.is_none() {
        o.assume("dp", dp);
    }
    let gbs = o.pos("gbs", Some(mbs * dp))?;
    if !gbs.is_multiple_of(mbs * dp) {
        return Err(o.err(
            "gbs",
            format!("must be a multiple of mbs·dp = {}, got {gbs}", mbs * dp),
        ));
    }
    let recompute = match o.opt_str("recompute")?.unwrap_or_else(|| {
        o.assume("recompute", "selective");
        "selective"
    }) {
        "none" => Recompute::None,
        "selective" => Recompute::Selective,
        "full" => Recompute::Full,
        other => {
            return Err(o.err(
                "recompute",
                format!("must be none, selective or full, got '{other}'"),
            ))
        }
    };
    let recompute_modules = recompute_modules_of(o, recompute, framework)?;
    let zero = o.opt_u64("zero")?.unwrap_or_else(|| {
        o.assume("zero", 1);
        1
    });
    if zero > 3 {
        return Err(o.err("zero", format!("must be 0, 1, 2 or 3, got {zero}")));
    }
    let heads = model.heads();
    if !heads.is_multiple_of(tp) {
        return Err(o.err(
            "tp",
            format!("must divide the {heads} attention heads, got {tp}"),
        ));
    }
    let kv = model.kv_heads();
    if !(kv.is_multiple_of(tp) || tp.is_multiple_of(kv)) {
        return Err(o.err(
            "tp",
            format!("must divide or be a multiple of kv_heads ({kv}), got {tp}"),
        ));
    }
    if vpp > 1 && pp == 1 {
        return Err(o.err("vpp", "needs pp > 1 (interleaving splits a pipeline stage)"));
    }
    // Megatron may give the embedding and the loss a pipeline slot each
    // (--account-for-embedding/loss-in-pipeline-split).
    if pp * vpp > model.layers + 2 {
        return Err(o.err(
            "pp",
            format!(
                "pp·vpp = {} exceeds the model's {} layers (+2 for embedding and loss)",
                pp * vpp,
                model.layers
            ),
        ));
    }
    match &model.moe {
        Some(m) if !m.experts.is_multiple_of(ep) => {
            return Err(o.err(
                "ep",
                format!("must divide the {} experts, got {ep}", m.experts),
            ))
        }
        None if ep > 1 => return Err(o.err("ep", format!("is {ep} but the model has no experts"))),
        _ => {}
    }

    let sp = o.opt_bool("sp")?.unwrap_or_else(|| {
        o.assume("sp", tp > 1);
        tp > 1
    });
    let moe_imbalance = o.num("moe_imbalance", Some(0.0), true)?;
    let cp_comm = match o.opt_str("cp_comm")?.unwrap_or_else(|| {
        if cp > 1 {
            o.assume("cp_comm", "ring");
        }
        "ring"
    }) {
        "ring" => CpComm::Ring,
        "allgather" => CpComm::AllGather,
        other => {
            return Err(o.err(
                "cp_comm",
                format!("must be ring or allgather, got '{other}'"),
            ))
        }
    };
    let etp = o.opt_u64("etp")?.unwrap_or_else(|| {
        if model.moe.is_some() {
            o.assume("etp", tp);
        }
        tp
    });
    if etp == 0 || !tp.is_multiple_of(etp) {
        return Err(o.err(
            "etp",
            format!("must be a positive divisor of tp ({tp}), got {etp}"),
        ));
    }
    // Megatron-Core's parallel folding: expert groups (etp·ep ranks) form
    // inside the tp·cp·dp ranks of a pipeline stage.
    if !(tp * dp * cp).is_multiple_of(ep * etp) {
        return Err(o.err(
            "ep",
            format!(
                "ep·etp = {} must divide tp·cp·dp = {} (expert groups form inside a pipeline stage's ranks), got ep {ep}",
                ep * etp,
                tp * dp * cp
            ),
        ));
    }
    if let Some(ga) = o.opt_u64("grad_accum")? {
        if ga * mbs * dp != gbs {
            return Err(o.err(
                "grad_accum",
                format!(
                    "is {ga} but gbs/(mbs·dp) = {gbs}/({mbs}·{dp}) = {}",
                    gbs as f64 / (mbs * dp) as f64
                ),
            ));
        }
    }
    match o.opt_str("precision")? {
        None | Some("bf16" | "fp16") => {}
        Some(p) => {
            return Err(o.err(
                "precision",
                format!("must be bf16 or fp16 (FP8 is not modelled), got '{p}'"),
            ))
        }
    }
    // FSDP's DEFAULT/FULL mixed precision keeps fp32 for the reduction.
    let deepspeed = framework_is(framework, "deepspeed");
    let given_grad_bytes = match o.opt_str("fsdp_mixed_precision")? {
        None => None,
        Some("DEFAULT" | "FULL") => Some(4.0),
        Some("PURE") => Some(2.0),
        Some(other) => {
            return Err(o.err(
                "fsdp_mixed_precision",
                format!("must be DEFAULT, FULL or PURE, got '{other}'"),
            ))
        }
    };
    // The data-parallel reduction's type as the framework's own setting
    // names it (Megatron-Core `grad_reduce_in_fp32`, NeMo's distributed
    // Adam `grad_sync_dtype`): fp32 reduces 4 bytes, bf16/fp16 2.
    let given_grad_bytes = match (given_grad_bytes, o.opt_str("grad_reduce_dtype")?) {
        (g, None) => g,
        (g, Some(d)) => {
            let b = match d {
                "fp32" => 4.0,
                "bf16" | "fp16" => 2.0,
                other => {
                    return Err(o.err(
                        "grad_reduce_dtype",
                        format!("must be fp32, bf16 or fp16, got '{other}'"),
                    ))
                }
            };
            if g.is_some_and(|g| g != b) {
                return Err(o.err(
                    "grad_reduce_dtype",
                    format!("is {d} but fsdp_mixed_precision says otherwise; give one of them"),
                ));
            }
            Some(b)
        }
    };
    let deepep = o.opt_str("moe_dispatcher")? == Some("deepep");
    if let Some(d) = o.opt_str("moe_dispatcher")? {
        if !matches!(d, "alltoall" | "deepep" | "allgather") {
            return Err(o.err(
                "moe_dispatcher",
                format!("must be alltoall, deepep or allgather, got '{d}'"),
            ));
        }
    }
    o.opt_str("pp_schedule")?;
    o.opt_bool("moe_force_balance")?;
    let attn_kernel = match (o.opt_bool("flash_attn")?, o.opt_str("attn_kernel")?) {
        (Some(false), None | Some("none")) | (None, Some("none")) => AttnKernel::None,
        (Some(false), Some(k)) => {
            return Err(o.err("attn_kernel", format!("is '{k}' but flash_attn is false")))
        }
        (Some(true), Some("none")) => {
            return Err(o.err("attn_kernel", "is 'none' but flash_attn is true"))
        }
        (_, Some("fa1")) => AttnKernel::Fa1,
        (_, Some("fa2")) => AttnKernel::Fa2,
        (_, Some("fa3")) => AttnKernel::Fa3,
        (_, Some(other)) => {
            return Err(o.err(
                "attn_kernel",
                format!("must be none, fa1, fa2 or fa3, got '{other}'"),
            ))
        }
        (f, None) => {
            if f.is_none() {
                o.assume("attn_kernel", "fa2");
            }
            AttnKernel::Fa2
        }
    };
    let given = Given {
        overlap_grad_reduce: o.opt_bool("overlap_grad_reduce")?,
        overlap_param_gather: o.opt_bool("overlap_param_gather")?,
        grad_bytes: given_grad_bytes,
    };
    let mut st = Strategy {
        tp,
        pp,
        dp,
        cp,
        ep,
        vpp,
        mbs,
        gbs,
        recompute,
        zero,
        sp,
        flash_attn: attn_kernel != AttnKernel::None,
        attn_kernel,
        // The layout-dependent fields: set by apply_layout_defaults below.
        overlap_grad_reduce: false,
        overlap_param_gather: false,
        // Assumed below, after the overlap fields (the order `assumed` lists).
        tp_comm_overlap: false,
        ep_comm_overlap: false,
        etp,
        grad_bytes: 0.0,
        moe_imbalance,
        deepep,
        sac_op: false,
        z3_rank_nic: false,
        cp_comm,
        recompute_modules,
    };
    let torchtitan = framework_is(framework, "torchtitan");
    apply_layout_defaults(&mut st, &given, deepspeed, torchtitan);
    if given.overlap_grad_reduce.is_none() {
        o.assume("overlap_grad_reduce", st.overlap_grad_reduce);
    }
    if given.overlap_param_gather.is_none() {
        o.assume("overlap_param_gather", st.overlap_param_gather);
    }
    st.tp_comm_overlap = o.opt_bool("tp_comm_overlap")?.unwrap_or_else(|| {
        if tp > 1 {
            o.assume("tp_comm_overlap", false);
        }
        false
    });
    st.ep_comm_overlap = o.opt_bool("ep_comm_overlap")?.unwrap_or_else(|| {
        if ep > 1 {
            o.assume("ep_comm_overlap", false);
        }
        false
    });
    Ok((st, given))
}

pub fn run_from_obj(o: Option<&Obj>) -> Result<Run> {
    let d = Run::default();
    let Some(o) = o else { return Ok(d) };
    o.check_keys(RUN_KEYS)?;
    let tokens = match o.opt_f64("tokens")? {
        Some(t) if t > 0.0 => Some(t),
        Some(t) => return Err(o.err("tokens", format!("must be > 0, got {t}"))),
        None => None,
    };
    let interval = match o.opt_f64("ckpt_interval_s")? {
        Some(t) if t > 0.0 => Some(t),
        Some(t) => return Err(o.err("ckpt_interval_s", format!("must be > 0, got {t}"))),
        None => None,
    };
    Ok(Run {
        tokens,
        gpu_failure_rate_per_hour: o.num(
            "gpu_failure_rate_per_hour",
            Some(d.gpu_failure_rate_per_hour),
            true,
        )?,
        node_failure_rate_per_hour: o.num("node_failure_rate_per_hour", Some(0.0), true)?,
        ckpt_write_gbps: o.num("ckpt_write_gbps", Some(d.ckpt_write_gbps), false)?,
        ckpt_gbps_per_node: o.num("ckpt_gbps_per_node", Some(d.ckpt_gbps_per_node), false)?,
        restart_s: o.num("restart_s", Some(d.restart_s), true)?,
        ckpt_interval_s: interval,
    })
}

/// Defaults that flags supply to records lacking a model or cluster.
#[derive(Default)]
pub struct Fallback {
    pub model: Option<ModelConfig>,
    pub seq: Option<u64>,
    pub cluster: Option<Cluster>,
}

/// Build a job from one record. `here` prefixes every message.
pub fn job_from_value(v: &Value, fb: &Fallback, here: &str) -> Result<Job> {
    job_and_assumed(v, fb, here).map(|(j, _)| j)
}

/// A job and the defaults it took for missing or null cluster, strategy
/// and run fields (`strategy.mbs=1`, `cluster.hbm_gbs=3350`, ...).
pub fn job_and_assumed(v: &Value, fb: &Fallback, here: &str) -> Result<(Job, Vec<String>)> {
    let Value::Object(map) = v else {
        return Err(Error::input(format!("{here}: expected a JSON object")));
    };
    let assumed = RefCell::new(vec![]);
    let root = Obj::new(map, "", here).recording(&assumed);
    root.check_keys(ROOT_KEYS)?;
    let (model, seq) = match root.obj("model")? {
        Some(m) => model_from_obj(&m)?,
        None => match &fb.model {
            Some(m) => (m.clone(), None),
            None => {
                return Err(root.err(
                    "model",
                    "missing; give a model object or --model config.json",
                ))
            }
        },
    };
    let seq = match seq.or(root.opt_u64("seq")?).or(fb.seq) {
        Some(s) if s > 0 => s,
        _ => return Err(root.err("model.seq", "missing; give model.seq or --seq")),
    };
    let empty = Map::new();
    let cluster_obj = match root.obj("cluster")? {
        // Flags' cluster: its preset figures are defaults like any other.
        None if fb.cluster.is_some() => Some(Obj {
            map: &empty,
            path: "cluster".into(),
            here,
            assumed: Some(&assumed),
        }),
        o => o,
    };
    let mut cluster = cluster_from_obj(cluster_obj.as_ref(), fb.cluster.as_ref(), here)?;
    let (strategy, given) = match root.obj("strategy")? {
        Some(s) => strategy_from_obj(&s, &model, cluster.gpus, root.opt_str("framework")?)?,
        None => return Err(root.err("strategy", "missing; give a strategy object or --strategy")),
    };
    if !seq.is_multiple_of(strategy.cp) {
        return Err(root.err(
            "strategy.cp",
            format!("must divide the sequence length {seq}, got {}", strategy.cp),
        ));
    }
    let world = strategy.tp * strategy.pp * strategy.cp * strategy.dp;
    if cluster.gpus == 0 {
        cluster.gpus = world;
        root.assume("cluster.gpus", world);
    }
    let run = run_from_obj(root.obj("run")?.as_ref())?;
    let expert_bias = match root.obj("model")? {
        Some(m) => match m.obj("moe")? {
            Some(e) => e.opt_bool("expert_bias")?.unwrap_or(false),
            None => false,
        },
        // A Hugging Face gpt-oss config: its experts always carry biases
        // (`GptOssExperts.gate_up_proj_bias`, `down_proj_bias`).
        None => model.moe.is_some() && model.arch == "gpt_oss",
    };
    let window = match root.obj("model")? {
        Some(m) => sliding_window_of(&m, model.layers)?,
        // gpt-oss's configs: `sliding_window` 128 on every other layer
        // (`layer_types` alternates sliding_attention and full_attention).
        None if model.arch == "gpt_oss" => Some(Window {
            tokens: 128,
            layers: model.layers / 2,
        }),
        None => None,
    };
    let bf16 = root
        .obj("strategy")?
        .map(|s| s.opt_str("precision"))
        .transpose()?
        .flatten()
        == Some("bf16");
    let job = Job {
        id: map.get("id").cloned().unwrap_or(Value::Null),
        model,
        seq,
        cluster,
        strategy,
        run,
        expert_bias,
        deepspeed: framework_is(root.opt_str("framework")?, "deepspeed"),
        bf16,
        torchtitan: framework_is(root.opt_str("framework")?, "torchtitan"),
        given,
        ce_bytes: cross_entropy_bytes(root.opt_str("framework")?),
        window,
    };
    Ok((job, assumed.into_inner()))
}

/// `tp=8,pp=4,recompute=full,sp=true` as a JSON object (numbers, booleans,
/// strings by content).
pub fn parse_kv(s: &str, what: &str) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(Error::input(format!(
                "{what}: expected key=value, got '{part}' (e.g. tp=8,pp=4,dp=32,mbs=1,gbs=1024)"
            )));
        };
        let v = v.trim();
        let val = if let Ok(n) = v.parse::<u64>() {
            Value::from(n)
        } else if let Ok(b) = v.parse::<bool>() {
            Value::Bool(b)
        } else if let Ok(f) = v.parse::<f64>() {
            if !f.is_finite() {
                return Err(Error::input(format!(
                    "{what}: {k}: must be finite, got {v}"
                )));
            }
            Value::from(f)
        } else {
            Value::String(v.to_string())
        };
        m.insert(k.trim().to_string(), val);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(v: Value) -> Result<Job> {
        job_from_value(&v, &Fallback::default(), "t: line 1")
    }

    #[test]
    fn a_gpt_oss_config_brings_expert_biases() {
        let cfg = |t: &str| {
            let text = format!(
                r#"{{"model_type":"{t}","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
                "num_key_value_heads":2,"head_dim":16,"intermediate_size":64,"vocab_size":128,
                "num_local_experts":8,"num_experts_per_tok":2}}"#
            );
            ModelConfig::from_json_str(&text, "config.json").unwrap()
        };
        let v = json!({"strategy":{"tp":1,"ep":2},"cluster":{"gpu":"H100","gpus":2}});
        for (t, want) in [("gpt_oss", true), ("mixtral", false)] {
            let fb = Fallback {
                model: Some(cfg(t)),
                seq: Some(64),
                cluster: None,
            };
            let j = job_from_value(&v, &fb, "t").unwrap();
            assert!(j.model.moe.is_some(), "{t}");
            assert_eq!(j.expert_bias, want, "{t}");
            let w = want.then_some(Window {
                tokens: 128,
                layers: 1,
            });
            assert_eq!(j.window, w, "{t}");
        }
    }

    fn base() -> Value {
        json!({"id": "x",
            "model": {"arch":"gpt","layers":24,"hidden":2304,"heads":24,"vocab":51200,"seq":2048},
            "cluster": {"gpu":"A100-80GB","gpus":32},
            "strategy": {"tp":1,"pp":1,"mbs":1,"gbs":512,"recompute":"full","zero":0}})
    }

    #[test]
    fn defaults_fill_in() {
        let j = job(base()).unwrap();
        assert_eq!(j.strategy.dp, 32);
        assert!(!j.strategy.sp);
        assert_eq!(j.model.ffn, 4 * 2304);
        assert_eq!(j.run, Run::default());
        // Llama 3: 419 / (54 days · 24 h · 16384 GPUs) ≈ 1.973e-5 per GPU-hour.
        assert!((LLAMA3_GPU_FAILURES_PER_HOUR - 1.9733e-5).abs() < 1e-8);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            (
                "/strategy/tp",
                json!(0),
                "strategy.tp: must be a positive integer, got 0",
            ),
            (
                "/strategy/tp",
                json!(5),
                "strategy.tp: tp·pp·cp = 5 does not divide cluster.gpus = 32",
            ),
            (
                "/strategy/gbs",
                json!(100),
                "strategy.gbs: must be a multiple of mbs·dp = 32",
            ),
            (
                "/strategy/recompute",
                json!("some"),
                "strategy.recompute: must be none",
            ),
            ("/cluster/gpus", json!(0), "strategy.tp"),
            (
                "/model/hidden",
                json!(-4),
                "model.hidden: must be a non-negative integer",
            ),
            (
                "/model/heads",
                json!(2.5),
                "model.heads: must be a non-negative integer",
            ),
            ("/cluster/gpu", json!("TPUv9"), "cluster.gpu: unknown GPU"),
            ("/cluster/hbm_gb", json!(0), "cluster.hbm_gb: must be > 0"),
            (
                "/strategy/zero",
                json!(4),
                "strategy.zero: must be 0, 1, 2 or 3",
            ),
            (
                "/strategy/ep",
                json!(2),
                "strategy.ep: is 2 but the model has no experts",
            ),
        ];
        for (ptr, val, want) in cases {
            let mut v = base();
            let (parent, key) = ptr.rsplit_once('/').unwrap();
            v.pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("{ptr}"))
                .insert(key.to_string(), val);
            if ptr == "/cluster/gpus" {
                // gpus 0 means "derive", so this one must succeed.
                assert!(job(v).is_ok());
                continue;
            }
            let e = job(v).unwrap_err().to_string();
            assert!(e.starts_with("t: line 1: "), "{e}");
            assert!(e.contains(want), "{ptr}: {e}");
        }
        let mut v = base();
        v["model"].as_object_mut().unwrap().remove("vocab");
        assert!(job(v)
            .unwrap_err()
            .to_string()
            .contains("model.vocab: missing"));
    }

    #[test]
    fn sliding_window_fields_and_their_checks() {
        assert_eq!(job(base()).unwrap().window, None);
        let mut v = base();
        v["model"]["sliding_window"] = json!(128);
        let j = job(v.clone()).unwrap();
        assert_eq!(
            j.window,
            Some(Window {
                tokens: 128,
                layers: 24
            })
        );
        v["model"]["window_layers"] = json!(12);
        assert_eq!(job(v.clone()).unwrap().window.unwrap().layers, 12);
        for (field, val, want) in [
            (
                "window_layers",
                json!(25),
                "model.window_layers: exceeds model.layers (24)",
            ),
            (
                "sliding_window",
                json!(0),
                "model.sliding_window: must be a positive integer",
            ),
        ] {
            let mut w = v.clone();
            w["model"][field] = val;
            let e = job(w).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut w = base();
        w["model"]["window_layers"] = json!(12);
        let e = job(w).unwrap_err().to_string();
        assert!(e.contains("needs model.sliding_window"), "{e}");
    }

    #[test]
    fn recompute_modules_are_checked_by_name_and_context() {
        let mut v = base();
        v["strategy"]["recompute"] = json!("selective");
        v["strategy"]["recompute_modules"] = json!(["layernorm", "moe"]);
        let st = job(v.clone()).unwrap().strategy;
        let rm = st.recompute_modules.unwrap();
        assert!(rm.has(RecomputeModule::Layernorm) && rm.has(RecomputeModule::Moe));
        assert!(!rm.has(RecomputeModule::CoreAttn));
        // Not given: None, Megatron's default ["core_attn"] in the time model.
        let mut d = v.clone();
        d["strategy"]
            .as_object_mut()
            .unwrap()
            .remove("recompute_modules");
        assert_eq!(job(d).unwrap().strategy.recompute_modules, None);
        for (val, rc, fw, want) in [
            (
                json!(["moe_ac"]),
                "selective",
                None,
                "strategy.recompute_modules: unknown module 'moe_ac'; did you mean 'moe_act'?",
            ),
            (
                json!(["banana"]),
                "selective",
                None,
                "known modules: core_attn, moe_act, layernorm",
            ),
            (json!("moe"), "selective", None, "must be a list of module names"),
            (json!([1]), "selective", None, "must be a list of module names"),
            (
                json!(["moe"]),
                "full",
                None,
                "strategy.recompute_modules: applies to recompute selective only, got recompute full",
            ),
            (json!(["moe"]), "selective", Some("torchtitan"), "op-level policy"),
        ] {
            let mut w = v.clone();
            w["strategy"]["recompute_modules"] = val;
            w["strategy"]["recompute"] = json!(rc);
            if let Some(f) = fw {
                w["framework"] = json!(f);
            }
            let e = job(w).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn framework_defaults_corpus_fields_and_their_checks() {
        // DeepSpeed's pipeline engine reduces gradients after the schedule.
        let mut v = base();
        v["strategy"]["pp"] = json!(2);
        v["strategy"]["gbs"] = json!(512);
        v["strategy"].as_object_mut().unwrap().remove("zero");
        let (j, a) = job_and_assumed(&v, &Fallback::default(), "t").unwrap();
        assert!(j.strategy.overlap_grad_reduce);
        assert!(a.contains(&"strategy.overlap_grad_reduce=true".to_string()));
        v["framework"] = json!("Megatron-DeepSpeed");
        let (j, a) = job_and_assumed(&v, &Fallback::default(), "t").unwrap();
        assert!(!j.strategy.overlap_grad_reduce);
        assert!(a.contains(&"strategy.overlap_grad_reduce=false".to_string()));
        // An interleaved schedule without its virtual stages: 4 of them.
        let mut w = v.clone();
        w["strategy"]["pp_schedule"] = json!("interleaved 1F1B");
        let (j, a) = job_and_assumed(&w, &Fallback::default(), "t").unwrap();
        assert_eq!(j.strategy.vpp, 4);
        assert!(a.contains(&"strategy.vpp=4".to_string()));
        w["strategy"]["pp_schedule"] = json!("1f1b");
        assert_eq!(job(w).unwrap().strategy.vpp, 1);
        // grad_accum must agree with gbs/(mbs·dp): 512/(1·16) = 32.
        v["strategy"]["grad_accum"] = json!(32);
        assert!(job(v.clone()).is_ok());
        v["strategy"]["grad_accum"] = json!(8);
        assert!(job(v.clone())
            .unwrap_err()
            .to_string()
            .contains("strategy.grad_accum: is 8"));
        // FSDP mixed precision sets the gradient bytes; ZeRO-3 reduces in 16 bits.
        let mut z = base();
        z["strategy"]["zero"] = json!(3);
        assert_eq!(job(z.clone()).unwrap().strategy.grad_bytes, 2.0);
        z["strategy"]["fsdp_mixed_precision"] = json!("DEFAULT");
        assert_eq!(job(z.clone()).unwrap().strategy.grad_bytes, 4.0);
        // The framework's reduction type, when the row states it.
        let mut g = base();
        assert_eq!(job(g.clone()).unwrap().strategy.grad_bytes, 4.0);
        g["strategy"]["grad_reduce_dtype"] = json!("bf16");
        assert_eq!(job(g.clone()).unwrap().strategy.grad_bytes, 2.0);
        g["strategy"]["grad_reduce_dtype"] = json!("int8");
        assert!(job(g.clone())
            .unwrap_err()
            .to_string()
            .contains("strategy.grad_reduce_dtype: must be fp32, bf16 or fp16"));
        g["strategy"]["grad_reduce_dtype"] = json!("bf16");
        g["strategy"]["fsdp_mixed_precision"] = json!("FULL");
        assert!(job(g.clone())
            .unwrap_err()
            .to_string()
            .contains("give one of them"));
        g["strategy"]["fsdp_mixed_precision"] = json!("PURE");
        assert_eq!(job(g).unwrap().strategy.grad_bytes, 2.0);
        z["strategy"]["precision"] = json!("fp8");
        assert!(job(z)
            .unwrap_err()
            .to_string()
            .contains("FP8 is not modelled"));
        // inter_node_gbps and nic_gbps_per_node: both fine when they agree.
        let mut c = base();
        c["cluster"]["inter_node_gbps"] = json!(50);
        c["cluster"]["nic_gbps_per_node"] = json!(3200);
        assert_eq!(job(c.clone()).unwrap().cluster.inter_node_gbps, 50.0);
        c["cluster"]["nic_gbps_per_node"] = json!(1600);
        assert!(job(c).unwrap_err().to_string().contains("give one of them"));
    }

    #[test]
    fn a_power_limit_lowers_the_clock_by_its_cube_root() {
        let mut v = base();
        v["cluster"]["gpu"] = json!("H100");
        assert_eq!(job(v.clone()).unwrap().cluster.clock, 1.0);
        v["cluster"]["power_w"] = json!(350);
        let c = job(v.clone()).unwrap().cluster.clock;
        assert!((c - 0.5f64.cbrt()).abs() < 1e-12, "{c}");
        // Above the rating: the rated clock, not more.
        v["cluster"]["power_w"] = json!(900);
        assert_eq!(job(v.clone()).unwrap().cluster.clock, 1.0);
        // A GPU without a preset needs the power its peak holds at.
        let mut g = v.clone();
        g["cluster"] = json!({"gpu":"X1","peak_tflops":500,"hbm_gb":64,"hbm_gbs":2000,
            "intra_node_gbps":100,"inter_node_gbps":25,"gpus":8,"power_w":300});
        let e = job(g.clone()).unwrap_err().to_string();
        assert!(e.contains("rated_power_w"), "{e}");
        g["cluster"]["rated_power_w"] = json!(600);
        assert!((job(g).unwrap().cluster.clock - 0.5f64.cbrt()).abs() < 1e-12);
        v["cluster"].as_object_mut().unwrap().remove("power_w");
        v["cluster"]["rated_power_w"] = json!(700);
        assert!(job(v).is_err());
        // The A100 PCIe assumption (0.9 at 250-300 W against 400 W) is what
        // the cube law gives at 275 W.
        assert!(
            (crate::cluster::power_clock(275.0, 400.0) - crate::cluster::PCIE_CLOCK).abs() < 0.02
        );
    }

    #[test]
    fn mla_and_expert_folding() {
        // DeepSeek-V3's attention as the corpus writes it.
        let v = json!({"model":{"arch":"llama","layers":61,"hidden":7168,"heads":128,"head_dim":128,"ffn":18432,
            "vocab":129280,"seq":4096,"mla":{"q_lora_rank":1536,"kv_lora_rank":512,"qk_head_dim":128,
            "qk_rope_head_dim":64,"v_head_dim":128},"moe":{"experts":256,"topk":8,"expert_ffn":2048,
            "shared_experts":1,"shared_ffn":2048,"moe_layers":58}},
            "cluster":{"gpu":"H100","gpus":512},
            "strategy":{"tp":2,"pp":8,"dp":32,"ep":64,"etp":1,"mbs":1,"gbs":4096}});
        let j = job(v.clone()).unwrap();
        assert!(matches!(
            j.model.attention,
            Attention::Mla {
                heads: 128,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128
            }
        ));
        // 671B total parameters (DeepSeek-V3's published count, without MTP).
        let p = j.model.total_params() as f64 / 1e9;
        assert!((p - 671.0).abs() < 10.0, "{p}");
        // Expert groups (etp·ep = 64) fold into a stage's tp·dp = 64 ranks;
        // 128 do not.
        let mut bad = v;
        bad["strategy"]["ep"] = json!(128);
        assert!(job(bad)
            .unwrap_err()
            .to_string()
            .contains("strategy.ep: ep·etp = 128"));
    }

    #[test]
    fn kv_strings_parse() {
        let m = parse_kv(
            "tp=8, pp=4,recompute=full,sp=true,moe_imbalance=0.5",
            "--strategy",
        )
        .unwrap();
        assert_eq!(m["tp"], json!(8));
        assert_eq!(m["sp"], json!(true));
        assert_eq!(m["recompute"], json!("full"));
        assert_eq!(m["moe_imbalance"], json!(0.5));
        assert!(parse_kv("tp8", "--strategy").is_err());
        assert!(parse_kv("tp=NaN", "--strategy").is_err());
    }
}
