//! Model shapes from Hugging Face `config.json` (Mixtral, Qwen2-MoE, Qwen3-MoE,
//! DeepSeek-V2/V3, Llama, GPT-2) or ftk's own small JSON with the same keys,
//! normalised into one [`ModelConfig`] with parameter counts per module.
//!
//! Conventions taken from the transformers modeling code of each family:
//! - Mixtral: every layer is MoE; `num_local_experts`, expert FFN =
//!   `intermediate_size`; softmax router, top-k renormalised.
//! - Qwen2-MoE / Qwen3-MoE: `num_experts`, `moe_intermediate_size`; layer i is
//!   sparse when it is not in `mlp_only_layers` and `(i+1) % decoder_sparse_step == 0`;
//!   Qwen2-MoE adds one shared expert of `shared_expert_intermediate_size`
//!   with a sigmoid gate (h -> 1). Qwen2 attention has q/k/v biases, Qwen3 has
//!   per-head q/k RMSNorm instead.
//! - DeepSeek-V2/V3: `n_routed_experts`, `n_shared_experts` (each of
//!   `moe_intermediate_size`), the first `first_k_dense_replace` layers dense,
//!   then MoE every `moe_layer_freq`; MLA attention (`q_lora_rank` may be null,
//!   `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`).
//! - GPT-2: `n_embd`, `n_layer`, `n_head`, `n_inner` (null = 4h), learned
//!   positions, GELU MLP with biases, tied embeddings.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The raw keys ftk reads; every key is optional and unknown keys are ignored.
#[derive(Debug, Default, Deserialize)]
struct Raw {
    model_type: Option<String>,
    #[serde(alias = "n_embd", alias = "d_model")]
    hidden_size: Option<u64>,
    #[serde(alias = "n_layer")]
    num_hidden_layers: Option<u64>,
    #[serde(alias = "n_head")]
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<u64>,
    vocab_size: Option<u64>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: Option<u64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    torch_dtype: Option<String>,
    // MoE
    #[serde(alias = "num_local_experts", alias = "n_routed_experts")]
    num_experts: Option<u64>,
    num_experts_per_tok: Option<u64>,
    moe_intermediate_size: Option<u64>,
    shared_expert_intermediate_size: Option<u64>,
    n_shared_experts: Option<u64>,
    first_k_dense_replace: Option<u64>,
    moe_layer_freq: Option<u64>,
    decoder_sparse_step: Option<u64>,
    mlp_only_layers: Option<Vec<u64>>,
    norm_topk_prob: Option<bool>,
    // MLA
    q_lora_rank: Option<u64>,
    kv_lora_rank: Option<u64>,
    qk_nope_head_dim: Option<u64>,
    qk_rope_head_dim: Option<u64>,
    v_head_dim: Option<u64>,
    num_nextn_predict_layers: Option<u64>,
}

/// Attention flavour and the sizes its parameter and activation counts need.
#[derive(Debug, Clone, PartialEq)]
pub enum Attention {
    /// Multi-head / grouped-query attention.
    Gqa {
        heads: u64,
        kv_heads: u64,
        head_dim: u64,
    },
    /// DeepSeek multi-head latent attention.
    Mla {
        heads: u64,
        q_lora_rank: Option<u64>,
        kv_lora_rank: u64,
        qk_nope_head_dim: u64,
        qk_rope_head_dim: u64,
        v_head_dim: u64,
    },
}

/// The MoE part of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    /// Routed experts per MoE layer (e_n in MemFine's notation).
    pub experts: u64,
    /// Experts per token (t_k).
    pub topk: u64,
    /// Intermediate size of one routed expert (g_e).
    pub expert_ffn: u64,
    /// Number of shared experts (always active).
    pub shared_experts: u64,
    /// Intermediate size of one shared expert.
    pub shared_ffn: u64,
    /// Qwen2-MoE's scalar sigmoid gate on the shared expert.
    pub shared_gate: bool,
    /// Renormalise the top-k routing weights (Mixtral: yes; Qwen2-MoE: no).
    pub norm_topk_prob: bool,
}

