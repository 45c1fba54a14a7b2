//! Parallel layout, stage assignment and static memory per GPU.

use ftk::model::ModelConfig;

/// TP, PP, EP, CP, DP, virtual pipeline stages and the world size: the
/// summary record's type, with `Layout::new` (checked against the model) and
/// `stage_of` from `ftk::layout` (mofa-predict uses them too).
pub use ftk::records::Layout;

/// Bytes per parameter for the weights, their gradients and the optimizer.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Precision {
    pub param: f64,
    pub grad: f64,
    pub optim: f64,
}

impl Precision {
    /// Mixed-precision Adam as in the ZeRO paper (Rajbhandari et al. 2020,
    /// §3.1: 2Ψ + 2Ψ + 12Ψ): 16-bit weights and gradients, and fp32 master
    /// weights, Adam m and v (12 bytes). `grad_fp32` keeps fp32 gradients
    /// (Megatron's --accumulate-allreduce-grads-in-fp32). fp32 training keeps
    /// the weights themselves as master copy: 4 + 4 + 8. SGD with momentum
    /// replaces m, v by one momentum buffer.
    pub fn new(dtype_bytes: f64, grad_fp32: bool, optimizer: &str) -> Precision {
        let grad = if grad_fp32 { 4.0 } else { dtype_bytes };
        let master = if dtype_bytes >= 4.0 { 0.0 } else { 4.0 };
        let states = if optimizer == "sgd" { 4.0 } else { 8.0 };
        Precision {
            param: dtype_bytes,
            grad,
            optim: master + states,
        }
    }

    /// Bytes per parameter when ZeRO stage `zero` shards over `shard` ranks.
    pub fn per_param(&self, zero: u64, shard: f64) -> f64 {
        let by = |stage: u64| if zero >= stage { shard } else { 1.0 };
        self.param / by(3) + self.grad / by(2) + self.optim / by(1)
    }
}

/// Parameters of layer `i` on one GPU, split into the non-expert part
/// (sharded by t, optimizer sharded over DP×CP) and the routed-expert part
/// (E/ep local experts, sharded by t, optimizer sharded over the
/// expert-data-parallel group DP×CP/ep). Norm weights are counted as sharded
/// by t (under 0.01% of any model here). Routers are replicated.
pub fn layer_params(m: &ModelConfig, l: &Layout, i: u64) -> (f64, f64) {
    let t = l.tp as f64;
    let attn = m.attention_params() as f64 / t;
    if m.is_moe[i as usize] {
        let moe = m.moe.as_ref().expect("MoE layer");
        let dense = attn + m.router_params() as f64 + (m.shared_params() + m.hidden) as f64 / t;
        (
            dense,
            (moe.experts / l.ep) as f64 * m.expert_params() as f64 / t,
        )
    } else {
        (attn + m.mlp_params(m.ffn) as f64 / t, 0.0)
    }
}

/// Parameters one GPU of pipeline rank `stage` holds: its layers (see
/// [`layer_params`]), the embedding on the first stage and the output head
/// on the last.
pub fn stage_params(m: &ModelConfig, l: &Layout, stage: u64) -> (f64, f64) {
    let t = l.tp as f64;
    let (mut dense, mut expert) = (0.0, 0.0);
    for i in (0..m.layers).filter(|&i| l.stage_of(m.layers, i) == stage) {
        let (d, e) = layer_params(m, l, i);
        dense += d;
        expert += e;
    }
    if stage == 0 {
        dense += m.embedding_params() as f64 / t;
    }
    if stage == l.pp - 1 {
        // Megatron keeps a copy of tied embeddings on the last stage.
        let tied_copy = if m.tie_embeddings && l.pp > 1 {
            (m.vocab * m.hidden) as f64
        } else {
            0.0
        };
        dense += (m.head_params() as f64 + tied_copy) / t;
    }
    (dense, expert)
}

/// Static memory of one GPU: `Ψ_dense · bytes(ZeRO over DP·CP) + Ψ_expert ·
/// bytes(ZeRO over DP·CP/EP)` (MemFine eq. 1 with the optimizer term as
/// mixed-precision Adam's 12 bytes, see [`Precision`]).
pub fn static_bytes(m: &ModelConfig, l: &Layout, stage: u64, p: &Precision, zero: u64) -> f64 {
    param_bytes(stage_params(m, l, stage), l, p, zero)
}

/// Bytes of (non-expert, expert) parameters with their gradients and
/// optimizer states, each sharded by ZeRO over its own data-parallel group.
pub fn param_bytes((dense, expert): (f64, f64), l: &Layout, p: &Precision, zero: u64) -> f64 {
    let dp = (l.dp * l.cp) as f64;
    dense * p.per_param(zero, dp) + expert * p.per_param(zero, dp / l.ep as f64)
}