/// Dense MLP flavour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mlp {
    /// gate/up/down projections without biases (Llama, Mixtral, Qwen, DeepSeek).
    SwiGlu,
    /// fc + proj with biases, GELU (GPT-2).
    Gelu,
}

/// A normalised model description.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub hidden: u64,
    pub layers: u64,
    pub vocab: u64,
    /// Dense FFN intermediate size (g_d).
    pub ffn: u64,
    pub max_seq: Option<u64>,
    pub tie_embeddings: bool,
    pub attention: Attention,
    pub attention_bias: bool,
    pub qk_norm: bool,
    pub learned_positions: bool,
    pub mlp: Mlp,
    pub moe: Option<Moe>,
    /// `is_moe[i]`: layer i has a sparse MoE block.
    pub is_moe: Vec<bool>,
    /// Extra multi-token-prediction layers shipped with the checkpoint (DeepSeek-V3).
    pub mtp_layers: u64,
    pub torch_dtype: Option<String>,
}

fn need(v: Option<u64>, key: &str, src: &str) -> Result<u64> {
    match v {
        Some(0) => Err(Error::input(format!("{src}: field '{key}' must be positive, got 0"))),
        Some(x) => Ok(x),
        None => Err(Error::input(format!(
            "{src}: missing field '{key}' (a Hugging Face config.json or ftk model JSON is expected)"
        ))),
    }
}

/// Sizes beyond these are corrupt configs, not models: refusing them keeps
/// every parameter and memory count far inside 64-bit arithmetic.
fn check_bounds(r: &Raw, src: &str) -> Result<()> {
    let limits: [(Option<u64>, &str, u64); 18] = [
        (r.q_lora_rank, "q_lora_rank", 1 << 20),
        (r.qk_nope_head_dim, "qk_nope_head_dim", 1 << 16),
        (r.qk_rope_head_dim, "qk_rope_head_dim", 1 << 16),
        (r.v_head_dim, "v_head_dim", 1 << 16),
        (
            r.max_position_embeddings,
            "max_position_embeddings",
            1 << 32,
        ),
        (
            r.num_nextn_predict_layers,
            "num_nextn_predict_layers",
            1 << 16,
        ),
        (r.hidden_size, "hidden_size", 1 << 20),
        (r.num_hidden_layers, "num_hidden_layers", 1 << 16),
        (r.num_attention_heads, "num_attention_heads", 1 << 16),
        (r.num_key_value_heads, "num_key_value_heads", 1 << 16),
        (r.head_dim, "head_dim", 1 << 16),
        (r.intermediate_size, "intermediate_size", 1 << 22),
        (r.vocab_size, "vocab_size", 1 << 32),
        (r.num_experts, "num_experts", 1 << 20),
        (r.moe_intermediate_size, "moe_intermediate_size", 1 << 22),
        (
            r.shared_expert_intermediate_size,
            "shared_expert_intermediate_size",
            1 << 22,
        ),
        (r.n_shared_experts, "n_shared_experts", 1 << 16),
        (r.kv_lora_rank, "kv_lora_rank", 1 << 20),
    ];
    for (v, name, max) in limits {
        if let Some(v) = v {
            if v > max {
                return Err(Error::input(format!(
                    "{src}: {name} is {v}, beyond the {max} ftk accepts (a corrupt config?)"
                )));
            }
        }
    }
    // Every layer's dense and expert weights, in f64: far below 2^64 when it
    // passes, so the exact u64 counts cannot overflow.
    let f = |v: Option<u64>| v.unwrap_or(0) as f64;
    let h = f(r.hidden_size);
    let ffn = f(r.intermediate_size).max(4.0 * h);
    let experts = f(r.num_experts) + f(r.n_shared_experts) + 1.0;
    // Attention with every head size and rank at its largest reading.
    let heads = f(r.num_attention_heads).max(1.0);
    let head = f(r.head_dim)
        .max(f(r.qk_nope_head_dim) + f(r.qk_rope_head_dim))
        .max(f(r.v_head_dim))
        .max(1.0);
    let rank = f(r.q_lora_rank).max(f(r.kv_lora_rank)).max(h);
    let attention = 4.0 * rank * heads * head + 4.0 * h * h;
    let per_layer = attention + 3.0 * h * f(r.moe_intermediate_size).max(ffn) * experts;
    let total = (f(r.num_hidden_layers) + f(r.num_nextn_predict_layers)) * per_layer
        + 2.0 * (f(r.vocab_size) + f(r.max_position_embeddings)) * h;
    if total > 1e16 {
        return Err(Error::input(format!(
            "{src}: the shape gives about {total:.1e} parameters, beyond the 1e16 ftk accepts (a corrupt config?)"
        )));
    }
    Ok(())
}

/// The config file a `--model` argument names: the path itself, or
/// `config.json` inside a Hugging Face model directory.
pub fn config_path(path: &Path) -> Result<std::path::PathBuf> {
    if path.is_dir() {
        let p = path.join("config.json");
        if !p.is_file() {
            return Err(Error::input(format!(
                "{}: a model directory needs a config.json (Hugging Face layout); give the directory that holds it or the file itself",
                path.display()
            )));
        }
        return Ok(p);
    }
    Ok(path.to_path_buf())
}

impl ModelConfig {
    /// Read and normalise a config file, or a model directory's config.json.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let path = config_path(path)?;
        let text = crate::io::read_text(&path)?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse config text; `src` names it in errors.
    pub fn from_json_str(text: &str, src: &str) -> Result<ModelConfig> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| Error::input(format!("{src}: not a valid model config: {e}")))?;
        Self::from_raw(raw, src)
    }

    fn from_raw(r: Raw, src: &str) -> Result<ModelConfig> {
        check_bounds(&r, src)?;
        let arch = r.model_type.clone().unwrap_or_else(|| "custom".into());
        let hidden = need(r.hidden_size, "hidden_size", src)?;
        let layers = need(r.num_hidden_layers, "num_hidden_layers", src)?;
        let heads = need(r.num_attention_heads, "num_attention_heads", src)?;
        let vocab = need(r.vocab_size, "vocab_size", src)?;
        let is_gpt2 = arch == "gpt2";
        let ffn = match r.intermediate_size {
            Some(x) => x,
            None if is_gpt2 => 4 * hidden,
            None => need(None, "intermediate_size", src)?,
        };
        let is_deepseek = arch.starts_with("deepseek") || r.kv_lora_rank.is_some();
        let attention = if let Some(kv_lora_rank) = r.kv_lora_rank {
            Attention::Mla {
                heads,
                q_lora_rank: r.q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim: need(r.qk_nope_head_dim, "qk_nope_head_dim", src)?,
                qk_rope_head_dim: need(r.qk_rope_head_dim, "qk_rope_head_dim", src)?,
                v_head_dim: need(r.v_head_dim, "v_head_dim", src)?,
            }
        } else {
            let kv_heads = r.num_key_value_heads.unwrap_or(heads);
            if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
                return Err(Error::input(format!(
                    "{src}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
                )));
            }
            let head_dim = r.head_dim.unwrap_or(hidden / heads);
            if head_dim == 0 {
                return Err(Error::input(format!("{src}: head_dim is 0")));
            }
            Attention::Gqa {
                heads,
                kv_heads,
                head_dim,
            }
        };
        let moe = match r.num_experts {
            Some(experts) if experts > 0 => {
                let topk = need(r.num_experts_per_tok, "num_experts_per_tok", src)?;
                if topk > experts {
                    return Err(Error::input(format!(
                        "{src}: num_experts_per_tok ({topk}) exceeds the number of experts ({experts})"
                    )));
                }
                let expert_ffn = r.moe_intermediate_size.unwrap_or(ffn);
                let (shared_experts, shared_ffn, shared_gate) =
                    match (r.n_shared_experts, r.shared_expert_intermediate_size) {
                        (Some(n), _) => (n, expert_ffn, false),
                        (None, Some(f)) if f > 0 => (1, f, true),
                        _ => (0, 0, false),
                    };
                Some(Moe {
                    experts,
                    topk,
                    expert_ffn,
                    shared_experts,
                    shared_ffn,
                    shared_gate,
                    norm_topk_prob: r.norm_topk_prob.unwrap_or(arch == "mixtral" || is_deepseek),
                })
            }
            _ => None,
        };
        let is_moe: Vec<bool> = (0..layers)
            .map(|i| {
                if moe.is_none() {
                    return false;
                }
                if let Some(k) = r.first_k_dense_replace {
                    let freq = r.moe_layer_freq.unwrap_or(1).max(1);
                    return i >= k && i % freq == 0;
                }
                if let Some(only) = &r.mlp_only_layers {
                    if only.contains(&i) {
                        return false;
                    }
                }
                let step = r.decoder_sparse_step.unwrap_or(1).max(1);
                (i + 1) % step == 0
            })
            .collect();
        Ok(ModelConfig {
            qk_norm: arch == "qwen3_moe" || arch == "qwen3",
            attention_bias: r
                .attention_bias
                .unwrap_or(arch == "qwen2_moe" || arch == "qwen2" || is_gpt2),
            learned_positions: is_gpt2,
            mlp: if is_gpt2 { Mlp::Gelu } else { Mlp::SwiGlu },
            tie_embeddings: r.tie_word_embeddings.unwrap_or(is_gpt2),
            arch,
            hidden,
            layers,
            vocab,
            ffn,
            max_seq: r.max_position_embeddings,
            attention,
            moe,
            is_moe,
            mtp_layers: r.num_nextn_predict_layers.unwrap_or(0),
            torch_dtype: r.torch_dtype,
        })
    }

    /// Attention heads (a).
    pub fn heads(&self) -> u64 {
        match self.attention {
            Attention::Gqa { heads, .. } | Attention::Mla { heads, .. } => heads,
        }
    }

    /// Key/value heads (k_a). MLA materialises per-head K and V, so k_a = a.
    pub fn kv_heads(&self) -> u64 {
        match self.attention {
            Attention::Gqa { kv_heads, .. } => kv_heads,
            Attention::Mla { heads, .. } => heads,
        }
    }

    /// Per-head query/key dimension (h_d). For MLA this is nope + rope
    /// (192 for DeepSeek-V3), the width of the attention's Q and K.
    pub fn head_dim(&self) -> u64 {
        match self.attention {
            Attention::Gqa { head_dim, .. } => head_dim,
            Attention::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                ..
            } => qk_nope_head_dim + qk_rope_head_dim,
        }
    }

    /// Number of MoE layers.
    pub fn moe_layers(&self) -> u64 {
        self.is_moe.iter().filter(|m| **m).count() as u64
    }

    /// Index of layers with a dense MLP.
    pub fn dense_layers(&self) -> u64 {
        self.layers - self.moe_layers()
    }

    /// Parameters of one attention block, including its input norm.
    pub fn attention_params(&self) -> u64 {
        let h = self.hidden;
        let norm = if self.mlp == Mlp::Gelu { 2 * h } else { h };
        norm + match self.attention {
            Attention::Gqa {
                heads,
                kv_heads,
                head_dim,
            } => {
                let q = heads * head_dim;
                let kv = kv_heads * head_dim;
                let bias = if self.attention_bias { q + 2 * kv } else { 0 };
                let out_bias = if self.mlp == Mlp::Gelu { h } else { 0 };
                let qk_norm = if self.qk_norm { 2 * head_dim } else { 0 };
                h * (q + 2 * kv) + q * h + bias + out_bias + qk_norm
            }
            Attention::Mla {
                heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let qk = qk_nope_head_dim + qk_rope_head_dim;
                let q = match q_lora_rank {
                    Some(r) => h * r + r + r * heads * qk,
                    None => h * heads * qk,
                };
                let kv = h * (kv_lora_rank + qk_rope_head_dim)
                    + kv_lora_rank
                    + kv_lora_rank * heads * (qk_nope_head_dim + v_head_dim);
                q + kv + heads * v_head_dim * h
            }
        }
    }

    /// Parameters of a dense MLP of intermediate size `f`, including its input norm.
    pub fn mlp_params(&self, f: u64) -> u64 {
        let h = self.hidden;
        match self.mlp {
            Mlp::SwiGlu => h + 3 * h * f,
            Mlp::Gelu => 2 * h + 2 * h * f + f + h,
        }
    }

    /// Parameters of one routed expert (w1, w2, w3).
    pub fn expert_params(&self) -> u64 {
        self.moe
            .as_ref()
            .map_or(0, |m| 3 * self.hidden * m.expert_ffn)
    }

    /// Router parameters of one MoE layer (plus DeepSeek-V3's score-correction bias).
    pub fn router_params(&self) -> u64 {
        self.moe.as_ref().map_or(0, |m| {
            let bias = if self.arch == "deepseek_v3" {
                m.experts
            } else {
                0
            };
            m.experts * self.hidden + bias
        })
    }

    /// Shared-expert parameters of one MoE layer (with Qwen2-MoE's gate).
    pub fn shared_params(&self) -> u64 {
        self.moe.as_ref().map_or(0, |m| {
            m.shared_experts * 3 * self.hidden * m.shared_ffn
                + if m.shared_gate { self.hidden } else { 0 }
        })
    }

    /// Parameters of layer `i` (attention + MLP or MoE block + norms).
    pub fn layer_params(&self, i: u64) -> u64 {
        let h = self.hidden;
        let attn = self.attention_params();
        if self.is_moe.get(i as usize).copied().unwrap_or(false) {
            let m = self.moe.as_ref().expect("is_moe implies moe");
            attn + h
                + self.router_params()
                + m.experts * self.expert_params()
                + self.shared_params()
        } else {
            attn + self.mlp_params(self.ffn)
        }
    }

    /// Input embedding parameters (plus learned positions).
    pub fn embedding_params(&self) -> u64 {
        self.vocab * self.hidden
            + if self.learned_positions {
                self.max_seq.unwrap_or(0) * self.hidden
            } else {
                0
            }
    }

    /// Output head parameters (0 when tied) plus the final norm.
    pub fn head_params(&self) -> u64 {
        let norm = if self.mlp == Mlp::Gelu {
            2 * self.hidden
        } else {
            self.hidden
        };
        norm + if self.tie_embeddings {
            0
        } else {
            self.vocab * self.hidden
        }
    }

    /// Total parameters of the main model (MTP layers excluded).
    pub fn total_params(&self) -> u64 {
        self.embedding_params()
            + self.head_params()
            + (0..self.layers).map(|i| self.layer_params(i)).sum::<u64>()
    }

    /// Parameters touched per token: routed experts counted top-k times.
    pub fn active_params(&self) -> u64 {
        let inactive = match &self.moe {
            Some(m) => self.moe_layers() * (m.experts - m.topk) * self.expert_params(),
            None => 0,
        };
        self.total_params() - inactive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_defaults_and_errors() {
        let c = ModelConfig::from_json_str(
            r#"{"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":128,"vocab_size":100,"extra":1}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.kv_heads(), 4);
        assert_eq!(c.head_dim(), 16);
        assert!(c.moe.is_none());
        let e = ModelConfig::from_json_str(r#"{"hidden_size":64}"#, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg.json") && e.contains("num_hidden_layers"),
            "{e}"
        );
        let e = ModelConfig::from_json_str("{", "cfg.json").unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn qwen2_sparse_step_and_mlp_only_layers() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"qwen2_moe","hidden_size":8,"num_hidden_layers":6,"num_attention_heads":2,
                "intermediate_size":32,"moe_intermediate_size":4,"vocab_size":10,"num_experts":4,
                "num_experts_per_tok":2,"decoder_sparse_step":2,"mlp_only_layers":[3]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.is_moe, vec![false, true, false, false, false, true]);
    }
}
