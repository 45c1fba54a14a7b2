//! MoFa's cost model: time per iteration from FLOPs, calibrated GEMM
//! efficiency, memory-bound elementwise work and the collectives of each
//! parallel dimension, placed on intra- or inter-node links.
//!
//! Conventions (Megatron-LM: Narayanan et al. 2021 eq. 3, Korthikanti et al.
//! 2022 §6): model FLOPs per token are `6·(matmul parameters touched) +
//! 12·s·a·h_d per layer (attention scores and values, unmasked) + 6·V·h (LM head)`;
//! hardware FLOPs add what recompute re-runs (the whole forward of every
//! layer under full, the attention core under selective).
//! Ranks are laid out as Megatron does, tensor-parallel innermost, then
//! context, then data (expert groups inside data × context), then pipeline:
//! a group stays on NVLink when `stride · size <= gpus_per_node`.

use crate::input::{AttnKernel, CpComm, Job, RecomputeModule as RcMod, RecomputeModules};
use crate::zero3;
use ftk::model::{Attention, Mlp, ModelConfig};
use mem_plan::layout::Layout;
use mem_plan::memory::Recompute;
use std::rc::Rc;

/// Calibrated and assumed constants of the time model (see README).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Calib {
    /// GEMM dimension at which efficiency is half its maximum per dimension:
    /// `eff = gemm_eff · Π_{x∈m,n,k} x/(x + gemm_x0)`. Fitted.
    pub gemm_x0: f64,
    /// HBM bytes moved per token and hidden unit per layer by the
    /// elementwise kernels of one forward pass (norms, residuals, dropout,
    /// rotary, casts), at full HBM bandwidth. Fitted.
    pub elem_bytes: f64,
    /// Fraction of link bandwidth NCCL collectives reach. Assumed.
    pub comm_eff: f64,
    /// Passes over the s×s score matrix (2 bytes each) without flash
    /// attention: fused scale-mask-softmax and dropout, forward + backward. Assumed.
    pub softmax_passes: f64,
    /// Fixed cost of one collective step (kernel launch, synchronisation,
    /// first byte): NCCL's small-message all-reduce on one DGX node takes
    /// 10-20 µs (nccl-tests), an inter-node tree adds a step per level. Assumed.
    pub coll_lat_s: f64,
    /// Latency of one step of a ring that crosses nodes (NCCL's LL128
    /// protocol: a few microseconds per inter-node hop). Assumed.
    pub ring_step_s: f64,
    /// Query length at which a flash-attention kernel runs at half its
    /// long-sequence rate (fewer tiles per head, causal-mask overhead): the
    /// FlashAttention-2 paper's benchmarks (Dao 2023, Fig. 4-6) rise by about
    /// 2x from 512 to 16k tokens. Assumed.
    pub attn_s0: f64,
    /// Flash-attention backward rate over its forward rate (FLOP/s of
    /// causal work): FlashAttention-2's backward runs at about three
    /// quarters of its forward on A100 and H100 (Dao 2023 Fig. 5-7; Shah et
    /// al. 2024 Fig. 5-6). Assumed.
    pub attn_bwd_rate: f64,
    /// How much of a node's NIC parallelism a collective spanning nodes
    /// gets: the inter-node stage moves 1/g_eff of the data per GPU with
    /// g_eff = 1 + (g − 1)·nic_par for g group members on a node (1: NCCL's
    /// ideal hierarchical rings, one per NIC; 0: every rank's data through
    /// its own NIC, a flat ring). Fitted.
    pub nic_par: f64,
    /// Achieved fraction of the flash-attention kernel's benchmark rate
    /// inside a training step. Fitted.
    pub attn_eff: f64,
    /// Gradient bucket of overlapped data-parallel reduction, parameters:
    /// Megatron-Core's DDP default (40M, `bucket_size`); the last bucket's
    /// reduction cannot hide under the backward. Cited default.
    pub dp_bucket_params: f64,
}

/// The constants `mofa-predict calibrate --fit` (100 iterations) fitted on every
/// source of the corpus (each source weighted once); the per-GPU
/// `gemm_eff` lives with the cluster presets. The rest are cited or assumed.
pub const CALIB: Calib = Calib {
    // gemm_x0 and elem_bytes keep the values the previous calibration
    // fitted on six Narayanan 2021 and Llama 3 rows; not refitted (FREE).
    gemm_x0: 34.7,
    elem_bytes: 50.8,
    // NCCL's bus bandwidth on NVLink and InfiniBand is typically 75-85% of
    // the link rate (nccl-tests on DGX A100/H100). Assumed.
    comm_eff: 0.8,
    softmax_passes: 6.0,
    coll_lat_s: 10e-6,
    ring_step_s: 4e-6,
    nic_par: 1.0,
    attn_eff: 0.767,
    attn_s0: 512.0,
    attn_bwd_rate: 0.75,
    dp_bucket_params: 40e6,
};

/// Per-iteration seconds by cause, on the pipeline stage that sets the pace
/// (the output record's `breakdown`).
pub use ftk::records::MofaBreakdown as Breakdown;

/// The sum and the named terms of a [`Breakdown`].
pub trait Terms {
    fn total(&self) -> f64;
    /// (name, seconds) of every term, for bottleneck naming.
    fn terms(&self) -> [(&'static str, f64); 9];
}

impl Terms for Breakdown {
    fn total(&self) -> f64 {
        self.terms().iter().map(|t| t.1).sum()
    }

    fn terms(&self) -> [(&'static str, f64); 9] {
        [
            ("compute", self.compute_s),
            ("recompute", self.recompute_s),
            ("tp_comm", self.tp_comm_s),
            ("cp_comm", self.cp_comm_s),
            ("ep_comm", self.ep_comm_s),
            ("pp_bubble", self.pp_bubble_s),
            ("pp_p2p", self.pp_p2p_s),
            ("dp_comm", self.dp_comm_exposed_s),
            ("optimizer", self.optimizer_s),
        ]
    }
}

/// Seconds one micro-batch spends in one layer on one GPU, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerCost {
    pub fwd: f64,
    pub bwd: f64,
    pub recompute: f64,
    pub tp: f64,
    pub cp: f64,
    pub ep: f64,
}

impl LayerCost {
    fn add(&mut self, o: &LayerCost) {
        self.fwd += o.fwd;
        self.bwd += o.bwd;
        self.recompute += o.recompute;
        self.tp += o.tp;
        self.cp += o.cp;
        self.ep += o.ep;
    }
    fn total(&self) -> f64 {
        self.fwd + self.bwd + self.recompute + self.tp + self.cp + self.ep
    }
}

/// The hardware numbers the model needs, in SI units.
#[derive(Clone, Copy, Debug)]
pub struct Hw {
    pub peak: f64,
    pub eff: f64,
    /// Flash-attention rate (FLOP/s of causal work), a kernel benchmark.
    pub attn: f64,
    pub hbm: f64,
    pub intra: f64,
    pub inter: f64,
    pub gpn: u64,
    /// Hopper or later (FlashAttention-3 runs there).
    pub hopper: bool,
    /// [`Calib::nic_par`], carried to the groups.
    pub nic_par: f64,
}

impl Hw {
    pub fn of(job: &Job) -> Hw {
        let c = &job.cluster;
        Hw {
            peak: c.peak_tflops * 1e12 * c.clock,
            eff: c.gemm_eff,
            attn: c.attn_tflops * 1e12 * c.clock,
            hbm: c.hbm_gbs * 1e9,
            intra: c.intra_node_gbps * 1e9,
            inter: c.inter_node_gbps * 1e9,
            gpn: c.gpus_per_node,
            hopper: matches!(c.gpu.as_str(), "H100" | "H100-PCIe" | "H200" | "B200"),
            nic_par: CALIB.nic_par,
        }
    }

    /// Link bandwidth of a group of `size` ranks placed `stride` apart.
    pub fn link(&self, stride: u64, size: u64) -> f64 {
        if stride * size <= self.gpn {
            self.intra
        } else {
            self.inter
        }
    }

    /// A group of `n` ranks placed `stride` apart: how many share a node.
    pub fn group(&self, stride: u64, n: u64) -> Group {
        let g = if stride * n <= self.gpn {
            n
        } else {
            (self.gpn / stride.max(1)).clamp(1, n)
        };
        Group {
            n,
            g,
            k: n.div_ceil(g),
            intra: self.intra,
            inter: self.inter,
            nic_par: self.nic_par,
        }
    }
}

/// A communication group as placed on the machine: `n` ranks, `g` of them
/// on each of `k` nodes. Collectives are hierarchical, as NCCL runs them
/// across nodes: a stage over NVLink inside each node, then a stage across
/// nodes in which each of a node's `g` ranks carries `1/g` of the data over
/// its own NIC (rail-optimised nodes: one NIC per GPU), so a group that
/// spans whole nodes uses every NIC of the node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub n: u64,
    pub g: u64,
    pub k: u64,
    pub intra: f64,
    pub inter: f64,
    /// See [`Calib::nic_par`].
    pub nic_par: f64,
}

impl Group {
    /// Group members per node whose NICs carry the inter-node stage.
    fn g_eff(&self) -> f64 {
        1.0 + (self.g as f64 - 1.0) * self.nic_par
    }

    /// Latency of one collective: a step inside the node, and two steps
    /// per level of a tree over the nodes.
    fn lat(&self, c: &Calib) -> f64 {
        if self.n <= 1 {
            return 0.0;
        }
        let levels = if self.k > 1 {
            (self.k as f64).log2().ceil()
        } else {
            0.0
        };
        c.coll_lat_s * (1.0 + 2.0 * levels)
    }

    /// All-reduce of `bytes`: reduce-scatter and all-gather inside the
    /// node, all-reduce of each rank's 1/g share across the nodes.
    pub fn allreduce_s(&self, bytes: f64, c: &Calib) -> f64 {
        if self.n <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let (g, k) = (self.g as f64, self.k as f64);
        let ge = self.g_eff();
        (2.0 * (g - 1.0) / g * bytes / self.intra + 2.0 * (k - 1.0) / k * bytes / ge / self.inter)
            / c.comm_eff
            + self.lat(c)
    }

    /// All-gather or reduce-scatter whose full buffer is `bytes`.
    pub fn gather_s(&self, bytes: f64, c: &Calib) -> f64 {
        if self.n <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let (g, k) = (self.g as f64, self.k as f64);
        let ge = self.g_eff();
        ((g - 1.0) / g * bytes / self.intra + (k - 1.0) / k * bytes / ge / self.inter) / c.comm_eff
            + self.ring_lat(c)
    }

    /// NCCL runs all-gather and reduce-scatter as rings only (no tree):
    /// n − 1 steps, each paying a hop's latency, which at thousands of ranks
    /// and small shards (ZeRO-3 module gathers) outweighs the bytes.
    fn ring_lat(&self, c: &Calib) -> f64 {
        if self.k > 1 {
            c.coll_lat_s + (self.n - 1) as f64 * c.ring_step_s
        } else {
            self.lat(c)
        }
    }

    /// All-to-all in which every rank holds `bytes` and sends (n-1)/n of
    /// it: the share for peers on the node goes over NVLink while the rest
    /// leaves through the rank's NIC at the same time.
    pub fn alltoall_s(&self, bytes: f64, c: &Calib) -> f64 {
        if self.n <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let (n, g) = (self.n as f64, self.g as f64);
        let nvl = (g - 1.0) / n * bytes / self.intra;
        let net = (n - g) / n * bytes / self.inter;
        nvl.max(net) / c.comm_eff + self.lat(c)
    }

    /// DeepEP's dispatch (or combine) of a rank's `tokens` tokens of `row`
    /// bytes to `topk` of `experts` experts spread evenly over the group's
    /// nodes: a token crosses to each remote node holding at least one of
    /// its experts once (RDMA to the GPU on the same rail), and NVLink
    /// carries its copies to the experts' GPUs inside both nodes (Zhao et
    /// al. 2025, DeepEP's internode kernels).
    pub fn deepep_s(&self, tokens: f64, row: f64, topk: f64, experts: f64, c: &Calib) -> f64 {
        if self.n <= 1 || tokens <= 0.0 {
            return 0.0;
        }
        if self.k <= 1 {
            return self.alltoall_s(tokens * topk * row, c);
        }
        let (n, g, k) = (self.n as f64, self.g as f64, self.k as f64);
        // Probability that none of a token's topk experts (drawn without
        // replacement, as a router's top-k is) sits on a given node.
        let per_node = experts / k;
        let miss = (0..topk as u64)
            .map(|i| ((experts - per_node - i as f64) / (experts - i as f64)).max(0.0))
            .product::<f64>();
        let net = tokens * row * (k - 1.0) * (1.0 - miss) / self.inter;
        // Copies for this node's other GPUs, and the remote copies fanned
        // out on the far side (each GPU relays as much as it sends).
        let copies = tokens * topk * row;
        let nvl = ((g - 1.0) / n + (n - g) / n * (g - 1.0) / g) * copies / self.intra;
        nvl.max(net) / c.comm_eff + self.lat(c)
    }
}

/// Weight-gradient GEMM of an m×n output by m×k input product (the weight
/// is n×k, m the tokens): its FLOPs run as [`gemm_s`], but it also reads
/// and writes the weight-sized gradient buffer it accumulates into
/// (`grad_bytes` each way: Megatron's gradient-accumulation fusion adds
/// the wgrad into the fp32 `main_grad` in the GEMM's epilogue, beta = 1)
/// and reads its two bf16 inputs. With few tokens per weight (a MoE
/// expert's share of a micro-batch) those bytes outlast the FLOPs; the
/// slower of the two sets the time.
pub fn wgrad_s(m: f64, n: f64, k: f64, grad_bytes: f64, hw: &Hw, c: &Calib) -> f64 {
    let bytes = 2.0 * grad_bytes * n * k + 2.0 * m * (n + k);
    gemm_s(m, n, k, hw, c).max(bytes / hw.hbm)
}

/// Achieved GEMM time for an m×k by k×n product.
pub fn gemm_s(m: f64, n: f64, k: f64, hw: &Hw, c: &Calib) -> f64 {
    if m <= 0.0 || n <= 0.0 || k <= 0.0 {
        return 0.0;
    }
    let sat = |x: f64| x / (x + c.gemm_x0);
    2.0 * m * n * k / (hw.peak * hw.eff * sat(m) * sat(n) * sat(k))
}

/// Ring all-reduce of `bytes` over `n` ranks: `2(n-1)/n · bytes / bw`.
pub fn allreduce_s(bytes: f64, n: u64, bw: f64, c: &Calib) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    2.0 * (n - 1) as f64 / n as f64 * bytes / (bw * c.comm_eff)
}

/// All-gather, reduce-scatter or all-to-all of `bytes` (the full buffer)
/// over `n` ranks: `(n-1)/n · bytes / bw`.
pub fn gather_s(bytes: f64, n: u64, bw: f64, c: &Calib) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    (n - 1) as f64 / n as f64 * bytes / (bw * c.comm_eff)
}

/// Pipeline bubble as a fraction of the ideal time: `(p-1)/(m·v)`
/// (Narayanan et al. 2021 §2.2).
pub fn bubble_fraction(p: u64, m: u64, v: u64) -> f64 {
    (p - 1) as f64 / (m * v) as f64
}

fn attn_dims(m: &ModelConfig) -> (f64, f64, f64) {
    match m.attention {
        Attention::Gqa {
            heads,
            kv_heads,
            head_dim,
        } => (heads as f64, kv_heads as f64, head_dim as f64),
        Attention::Mla {
            heads,
            qk_nope_head_dim,
            qk_rope_head_dim,
            ..
        } => (
            heads as f64,
            heads as f64,
            (qk_nope_head_dim + qk_rope_head_dim) as f64,
        ),
    }
}

/// Forward GEMMs of the attention block as (m, n, k) with m = tokens.
fn attn_gemms(model: &ModelConfig, tok: f64, t: f64) -> Vec<(f64, f64, f64)> {
    let h = model.hidden as f64;
    match model.attention {
        Attention::Gqa {
            heads,
            kv_heads,
            head_dim,
        } => {
            let (a, ka, hd) = (heads as f64, kv_heads as f64, head_dim as f64);
            vec![(tok, (a + 2.0 * ka) * hd / t, h), (tok, h, a * hd / t)]
        }
        Attention::Mla {
            heads,
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        } => {
            let a = heads as f64;
            let qk = (qk_nope_head_dim + qk_rope_head_dim) as f64;
            let kvr = kv_lora_rank as f64;
            let mut g = match q_lora_rank {
                Some(r) => vec![(tok, r as f64, h), (tok, a * qk / t, r as f64)],
                None => vec![(tok, a * qk / t, h)],
            };
            g.push((tok, kvr + qk_rope_head_dim as f64, h));
            g.push((tok, a * (qk_nope_head_dim + v_head_dim) as f64 / t, kvr));
            g.push((tok, h, a * v_head_dim as f64 / t));
            g
        }
    }
}

/// Matmul parameters one token touches in layer `i` (what MFU counts).
pub fn active_matmul_params(model: &ModelConfig, i: usize) -> f64 {
    let h = model.hidden as f64;
    let attn: f64 = attn_gemms(model, 1.0, 1.0)
        .iter()
        .map(|&(_, n, k)| n * k)
        .sum();
    let mlp_mats = if model.mlp == Mlp::Gelu { 2.0 } else { 3.0 };
    let ffn = match (&model.moe, model.is_moe.get(i).copied().unwrap_or(false)) {
        (Some(m), true) => {
            m.experts as f64 * h
                + m.topk as f64 * 3.0 * h * m.expert_ffn as f64
                + m.shared_experts as f64 * 3.0 * h * m.shared_ffn as f64
        }
        _ => mlp_mats * h * model.ffn as f64,
    };
    attn + ffn
}

/// Model and hardware FLOPs of one iteration (all GPUs).
pub fn iteration_flops(job: &Job) -> (f64, f64) {
    let m = &job.model;
    let s = job.seq as f64;
    let tokens = job.strategy.gbs as f64 * s;
    let (a, _, hd) = attn_dims(m);
    let h = m.hidden as f64;
    let mut layer_model = 0.0;
    let mut layer_fwd = 0.0;
    let mut attn_fwd = 0.0;
    let mut modules_fwd = 0.0;
    // Layers come in two kinds at most (dense, MoE): count each kind once
    // (tune calls this for every candidate).
    let n_moe = m.is_moe.iter().filter(|x| **x).count();
    let n_dense = m.layers as usize - n_moe;
    for (n, i) in [
        (n_dense, m.is_moe.iter().position(|x| !x)),
        (n_moe, m.is_moe.iter().position(|x| *x)),
    ] {
        let (Some(i), true) = (i, n > 0) else {
            continue;
        };
        let (n, p) = (n as f64, active_matmul_params(m, i));
        layer_model += n * (6.0 * p + 12.0 * s * a * hd);
        layer_fwd += n * (2.0 * p + 4.0 * s * a * hd);
        attn_fwd += n * 4.0 * s * a * hd;
        if let Some(rm) = job.strategy.recompute_modules {
            let core = if rm.has(RcMod::CoreAttn) {
                4.0 * s * a * hd
            } else {
                0.0
            };
            modules_fwd += n * (core + 2.0 * rc_module_params(job, i, rm));
        }
    }
    let head = 6.0 * m.vocab as f64 * h;
    let model_flops = tokens * (layer_model + head);
    let extra = match job.strategy.recompute {
        Recompute::Full => layer_fwd,
        Recompute::Selective if job.strategy.recompute_modules.is_some() => modules_fwd,
        Recompute::Selective => attn_fwd,
        // mofa-predict's strategies offer none, selective and full only.
        Recompute::None | Recompute::Chunked(_) | Recompute::Auto => 0.0,
    };
    (model_flops, model_flops + tokens * extra)
}

/// Matmul parameters per token of the GEMMs that the listed modules re-run
/// in layer `i` (the GEMMs [`rc_module_gemms`] picks), for hardware FLOPs.
fn rc_module_params(job: &Job, i: usize, rm: RecomputeModules) -> f64 {
    let m = &job.model;
    let h = m.hidden as f64;
    let mut p = 0.0;
    if let (
        Attention::Mla {
            heads,
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        },
        true,
    ) = (&m.attention, rm.has(RcMod::MlaUpProj))
    {
        let a = *heads as f64;
        if let Some(r) = q_lora_rank {
            p += *r as f64 * a * (qk_nope_head_dim + qk_rope_head_dim) as f64;
        }
        p += *kv_lora_rank as f64 * a * (qk_nope_head_dim + v_head_dim) as f64;
    }
    match (&m.moe, m.is_moe.get(i).copied().unwrap_or(false)) {
        (Some(e), true) => {
            let shared = e.shared_experts as f64 * 3.0 * h * e.shared_ffn as f64;
            if rm.has(RcMod::Moe) {
                p += e.experts as f64 * h + e.topk as f64 * 3.0 * h * e.expert_ffn as f64 + shared;
            } else if rm.has(RcMod::SharedExperts) {
                p += shared;
            }
        }
        _ if rm.has(RcMod::Mlp) => {
            let mats = if m.mlp == Mlp::Gelu { 2.0 } else { 3.0 };
            p += mats * h * m.ffn as f64;
        }
        _ => {}
    }
    p
}

/// Indices into [`weight_modules`] of the GEMMs the listed modules re-run:
/// MLA's up projections (`mla_up_proj`), a dense layer's MLP (`mlp`), an MoE
/// layer's router, experts and shared experts (`moe`) or its shared experts
/// alone (`shared_experts`).
fn rc_module_gemms(
    job: &Job,
    i: usize,
    rm: RecomputeModules,
    mods: &[WeightModule],
    n_attn: usize,
) -> Vec<usize> {
    let m = &job.model;
    let is_moe = m.moe.is_some() && m.is_moe.get(i).copied().unwrap_or(false);
    let mut out = vec![];
    if let (Attention::Mla { q_lora_rank, .. }, true) = (&m.attention, rm.has(RcMod::MlaUpProj)) {
        // [q_down, q_up,] kv_down, kv_up, o_proj
        if q_lora_rank.is_some() {
            out.push(1);
        }
        out.push(n_attn - 2);
    }
    if is_moe && rm.has(RcMod::Moe) {
        out.extend(n_attn..mods.len());
    } else if is_moe && rm.has(RcMod::SharedExperts) {
        out.extend(n_attn + 2..mods.len());
    } else if !is_moe && rm.has(RcMod::Mlp) {
        out.extend(n_attn..mods.len());
    }
    out
}

/// Selective recompute by Megatron-Core's `recompute_modules`: the seconds
/// the listed modules' forward takes again in the backward of layer `i`
/// (one micro-batch, one GPU), and the extra TP all-reduces and EP
/// all-to-alls (counted in passes of one) that re-run with them.
///
/// What each re-runs (megatron/core/transformer: `transformer_layer.py`,
/// `moe/moe_layer.py`, `moe/experts.py`, `multi_latent_attention.py`):
/// - `core_attn`: the attention core (`_checkpointed_attention_forward`);
///   charged as the model's default "selective" always was (the unfused
///   path's forward; a fused kernel's is not counted, see README).
/// - `layernorm`: only norms that are modules of their own. Under
///   Transformer Engine's layer spec the input norm and a dense layer's
///   pre-MLP norm are fused into the following linear (`IdentityOp`, which
///   Megatron skips); an MoE layer's pre-MLP norm (`TENorm`, the router
///   cannot fuse it) re-runs: read h, write h, 2 bytes each.
/// - `moe_act`: the experts' activation (`CheckpointWithoutOutput`), the
///   same 3 × 2 bytes per expert ffn element the forward charges.
/// - `mla_up_proj`: MLA's q and kv up projections (RoPE is not counted).
/// - `mlp`: a dense layer's MLP (MoE layers excepted): its GEMMs, its
///   activation and its TP collectives (one all-reduce's volume).
/// - `moe`: the whole MoE layer (`tensor_parallel.checkpoint` around
///   router, dispatch, experts, combine and shared experts): GEMMs,
///   elementwise work, the expert-bias passes, and the dispatch and combine
///   all-to-alls; TP collectives only with expert tensor parallelism
///   (etp > 1), since with etp 1 the tokens reach the experts by the
///   all-to-all alone.
/// - `shared_experts`: the shared experts' GEMMs and activation.
fn selective_modules(
    job: &Job,
    i: usize,
    rm: RecomputeModules,
    mods: &[WeightModule],
    gs: &[f64],
    n_attn: usize,
    parts: &RcParts,
) -> (f64, f64, f64) {
    let m = &job.model;
    let st = &job.strategy;
    let t = st.tp as f64;
    let is_moe = m.moe.is_some() && m.is_moe.get(i).copied().unwrap_or(false);
    let gemm: f64 = rc_module_gemms(job, i, rm, mods, n_attn)
        .into_iter()
        .map(|k| gs[k])
        .sum();
    let mut secs = gemm;
    let (mut tp_ar, mut ep_a2a) = (0.0, 0.0);
    if rm.has(RcMod::CoreAttn) && st.attn_kernel == AttnKernel::None {
        secs += parts.attn_fwd;
    }
    if is_moe && rm.has(RcMod::Layernorm) {
        secs += parts.norm;
    }
    if is_moe && rm.has(RcMod::Moe) {
        secs += parts.ffn_elem + parts.bias_f;
        ep_a2a += 2.0;
        if st.etp > 1 {
            tp_ar += 1.0;
        }
    } else if is_moe {
        if rm.has(RcMod::MoeAct) {
            secs += parts.moe_act;
        }
        if rm.has(RcMod::SharedExperts) {
            secs += parts.shared_act;
        }
    } else if rm.has(RcMod::Mlp) {
        secs += parts.ffn_elem;
        if t > 1.0 {
            tp_ar += 1.0;
        }
    }
    (secs, tp_ar, ep_a2a)
}

/// Memory-bound pieces of a layer's forward that selective recompute can
/// re-run, seconds per micro-batch on one GPU.
struct RcParts {
    attn_fwd: f64,
    /// One hidden-sized norm (read and write, 2 bytes each).
    norm: f64,
    /// The MLP side's elementwise work (what `6 · elem_ffn` charges).
    ffn_elem: f64,
    /// The routed experts' activation alone.
    moe_act: f64,
    /// The shared experts' activation alone.
    shared_act: f64,
    bias_f: f64,
}

/// Forward passes re-run per micro-batch (full recompute re-runs the layer).
fn rc_passes_of(r: Recompute) -> f64 {
    if r == Recompute::Full {
        1.0
    } else {
        0.0
    }
}

/// Forward and backward seconds of the attention core (scores, softmax,
/// values) of one layer and micro-batch on one GPU.
///
/// Fused kernels run at a rate that depends on their generation (the
/// cluster's `attn_tflops` is FlashAttention-2's forward rate;
/// FlashAttention-1 runs at half of it, Dao 2023 abstract and Fig. 4;
/// FlashAttention-3 on Hopper at [`FA3_SPEEDUP`] times it, Shah et al. 2024
/// Fig. 5), on the query length (`attn_s0`) and, for the backward, at
/// `attn_bwd_rate` of the forward rate; causal kernels compute half the s²
/// work. The unfused path (Megatron 2021-22) multiplies the full masked
/// matrix as batched GEMMs of inner size h_d and streams the scores through
/// HBM.
pub fn attn_core(job: &Job, hw: &Hw, c: &Calib) -> (f64, f64) {
    let st = &job.strategy;
    let (t, cp) = (st.tp as f64, st.cp as f64);
    let s = job.seq as f64;
    let (a, _, hd) = attn_dims(&job.model);
    let heads_local = st.mbs as f64 * a / t;
    let gen = match st.attn_kernel {
        AttnKernel::None => {
            let g = 2.0 * heads_local * gemm_s(s / cp, s, hd, hw, c);
            let sm = heads_local * (s / cp) * s * 2.0 * c.softmax_passes / hw.hbm;
            return (g + sm / 3.0, 2.0 * g + 2.0 * sm / 3.0);
        }
        AttnKernel::Fa1 => 0.5,
        AttnKernel::Fa2 => 1.0,
        AttnKernel::Fa3 if hw.hopper => FA3_SPEEDUP,
        // FlashAttention-3 needs Hopper's TMA and wgmma; elsewhere FA-2 runs.
        AttnKernel::Fa3 => 1.0,
    };
    let q = s / cp;
    // Smaller heads run the kernel slower (less work per tile per load):
    // FlashAttention-2 at head dim 64 reaches about 0.8 of its rate at 128
    // (Dao 2023, Fig. 4-7); hd/(hd + 43) normalised at 128 gives that.
    let per_head = ((hd / (hd + 43.0)) / (128.0 / 171.0)).min(1.0);
    let rate = hw.attn * c.attn_eff * gen * per_head * q / (q + c.attn_s0);
    // A windowed layer's queries reach back `w` keys; the kernel visits
    // them in 128-key tiles, so a query tile touches (w + 128) keys instead
    // of s/2 on average under the causal mask. Spread over the layers (the
    // stages hold windowed and full layers alike: gpt-oss alternates them).
    let window = job.window.map_or(1.0, |w| {
        let share = w.layers as f64 / job.model.layers.max(1) as f64;
        let frac = (2.0 * (w.tokens as f64 + 128.0) / s).min(1.0);
        1.0 - share * (1.0 - frac)
    });
    let flops = 4.0 * heads_local * q * s * hd * 0.5 * window;
    let f = flops / rate;
    (f, 2.5 * f / c.attn_bwd_rate)
}

/// FlashAttention-3 over FlashAttention-2 on H100 (BF16, causal, head dim
/// 128, 2k-16k tokens: 1.5-2.0x, Shah et al. 2024 abstract and Fig. 5).
pub const FA3_SPEEDUP: f64 = 1.7;

/// A weight-holding module of a layer (what ZeRO-3 gathers as one piece):
/// its forward GEMMs as (m, n, k, count) and its parameters per GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightModule {
    pub gemms: Vec<(f64, f64, f64, f64)>,
    pub params: f64,
    /// Expert weights (sharded over the expert-data-parallel group).
    pub expert: bool,
}

impl WeightModule {
    fn gemm_s(&self, hw: &Hw, c: &Calib) -> f64 {
        self.gemms
            .iter()
            .map(|&(x, y, z, n)| n * gemm_s(x, y, z, hw, c))
            .sum()
    }

    /// The backward's weight-gradient GEMMs ([`wgrad_s`]).
    fn wgrad_s(&self, grad_bytes: f64, hw: &Hw, c: &Calib) -> f64 {
        self.gemms
            .iter()
            .map(|&(x, y, z, n)| n * wgrad_s(x, y, z, grad_bytes, hw, c))
            .sum()
    }
}

/// The weight modules of layer `i` in forward order, and how many of them
/// belong to attention (the last of those is the output projection).
/// Megatron's fused layout: QKV (or MLA's projections), output projection,
/// then fc1 (gate and up fused under SwiGLU) and fc2, or router, routed
/// experts (the local ones, as one module) and shared experts.
pub fn weight_modules(job: &Job, i: usize) -> (Vec<WeightModule>, usize) {
    let m = &job.model;
    let st = &job.strategy;
    let t = st.tp as f64;
    let tok = st.mbs as f64 * job.seq as f64 / st.cp as f64;
    let h = m.hidden as f64;
    let dense = |gemms: Vec<(f64, f64, f64, f64)>| WeightModule {
        params: gemms.iter().map(|&(_, n, k, c)| n * k * c).sum(),
        gemms,
        expert: false,
    };
    let mut mods: Vec<WeightModule> = attn_gemms(m, tok, t)
        .into_iter()
        .map(|(x, y, z)| dense(vec![(x, y, z, 1.0)]))
        .collect();
    let n_attn = mods.len();
    let moe = m
        .moe
        .as_ref()
        .filter(|_| m.is_moe.get(i).copied().unwrap_or(false));
    match moe {
        Some(e) => {
            let (ne, k, fe) = (e.experts as f64, e.topk as f64, e.expert_ffn as f64);
            let local = ne / st.ep as f64;
            // Expert tensor parallelism splits each expert `etp` ways. With
            // etp < tp (Megatron-Core's parallel folding) each rank of an
            // expert group brings its etp/tp share of the sequence-parallel
            // tokens.
            let te = st.etp as f64;
            let per_expert = tok * k * st.ep as f64 / ne * (1.0 + st.moe_imbalance) * (te / t);
            mods.push(dense(vec![(tok, ne, h, 1.0)]));
            mods.push(WeightModule {
                gemms: vec![
                    (per_expert, 2.0 * fe / te, h, local),
                    (per_expert, h, fe / te, local),
                ],
                params: local * 3.0 * h * fe / te,
                expert: true,
            });
            if e.shared_experts > 0 {
                let fs = (e.shared_experts * e.shared_ffn) as f64;
                mods.push(dense(vec![(tok, 2.0 * fs / t, h, 1.0)]));
                mods.push(dense(vec![(tok, h, fs / t, 1.0)]));
            }
        }
        None => {
            let f = m.ffn as f64;
            let up = if m.mlp == Mlp::SwiGlu { 2.0 * f } else { f };
            mods.push(dense(vec![(tok, up / t, h, 1.0)]));
            mods.push(dense(vec![(tok, h, f / t, 1.0)]));
        }
    }
    (mods, n_attn)
}

/// Cost of layer `i` for one micro-batch on one GPU.
pub fn layer_cost(job: &Job, i: usize, hw: &Hw, c: &Calib) -> LayerCost {
    let m = &job.model;
    let st = &job.strategy;
    let (t, cp) = (st.tp as f64, st.cp as f64);
    let b = st.mbs as f64;
    let s = job.seq as f64;
    let h = m.hidden as f64;
    let tok = b * s / cp;
    let (_, ka, hd) = attn_dims(m);
    let moe = m
        .moe
        .as_ref()
        .filter(|_| m.is_moe.get(i).copied().unwrap_or(false));
    let imb = 1.0 + st.moe_imbalance;

    // GEMMs.
    let (mods, n_attn) = weight_modules(job, i);
    let gs: Vec<f64> = mods.iter().map(|w| w.gemm_s(hw, c)).collect();
    let gemm: f64 = gs.iter().sum();
    let wgrad: f64 = mods.iter().map(|w| w.wgrad_s(st.grad_bytes, hw, c)).sum();
    let mut elem_ffn = 0.0; // elementwise elements per token on the MLP side
    match moe {
        Some(e) => {
            let (k, fe) = (e.topk as f64, e.expert_ffn as f64);
            if e.shared_experts > 0 {
                elem_ffn += (e.shared_experts * e.shared_ffn) as f64 / t;
            }
            // activation on k·g_e per token copy, plus permute/unpermute copies
            elem_ffn += k * imb * fe / t + k * imb * 4.0 * h / 6.0;
        }
        None => elem_ffn += m.ffn as f64 / t,
    }

    let (attn_fwd, attn_bwd) = attn_core(job, hw, c);

    // Memory-bound elementwise work: hidden-sized tensors are sharded by t
    // only under sequence parallelism; the MLP activation (3 tensors of
    // 2 bytes) always is.
    let sp_div = if st.sp { t } else { 1.0 };
    let elem = tok * (c.elem_bytes * h / sp_div + 6.0 * elem_ffn) / hw.hbm;

    // Expert biases (gpt-oss): Megatron-Core adds the second expert linear's
    // bias, scaled by the router probability, outside the grouped GEMM in
    // eager PyTorch (`TEGroupedMLP._apply_bias`: per expert `t + b·p` with
    // fp32 probabilities, `torch.cat`, cast back to bf16). Per routed token
    // copy and hidden unit that moves 28 bytes forward (write b·p 4, read
    // t 2 + 4, write 4, cat 4 + 4, cast 4 + 2) and about 36 backward
    // (casts back 6 + 6, the bias and probability gradients' products and
    // reductions 12 + 12).
    let (bias_f, bias_b) = match moe {
        Some(e) if job.expert_bias => {
            let n = tok * e.topk as f64 * imb * h / hw.hbm;
            (28.0 * n, 36.0 * n)
        }
        _ => (0.0, 0.0),
    };
    let fwd = gemm + attn_fwd + elem + bias_f;
    let bwd = gemm + wgrad + attn_bwd + 2.0 * elem + bias_b;
    let mut rc_tp_ar = 0.0; // TP all-reduces re-run by selective modules
    let mut rc_ep_a2a = 0.0; // EP all-to-alls re-run by selective modules
    let recompute = match (st.recompute, st.recompute_modules) {
        (Recompute::Full, _) => fwd,
        // Half the forward's matmuls and all its elementwise work re-run.
        (Recompute::Selective, _) if st.sac_op => 0.5 * gemm + elem,
        (Recompute::Selective, Some(rm)) => {
            let hbm = |bytes_per_tok: f64| tok * bytes_per_tok / hw.hbm;
            let (act_moe, act_shared) = match moe {
                Some(e) => (
                    6.0 * e.topk as f64 * imb * e.expert_ffn as f64 / t,
                    6.0 * (e.shared_experts * e.shared_ffn) as f64 / t,
                ),
                None => (0.0, 0.0),
            };
            let parts = RcParts {
                attn_fwd,
                norm: hbm(4.0 * h / sp_div),
                ffn_elem: hbm(6.0 * elem_ffn),
                moe_act: hbm(act_moe),
                shared_act: hbm(act_shared),
                bias_f,
            };
            let (secs, tp_ar, ep_a2a) = selective_modules(job, i, rm, &mods, &gs, n_attn, &parts);
            rc_tp_ar = tp_ar;
            rc_ep_a2a = ep_a2a;
            secs
        }
        (Recompute::Selective, None) if st.attn_kernel == AttnKernel::None => attn_fwd,
        _ => 0.0,
    };
    let rc_passes = rc_passes_of(st.recompute);

    // TP: 2 all-reduces forward, 2 backward (SP: all-gather + reduce-scatter,
    // the same volume), 2 more when full recompute re-runs the forward.
    // An MoE layer without expert TP (etp 1) and without shared experts has
    // only the attention's pair: Megatron-Core's token dispatchers gather
    // over the expert-TP group (`pg_collection.expt_tp`), so the
    // sequence-parallel tokens reach the experts by the all-to-all alone
    // (which `ep` charges on tok·etp/tp tokens); shared experts are a
    // TP-split MLP and keep theirs.
    let per_fwd = match moe {
        Some(e) if st.etp == 1 && e.shared_experts == 0 => 1.0,
        _ => 2.0,
    };
    let tp = if st.tp > 1 {
        let all = (2.0 * per_fwd + per_fwd * rc_passes + rc_tp_ar)
            * hw.group(1, st.tp).allreduce_s(tok * h * 2.0, c);
        if st.tp_comm_overlap {
            // Pipelined with the GEMMs chunk by chunk (one chunk per TP
            // rank): what the GEMMs cannot cover, and at least one chunk.
            let g = gemm * (3.0 + rc_passes) + if rc_tp_ar > 0.0 { recompute } else { 0.0 };
            (all - g).max(all / st.tp as f64)
        } else {
            all
        }
    } else {
        0.0
    };
    // CP: each rank holds s/c tokens' K and V (KV heads split by t, or one
    // head when t exceeds them), 2 bytes each.
    let cpc = if st.cp > 1 {
        let bw = hw.link(st.tp, st.cp);
        let kv = tok * 2.0 * (ka / t).max(1.0) * hd * 2.0;
        match st.cp_comm {
            // Ring: c-1 steps pass K/V forward (dK/dV too in backward),
            // overlapped with each step's attention; what outlasts it shows.
            CpComm::Ring => {
                let step_f = (cp - 1.0) * kv / (bw * c.comm_eff);
                let exposed_f = (step_f - attn_fwd).max(0.0);
                let exposed_b = (2.0 * step_f - attn_bwd).max(0.0);
                exposed_f * (1.0 + rc_passes) + exposed_b
            }
            // All-gather K/V before the forward attention (again when the
            // forward is recomputed), reduce-scatter dK/dV after the
            // backward: on the critical path (Llama 3 §3.3.2).
            CpComm::AllGather => {
                let ag = hw.group(st.tp, st.cp).gather_s(kv * cp, c);
                ag * (1.0 + rc_passes) + ag
            }
        }
    } else {
        0.0
    };
    // EP: dispatch + combine all-to-all, forward and backward.
    let ep = match moe {
        Some(e) if st.ep > 1 => {
            let tokens = tok * (st.etp as f64 / t) * imb;
            let grp = hw.group(st.etp, st.ep);
            let (k, ne) = (e.topk as f64, e.experts as f64);
            let one = if st.deepep {
                grp.deepep_s(tokens, h * 2.0, k, ne, c)
            } else {
                grp.alltoall_s(tokens * k * h * 2.0, c)
            };
            let a2a = (4.0 + 2.0 * rc_passes + rc_ep_a2a) * one;
            if st.ep_comm_overlap {
                // Hidden under another micro-batch's compute (Megatron's
                // 1F1B A2A overlap): only what outlasts it shows.
                (a2a - (fwd + bwd)).max(0.0)
            } else {
                a2a
            }
        }
        _ => 0.0,
    };
    LayerCost {
        fwd,
        bwd,
        recompute,
        tp,
        cp: cpc,
        ep,
    }
}

/// The data-parallel groups ZeRO-3 gathers over: dense weights over
/// DP × CP, expert weights over DP × CP / EP.
pub struct Z3Groups {
    pub d: Group,
    pub e: Group,
}

/// What the ZeRO-3 schedule needs of the pipeline stage that sets the pace.
pub struct Z3Stage<'a> {
    pub stage: u64,
    pub dense: &'a LayerCost,
    pub moe: Option<&'a LayerCost>,
    /// LM head + cross-entropy seconds, forward and backward.
    pub head: (f64, f64),
    /// Embedding TP collectives (forward + backward).
    pub emb_tp: f64,
}

/// One layer as ZeRO-3 modules: each weight module's compute is its GEMMs
/// plus a share of the layer's elementwise time in proportion to them; the
/// attention core runs between the module before the output projection and
/// the output projection; TP collectives follow the output projection and
/// the last MLP module, CP ones the attention core, EP ones the experts.
pub fn zero3_layer(
    job: &Job,
    i: usize,
    lc: &LayerCost,
    g: &Z3Groups,
    hw: &Hw,
    c: &Calib,
) -> zero3::Block {
    let st = &job.strategy;
    let (mods, n_attn) = weight_modules(job, i);
    let gs: Vec<f64> = mods.iter().map(|w| w.gemm_s(hw, c)).collect();
    let wg: Vec<f64> = mods
        .iter()
        .map(|w| w.wgrad_s(st.grad_bytes, hw, c))
        .collect();
    let sum_g: f64 = gs.iter().sum();
    let (af, ab) = attn_core(job, hw, c);
    let full = st.recompute == Recompute::Full;
    let phases = 2.0 + rc_passes_of(st.recompute);
    let elem_f = lc.fwd - sum_g - af;
    let elem_b = lc.bwd - sum_g - wg.iter().sum::<f64>() - ab;
    let core = n_attn.saturating_sub(2);
    let oproj = n_attn - 1;
    let last = mods.len() - 1;
    let experts = mods.iter().position(|w| w.expert).unwrap_or(last);
    let mut out = Vec::with_capacity(mods.len());
    for (k, w) in mods.iter().enumerate() {
        let share = gs[k] / sum_g;
        let mut fwd = gs[k] + elem_f * share;
        let mut bwd = gs[k] + wg[k] + elem_b * share;
        let mut comm = 0.0;
        if k == core {
            fwd += af;
            bwd += ab;
            comm += lc.cp;
            if !full {
                bwd += lc.recompute; // selective: the attention core re-runs
            }
        }
        if k == oproj {
            comm += lc.tp / 2.0;
        }
        if k == last {
            comm += lc.tp / 2.0;
        }
        if k == experts {
            comm += lc.ep;
        }
        let comm = comm / phases;
        let grp = if w.expert { &g.e } else { &g.d };
        let xfer = grp.gather_s(w.params * 2.0, c);
        let rs = grp.gather_s(w.params * st.grad_bytes, c);
        out.push(zero3::Module {
            params: w.params,
            gather_s: xfer,
            rs_s: rs,
            fwd_s: fwd + comm,
            rc_s: if full { fwd + comm } else { 0.0 },
            bwd_s: bwd + comm,
        });
    }
    zero3::Block {
        modules: out,
        recomputed: full,
    }
}

/// The blocks one micro-batch runs on stage `ctx.stage` under ZeRO-3:
/// the embedding on the first stage, the layers, the LM head on the last.
/// A tied head gathers the embedding's weights again; their gradients are
/// reduce-scattered once, with the embedding's.
pub fn zero3_blocks(
    job: &Job,
    ctx: &Z3Stage,
    g: &Z3Groups,
    hw: &Hw,
    c: &Calib,
) -> Vec<Rc<zero3::Block>> {
    let m = &job.model;
    let l = layout(job);
    let t = job.strategy.tp as f64;
    let mut blocks = vec![];
    let embed = |params: f64, fwd: f64, bwd: f64, rs: bool| {
        let xfer = g.d.gather_s(params * 2.0, c);
        let rs_s = if rs {
            g.d.gather_s(params * job.strategy.grad_bytes, c)
        } else {
            0.0
        };
        Rc::new(zero3::Block {
            modules: vec![zero3::Module {
                params,
                gather_s: xfer,
                rs_s,
                fwd_s: fwd,
                rc_s: 0.0,
                bwd_s: bwd,
            }],
            recomputed: false,
        })
    };
    if ctx.stage == 0 {
        let p = m.embedding_params() as f64 / t;
        blocks.push(embed(p, ctx.emb_tp / 2.0, ctx.emb_tp / 2.0, true));
    }
    let dense_i = m.is_moe.iter().position(|x| !x).unwrap_or(0);
    let moe_i = m.is_moe.iter().position(|x| *x);
    let dense = Rc::new(zero3_layer(job, dense_i, ctx.dense, g, hw, c));
    let moe = match (moe_i, ctx.moe) {
        (Some(i), Some(lc)) => Some(Rc::new(zero3_layer(job, i, lc, g, hw, c))),
        _ => None,
    };
    for i in (0..m.layers).filter(|&i| stage_of(&l, m.layers, i) == ctx.stage) {
        let b = match (&moe, m.is_moe[i as usize]) {
            (Some(b), true) => b,
            _ => &dense,
        };
        blocks.push(Rc::clone(b));
    }
    if ctx.stage == l.pp - 1 {
        let p = (m.vocab * m.hidden) as f64 / t;
        blocks.push(embed(p, ctx.head.0, ctx.head.1, !m.tie_embeddings));
    }
    blocks
}

/// What [`predict_time`] returns.
#[derive(Clone, Debug)]
pub struct Timing {
    pub iter_s: f64,
    pub breakdown: Breakdown,
    pub model_flops: f64,
    pub hw_flops: f64,
    /// Pipeline stage that sets the pace.
    pub stage: u64,
}

/// mem-plan's `Layout::stage_of` without its linear search: chunk j of
/// C = pp·vpp holds layers [j·L/C, (j+1)·L/C).
pub fn stage_of(l: &Layout, layers: u64, i: u64) -> u64 {
    let c = l.pp * l.vpp;
    let mut j = (i * c / layers.max(1)).min(c - 1);
    while j > 0 && i < j * layers / c {
        j -= 1;
    }
    while j + 1 < c && i >= (j + 1) * layers / c {
        j += 1;
    }
    j % l.pp
}

pub fn layout(job: &Job) -> Layout {
    let s = &job.strategy;
    Layout {
        tp: s.tp,
        pp: s.pp,
        ep: s.ep,
        cp: s.cp,
        dp: s.dp,
        vpp: s.vpp,
        world: s.tp * s.pp * s.cp * s.dp,
    }
}

/// Exposed pipeline point-to-point seconds per micro-batch on a stage whose
/// layers cost `s`, when each of the `2·vpp` transfers (activations
/// forward, gradients backward, once per model chunk) takes `one` seconds.
///
/// The non-interleaved 1F1B schedule waits for each transfer (Megatron
/// batches the send and receive but blocks on them; DeepSpeed's pipeline
/// engine too). The interleaved schedule posts the next chunk's receive and
/// the previous chunk's send asynchronously and waits only when the data is
/// needed, so a transfer hides under one chunk's compute: Megatron-LM turns
/// `overlap_p2p_comm` on by default whenever virtual stages are used
/// (`--no-overlap-p2p-communication`, forced off only without
/// interleaving) and NeMo / Megatron-Bridge set it for `vp_size > 1`
/// (`comm_overlap.py`). Only what outlasts the chunk's forward (backward)
/// shows.
pub fn p2p_exposed(one: f64, vpp: u64, s: &LayerCost) -> f64 {
    let v = vpp as f64;
    if vpp <= 1 {
        return 2.0 * one;
    }
    let chunk_f = s.fwd / v;
    let chunk_b = (s.bwd + s.recompute) / v;
    v * ((one - chunk_f).max(0.0) + (one - chunk_b).max(0.0))
}

/// Iteration time and its breakdown.
pub fn predict_time(job: &Job, c: &Calib) -> Timing {
    let hw = Hw {
        nic_par: c.nic_par,
        ..Hw::of(job)
    };
    let m = &job.model;
    let st = &job.strategy;
    let l = layout(job);
    let (t, cp) = (st.tp as f64, st.cp as f64);
    let tok = st.mbs as f64 * job.seq as f64 / cp;
    let h = m.hidden as f64;
    let micro = st.gbs / (st.mbs * st.dp);

    // Layers come in at most two kinds; cost each kind once.
    let dense_cost = layer_cost(job, m.is_moe.iter().position(|x| !x).unwrap_or(0), &hw, c);
    let moe_cost = m
        .is_moe
        .iter()
        .position(|x| *x)
        .map(|i| layer_cost(job, i, &hw, c));
    let mut stages = vec![LayerCost::default(); st.pp as usize];
    for i in 0..m.layers {
        let sgi = stage_of(&l, m.layers, i) as usize;
        let lc = if m.is_moe[i as usize] {
            moe_cost.as_ref().unwrap_or(&dense_cost)
        } else {
            &dense_cost
        };
        stages[sgi].add(lc);
    }
    // A DeepSpeed engine accumulates each micro-batch's weight gradients in
    // a pass of its own over every local parameter of the stage (under fp16
    // every micro-batch but the first: spread over all of them here).
    let (accum_bytes, accum_first) =
        crate::input::unfused_grad_accum_bytes(job.deepspeed, st.zero, job.bf16);
    if accum_bytes > 0.0 {
        let share = if accum_first {
            1.0
        } else {
            let mb = micro.max(1) as f64;
            (mb - 1.0) / mb
        };
        for (sgi, sc) in stages.iter_mut().enumerate() {
            let (pd, pe) = mem_plan::layout::stage_params(m, &l, sgi as u64);
            sc.bwd += share * (pd + pe) * accum_bytes / hw.hbm;
        }
    }
    // LM head and its cross-entropy on the last stage.
    let v_local = m.vocab as f64 / t;
    let head_g = gemm_s(tok, v_local, h, &hw, c);
    // The loss's memory-bound passes over the tok × v/t logits.
    let logits = tok * v_local / hw.hbm;
    let (ce_f, ce_b) = (job.ce_bytes.0 * logits, job.ce_bytes.1 * logits);
    let last = stages.len() - 1;
    stages[last].fwd += head_g + ce_f;
    let head_b = head_g + wgrad_s(tok, v_local, h, st.grad_bytes, &hw, c) + ce_b;
    stages[last].bwd += head_b;
    // vocab-parallel cross entropy: 3 tiny all-reduces; the embedding's
    // forward all-reduce (or reduce-scatter) on stage 0 and its backward.
    let emb_tp = 2.0 * hw.group(1, st.tp).allreduce_s(tok * h * 2.0, c);
    stages[0].tp += emb_tp;
    // Pipeline point-to-point per micro-batch: activations forward, grads
    // backward, once per model chunk, split across the TP ranks
    // (scatter/gather, Narayanan et al. 2021 §4.1).
    let p2p_one = if st.pp > 1 {
        let bw = hw.link(st.tp * st.cp * st.dp, st.pp);
        tok * h * 2.0 / t / (bw * c.comm_eff) + c.coll_lat_s
    } else {
        0.0
    };
    let p2p: Vec<f64> = stages
        .iter()
        .map(|s| p2p_exposed(p2p_one, st.vpp, s))
        .collect();
    let totals: Vec<f64> = stages
        .iter()
        .zip(&p2p)
        .map(|(s, x)| s.total() + x)
        .collect();
    let (stage, t_max) = totals
        .iter()
        .copied()
        .enumerate()
        .fold((0, 0.0), |acc, (i, x)| if x > acc.1 { (i, x) } else { acc });
    let t_avg = totals.iter().sum::<f64>() / totals.len() as f64;
    let bubble = (st.pp - 1) as f64 / st.vpp as f64 * t_avg;
    let sc = &stages[stage];
    let mf = micro as f64;

    // Data parallel: gradients (fp32 main grads) and, with ZeRO >= 1,
    // the parameter all-gather after the sharded optimizer step.
    let (pd, pe) = mem_plan::layout::stage_params(m, &l, stage as u64);
    let dgrp = st.dp * st.cp;
    // Expert weights are replicated over the ranks of a stage outside their
    // etp·ep expert group.
    let egrp = (dgrp * st.tp / (st.etp * st.ep)).max(1);
    let gd = hw.group(st.tp, dgrp);
    let ge = hw.group(st.etp * st.ep, egrp);
    // 2-byte (bf16/fp16) all-gather or reduce-scatter of the stage's weights.
    let p16 = gd.gather_s(pd * 2.0, c) + ge.gather_s(pe * 2.0, c);
    let dp_exposed = match st.zero {
        // ZeRO-3 (DeepSpeed stage 3 / FSDP full shard): per micro-batch the
        // weights are all-gathered for the forward and again for the
        // backward (once for a checkpointed layer's recompute forward and
        // backward) and the 16-bit gradients are reduce-scattered, module by
        // module; with prefetch the schedule of `zero3` decides what hides.
        // DeepSpeed's stage 3 moves each rank's shard through its own NIC.
        3 => {
            let flat = |g: Group| {
                if st.z3_rank_nic {
                    Group { nic_par: 0.0, ..g }
                } else {
                    g
                }
            };
            let g = Z3Groups {
                d: flat(gd),
                e: flat(ge),
            };
            if st.overlap_grad_reduce {
                let ctx = Z3Stage {
                    stage: stage as u64,
                    dense: &dense_cost,
                    moe: moe_cost.as_ref(),
                    head: (head_g + ce_f, head_b),
                    emb_tp,
                };
                let blocks = zero3_blocks(job, &ctx, &g, &hw, c);
                let busy = zero3::busy_s(&blocks);
                debug_assert!(
                    (busy - (sc.fwd + sc.bwd + sc.recompute + sc.tp + sc.cp + sc.ep)).abs()
                        < 1e-9 * busy.max(1e-30),
                    "{busy} vs {sc:?}"
                );
                mf * (zero3::micro_batch_s(&blocks, zero3::PREFETCH_BUCKET) - busy).max(0.0)
            } else {
                let p16 = g.d.gather_s(pd * 2.0, c) + g.e.gather_s(pe * 2.0, c);
                mf * (2.0 + st.grad_bytes / 2.0) * p16
            }
        }
        // Gradients (fp32 main grads, Megatron's default for bf16) are
        // all-reduced (ZeRO 0) or reduce-scattered (ZeRO 1/2, then the 2-byte
        // parameters all-gathered after the sharded step). Overlapped, the
        // reduction runs bucket by bucket as the last micro-batch's backward
        // produces gradients, and the gather under the next forward; only
        // the last bucket (first, for the gather) must wait.
        z => {
            let (grad, param) = if z == 0 {
                let gb = st.grad_bytes;
                (gd.allreduce_s(pd * gb, c) + ge.allreduce_s(pe * gb, c), 0.0)
            } else {
                let gb = st.grad_bytes;
                (gd.gather_s(pd * gb, c) + ge.gather_s(pe * gb, c), p16)
            };
            let last = (c.dp_bucket_params / (pd + pe).max(1.0)).min(1.0);
            let comm = sc.tp + sc.cp + sc.ep;
            let hide = |x: f64, win: f64| (x * (1.0 - last) - win).max(0.0) + x * last;
            let g = if st.overlap_grad_reduce {
                hide(grad, sc.bwd + sc.recompute + comm / 2.0)
            } else {
                grad
            };
            let p = if st.overlap_param_gather {
                hide(param, sc.fwd + comm / 2.0)
            } else {
                param
            };
            g + p
        }
    };
    // Optimizer: Adam reads and writes ~32 bytes per local parameter.
    let shard = |g: u64| if st.zero >= 1 { g as f64 } else { 1.0 };
    let local = pd / shard(dgrp) + pe / shard(egrp);
    let optimizer = local * 32.0 / hw.hbm;

    let breakdown = Breakdown {
        compute_s: mf * (sc.fwd + sc.bwd),
        recompute_s: mf * sc.recompute,
        tp_comm_s: mf * sc.tp,
        cp_comm_s: mf * sc.cp,
        ep_comm_s: mf * sc.ep,
        pp_bubble_s: bubble,
        pp_p2p_s: mf * p2p[stage],
        dp_comm_exposed_s: dp_exposed,
        optimizer_s: optimizer,
    };
    debug_assert!(
        (breakdown.total() - (mf * t_max + bubble + dp_exposed + optimizer)).abs()
            < 1e-9 * breakdown.total().max(1.0)
    );
    let (model_flops, hw_flops) = iteration_flops(job);
    Timing {
        iter_s: breakdown.total(),
        breakdown,
        model_flops,
        hw_flops,
        stage: stage as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{job_from_value, Fallback};

    fn gpt_job(l: u64, h: u64, a: u64, gbs: u64, rc: &str) -> Job {
        let v = serde_json::json!({"model":{"arch":"gpt","layers":l,"hidden":h,"heads":a,"vocab":51200,"seq":2048},
            "cluster":{"gpu":"A100-80GB","gpus":8},"strategy":{"tp":8,"mbs":1,"gbs":gbs,"recompute":rc}});
        job_from_value(&v, &Fallback::default(), "t").unwrap()
    }

    #[test]
    fn flops_follow_megatron_eq3() {
        // Narayanan et al. 2021 eq. 3 (full recompute): 96 B s l h² (1 + s/6h + V/16lh);
        // Korthikanti et al. model FLOPs: 72 B s l h² (1 + s/6h + V/12lh).
        let (l, h, b, s, v) = (128.0, 25600.0, 8.0, 2048.0, 51200.0);
        let j = gpt_job(128, 25600, 160, 8, "full");
        let (model, hw) = iteration_flops(&j);
        let eq3 = 96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h));
        let mfu = 72.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h));
        assert!((hw - eq3).abs() < 1e-9 * eq3, "{hw} vs {eq3}");
        assert!((model - mfu).abs() < 1e-9 * mfu, "{model} vs {mfu}");
        // Selective adds the attention forward: 4 B s² h per layer.
        let (_, sel) = iteration_flops(&gpt_job(128, 25600, 160, 8, "selective"));
        assert!((sel - mfu - 4.0 * b * s * s * h * l).abs() < 1e-9 * sel);
    }

    #[test]
    fn a_sliding_window_cuts_only_the_windowed_layers_attention() {
        let with = |w: Option<(u64, u64)>| {
            let mut j = gpt_job(24, 4096, 32, 8, "selective");
            j.window = w.map(|(tokens, layers)| crate::input::Window { tokens, layers });
            let hw = Hw::of(&j);
            (
                attn_core(&j, &hw, &CALIB).0,
                layer_cost(&j, 0, &hw, &CALIB).fwd,
            )
        };
        let (full, lf) = with(None);
        // A window as long as the causal reach changes nothing.
        assert_eq!(with(Some((2048, 24))).0, full);
        // Windowed layers do (w + 128)·s of the s²/2 causal work; half of
        // the layers windowed pays half that saving, and only attention moves.
        let (all, la) = with(Some((128, 24)));
        let (half, _) = with(Some((128, 12)));
        let frac = 2.0 * (128.0 + 128.0) / 2048.0;
        assert!((all / full - frac).abs() < 1e-12, "{}", all / full);
        assert!((half - 0.5 * (full + all)).abs() < 1e-12 * full);
        assert!((lf - la - (full - all)).abs() < 1e-12 * lf);
    }

    #[test]
    fn stage_of_matches_mem_plans_search() {
        for (layers, pp, vpp) in [
            (32, 4, 1),
            (94, 32, 3),
            (126, 16, 4),
            (7, 3, 2),
            (61, 8, 1),
            (5, 5, 1),
        ] {
            let l = Layout {
                tp: 1,
                pp,
                ep: 1,
                cp: 1,
                dp: 1,
                vpp,
                world: pp,
            };
            for i in 0..layers {
                assert_eq!(
                    stage_of(&l, layers, i),
                    l.stage_of(layers, i),
                    "{layers} {pp} {vpp} {i}"
                );
            }
        }
    }

    #[test]
    fn params_match_megatron_table1() {
        // Table 1 "Number of parameters (billion)": 12 l h² (1 + 13/12h + (V+s)/12lh).
        for (pb, a, h, l) in [
            (1.7, 24, 2304, 24),
            (145.6, 96, 12288, 80),
            (1008.0, 160, 25600, 128),
        ] {
            let j = gpt_job(l, h, a, 8, "full");
            let got = j.model.total_params() as f64 / 1e9;
            assert!((got - pb).abs() < 0.06, "{pb}: {got}");
        }
    }

    /// The shipped constants with the link efficiency the hand figures use.
    const TC: Calib = Calib {
        comm_eff: 0.7,
        ..CALIB
    };

    /// ... and no collective latency, for schedules checked against pure traffic.
    const Z0: Calib = Calib {
        coll_lat_s: 0.0,
        ring_step_s: 0.0,
        ..TC
    };

    #[test]
    fn collectives_and_bubble_by_hand() {
        let c = TC;
        // 1 GB ring all-reduce over 8 ranks at 100 GB/s: 2·7/8·1e9/(1e11·0.7) s.
        assert!((allreduce_s(1e9, 8, 1e11, &c) - 1.75e9 / 7e10).abs() < 1e-12);
        assert_eq!(allreduce_s(1e9, 1, 1e11, &c), 0.0);
        assert!((gather_s(1e9, 4, 1e11, &c) - 0.75e9 / 7e10).abs() < 1e-12);
        assert_eq!(bubble_fraction(8, 32, 1), 7.0 / 32.0);
        assert_eq!(bubble_fraction(8, 32, 4), 7.0 / 128.0);
        // A 4096³ GEMM at peak·eff·(4096/(4096+x0))³.
        let hw = Hw {
            peak: 312e12,
            eff: 0.769,
            attn: 187e12,
            hbm: 2e12,
            intra: 3e11,
            inter: 2.5e10,
            gpn: 8,
            hopper: false,
            nic_par: 1.0,
        };
        let sat = 4096.0 / (4096.0 + c.gemm_x0);
        let want = 2.0 * 4096f64.powi(3) / (312e12 * 0.769 * sat.powi(3));
        assert!((gemm_s(4096.0, 4096.0, 4096.0, &hw, &c) - want).abs() < 1e-15);
        // Placement: TP 8 inside an 8-GPU node, DP across nodes.
        assert_eq!(hw.link(1, 8), 3e11);
        assert_eq!(hw.link(8, 2), 2.5e10);
        // Hierarchical collectives (no latency here): TP 16 over two nodes
        // reduces inside each node over NVLink, then each GPU all-reduces
        // its 1/8 share with its peer on the other node over its own NIC.
        let c0 = Calib {
            coll_lat_s: 0.0,
            ..c
        };
        let tp16 = hw.group(1, 16);
        assert_eq!((tp16.g, tp16.k), (8, 2));
        let want = (2.0 * 7.0 / 8.0 * 1e9 / 3e11 + 2.0 * 0.5 * 1e9 / 8.0 / 2.5e10) / 0.7;
        assert!((tp16.allreduce_s(1e9, &c0) - want).abs() < 1e-12);
        // ... about 7x faster than a flat ring on one NIC per GPU.
        let flat = allreduce_s(1e9, 16, 2.5e10, &c0);
        assert!(flat / tp16.allreduce_s(1e9, &c0) > 6.0);
        // One rank per node (DP behind TP 8): the flat ring on the NIC.
        let dp = hw.group(8, 4);
        assert_eq!((dp.g, dp.k), (1, 4));
        assert!((dp.allreduce_s(1e9, &c0) - allreduce_s(1e9, 4, 2.5e10, &c0)).abs() < 1e-12);
        // Inside a node: the NVLink ring.
        assert!((hw.group(1, 8).gather_s(1e9, &c0) - gather_s(1e9, 8, 3e11, &c0)).abs() < 1e-12);
        // All-to-all over 16 ranks on 2 nodes: 7/16 over NVLink while 8/16
        // leave through the NIC; the NIC sets the time.
        let a2a = tp16.alltoall_s(1.6e9, &c0);
        assert!((a2a - 0.5 * 1.6e9 / 2.5e10 / 0.7).abs() < 1e-12);
        // Latency: one step inside a node, 1 + 2·log2(k) steps over k nodes.
        let tiny = 1e-3;
        let bw_part = |g: Group| g.allreduce_s(tiny, &c0);
        let lat = |g: Group| g.allreduce_s(tiny, &c) - bw_part(g);
        assert!((lat(hw.group(1, 8)) - c.coll_lat_s).abs() < 1e-15);
        assert!((lat(hw.group(8, 64)) - 13.0 * c.coll_lat_s).abs() < 1e-15);
        assert_eq!(hw.group(8, 64).allreduce_s(0.0, &c), 0.0);
    }

    #[test]
    fn pipeline_adds_the_bubble_and_interleaving_shrinks_it() {
        let mk = |pp: u64, vpp: u64| {
            let v = serde_json::json!({"model":{"arch":"gpt","layers":48,"hidden":8192,"heads":64,"vocab":51200,"seq":2048},
                "cluster":{"gpu":"A100-80GB","gpus":8*pp},"strategy":{"tp":8,"pp":pp,"vpp":vpp,"mbs":1,"gbs":16}});
            predict_time(
                &job_from_value(&v, &Fallback::default(), "t").unwrap(),
                &CALIB,
            )
        };
        let (p4, p4v2) = (mk(4, 1), mk(4, 2));
        let per_mb = (p4.iter_s
            - p4.breakdown.pp_bubble_s
            - p4.breakdown.dp_comm_exposed_s
            - p4.breakdown.optimizer_s)
            / 16.0;
        // bubble ≈ (p−1)/v · t_stage (stages are equal up to the head on the last one).
        assert!(
            (p4.breakdown.pp_bubble_s / per_mb - 3.0).abs() < 0.3,
            "{}",
            p4.breakdown.pp_bubble_s / per_mb
        );
        assert!(p4v2.breakdown.pp_bubble_s < 0.55 * p4.breakdown.pp_bubble_s);
    }

    #[test]
    fn interleaved_pipeline_hides_point_to_point_under_chunks() {
        // A GPT whose stages sit on different nodes (TP 8 fills a node):
        // each transfer crosses the network.
        let mk = |vpp: u64, gbps: f64| {
            let v = serde_json::json!({"model":{"arch":"gpt","layers":48,"hidden":8192,"heads":64,"vocab":51200,"seq":2048},
                "cluster":{"gpu":"A100-80GB","gpus":32,"inter_node_gbps":gbps},
                "strategy":{"tp":8,"pp":4,"vpp":vpp,"mbs":1,"gbs":16}});
            predict_time(
                &job_from_value(&v, &Fallback::default(), "t").unwrap(),
                &CALIB,
            )
        };
        // The blocking 1F1B schedule waits for both transfers of the
        // micro-batch: 2 · (activations / link + latency).
        let one = |gbps: f64| {
            2048.0 * 8192.0 * 2.0 / 8.0 / (gbps * 1e9 * CALIB.comm_eff) + CALIB.coll_lat_s
        };
        let plain = mk(1, 25.0);
        assert!((plain.breakdown.pp_p2p_s - 16.0 * 2.0 * one(25.0)).abs() < 1e-12);
        // Interleaved, a transfer of ~0.2 ms hides under a 4-layer chunk.
        assert_eq!(mk(3, 25.0).breakdown.pp_p2p_s, 0.0);
        // On a link slow enough to outlast a chunk's forward (but not its
        // backward), only the excess shows, once per chunk and micro-batch.
        let slow = mk(3, 0.02);
        let s = LayerCost {
            fwd: 0.01,
            bwd: 0.02,
            ..LayerCost::default()
        };
        assert_eq!(p2p_exposed(0.005, 1, &s), 0.01);
        assert_eq!(p2p_exposed(0.005, 2, &s), 0.0);
        assert!((p2p_exposed(0.008, 2, &s) - 2.0 * 0.003).abs() < 1e-15);
        assert!(slow.breakdown.pp_p2p_s > 0.0);
        assert!(slow.breakdown.pp_p2p_s < 16.0 * 2.0 * 3.0 * one(0.02));
    }

    #[test]
    fn weight_gradients_pay_their_fp32_accumulation_when_tokens_are_few() {
        let hw = Hw {
            peak: 989e12,
            eff: 0.65,
            attn: 335e12,
            hbm: 3.35e12,
            intra: 4.5e11,
            inter: 5e10,
            gpn: 8,
            hopper: true,
            nic_par: 1.0,
        };
        let c = CALIB;
        // A dense layer's wgrad (8192 tokens into a 4096x14336 weight) is
        // bound by its FLOPs ...
        let (m, n, k) = (8192.0, 14336.0, 4096.0);
        assert_eq!(wgrad_s(m, n, k, 4.0, &hw, &c), gemm_s(m, n, k, &hw, &c));
        // ... an expert's share of a micro-batch (256 tokens) by reading and
        // writing its fp32 main_grad (8 bytes per weight) and its inputs.
        let (m, n, k) = (256.0, 3072.0, 4096.0);
        let bytes = 8.0 * n * k + 2.0 * m * (n + k);
        assert!(bytes / hw.hbm > gemm_s(m, n, k, &hw, &c));
        assert_eq!(wgrad_s(m, n, k, 4.0, &hw, &c), bytes / hw.hbm);
        // bf16 gradient buffers move half the weight-sized bytes.
        assert!(wgrad_s(m, n, k, 2.0, &hw, &c) < wgrad_s(m, n, k, 4.0, &hw, &c));
        // In a MoE layer with few tokens per expert the backward exceeds
        // twice the forward GEMMs by the excess; a dense layer's does not.
        let v = serde_json::json!({"model":{"arch":"llama","layers":2,"hidden":4096,"heads":32,
            "kv_heads":4,"ffn":12288,"vocab":32000,"seq":1024,
            "moe":{"experts":128,"topk":8,"expert_ffn":1536,"moe_layers":1}},
            "cluster":{"gpu":"H100","gpus":8},
            "strategy":{"tp":1,"pp":1,"ep":8,"mbs":1,"gbs":8,"recompute":"none"}});
        let j = job_from_value(&v, &Fallback::default(), "t").unwrap();
        let hw = Hw::of(&j);
        for (i, moe) in [(0, false), (1, true)] {
            let (mods, _) = weight_modules(&j, i);
            let g: f64 = mods.iter().map(|w| w.gemm_s(&hw, &c)).sum();
            let wg: f64 = mods.iter().map(|w| w.wgrad_s(4.0, &hw, &c)).sum();
            assert_eq!(wg > g * (1.0 + 1e-9), moe, "layer {i}: {wg} vs {g}");
        }
    }

    #[test]
    fn recompute_modules_charge_what_megatron_reruns() {
        // Layer 0 dense, layer 1 MoE (with a shared expert); TP 2 without
        // expert TP, EP 4 over 8 GPUs; FlashAttention (core_attn costs no
        // time, as the default "selective" never did).
        let mk = |mods: Option<serde_json::Value>| {
            let mut v = serde_json::json!({"model":{"arch":"llama","layers":2,"hidden":4096,"heads":32,
                "kv_heads":8,"ffn":12288,"vocab":32000,"seq":4096,
                "moe":{"experts":16,"topk":2,"expert_ffn":1536,"shared_experts":1,"shared_ffn":2048,
                "moe_layers":1}},
                "cluster":{"gpu":"H100","gpus":8},
                "strategy":{"tp":2,"pp":1,"ep":4,"etp":1,"mbs":1,"gbs":4,"recompute":"selective"}});
            if let Some(m) = mods {
                v["strategy"]["recompute_modules"] = m;
            }
            job_from_value(&v, &Fallback::default(), "t").unwrap()
        };
        let c = CALIB;
        let def = mk(None);
        let hw = Hw::of(&def);
        let lc = |j: &Job, i| layer_cost(j, i, &hw, &c);
        // Megatron's default written out is the default.
        let core = mk(Some(serde_json::json!(["core_attn"])));
        for i in 0..2 {
            assert_eq!(lc(&core, i), lc(&def, i));
        }
        assert_eq!(iteration_flops(&core), iteration_flops(&def));
        assert_eq!(lc(&def, 1).recompute, 0.0);
        // `moe` re-runs the MoE layer's GEMMs (router, experts, shared
        // expert), its elementwise work and the dispatch and combine
        // all-to-alls; nothing in the dense layer.
        let moe = mk(Some(serde_json::json!(["moe"])));
        assert_eq!(lc(&moe, 0), lc(&def, 0));
        let (mods, n_attn) = weight_modules(&moe, 1);
        let g: f64 = mods[n_attn..].iter().map(|w| w.gemm_s(&hw, &c)).sum();
        let (m1, d1) = (lc(&moe, 1), lc(&def, 1));
        assert!(
            m1.recompute > g && m1.recompute < d1.fwd,
            "{} {g}",
            m1.recompute
        );
        assert!((m1.ep - d1.ep * 6.0 / 4.0).abs() < 1e-12 * d1.ep);
        assert_eq!(m1.tp, d1.tp); // etp 1: no TP collective inside the MoE layer
                                  // `mlp` re-runs the dense layer's MLP and its TP collectives only.
        let mlp = mk(Some(serde_json::json!(["mlp"])));
        assert_eq!(lc(&mlp, 1), lc(&def, 1));
        let (p0, d0) = (lc(&mlp, 0), lc(&def, 0));
        let g0: f64 = mods_gemm(&mlp, 0, &hw, &c);
        assert!(p0.recompute > g0 && p0.tp > d0.tp);
        assert!((p0.tp - d0.tp * 5.0 / 4.0).abs() < 1e-12 * d0.tp);
        // The small modules: cheaper than the MoE layer, and additive.
        let ln = lc(&mk(Some(serde_json::json!(["layernorm"]))), 1).recompute;
        let act = lc(&mk(Some(serde_json::json!(["moe_act"]))), 1).recompute;
        let both = lc(&mk(Some(serde_json::json!(["layernorm", "moe_act"]))), 1);
        assert!(ln > 0.0 && act > 0.0 && act + ln < m1.recompute);
        assert!((both.recompute - (ln + act)).abs() < 1e-15);
        assert_eq!((both.tp, both.ep), (d1.tp, d1.ep));
        // Hardware FLOPs: `moe` adds the MoE layer's forward matmuls (router,
        // top-k experts, shared expert: 2 FLOPs per parameter and token);
        // with core_attn left out, the attention core's are not counted.
        let (model, hwf) = iteration_flops(&moe);
        let (_, hw_def) = iteration_flops(&def);
        let (h, tokens) = (4096.0, 4.0 * 4096.0);
        let p_moe = 16.0 * h + 2.0 * 3.0 * h * 1536.0 + 3.0 * h * 2048.0;
        let attn = 4.0 * 4096.0 * 32.0 * 128.0 * 2.0; // both layers' cores
        let want = model + tokens * 2.0 * p_moe;
        assert!((hwf - want).abs() < 1e-9 * want, "{hwf} vs {want}");
        assert!((hw_def - (model + tokens * attn)).abs() < 1e-9 * hw_def);
    }

    #[test]
    fn moe_layers_without_expert_tp_skip_the_mlp_side_tp_collectives() {
        let mk = |etp: u64, shared: u64| {
            let v = serde_json::json!({"model":{"arch":"llama","layers":2,"hidden":4096,"heads":32,
                "kv_heads":8,"ffn":12288,"vocab":32000,"seq":4096,
                "moe":{"experts":16,"topk":2,"expert_ffn":1536,"shared_experts":shared,
                "shared_ffn":2048,"moe_layers":1}},
                "cluster":{"gpu":"H100","gpus":8},
                "strategy":{"tp":2,"pp":1,"ep":4,"etp":etp,"mbs":1,"gbs":4,"recompute":"none"}});
            job_from_value(&v, &Fallback::default(), "t").unwrap()
        };
        let hw = Hw::of(&mk(1, 0));
        let tp = |j: &Job, i| layer_cost(j, i, &hw, &CALIB).tp;
        let (e1, e2, sh) = (mk(1, 0), mk(2, 0), mk(1, 1));
        // Dense layer 0: both pairs; MoE layer 1 with etp 1: the attention's
        // pair only; with expert TP, or a TP-split shared expert, both.
        assert!(tp(&e1, 0) > 0.0 && (tp(&e1, 1) - tp(&e1, 0) / 2.0).abs() < 1e-15);
        assert_eq!(tp(&e2, 1), tp(&e2, 0));
        assert_eq!(tp(&sh, 1), tp(&sh, 0));
    }

    fn mods_gemm(j: &Job, i: usize, hw: &Hw, c: &Calib) -> f64 {
        let (mods, n_attn) = weight_modules(j, i);
        mods[n_attn..].iter().map(|w| w.gemm_s(hw, c)).sum()
    }

    #[test]
    fn zero3_gathers_twice_and_reduce_scatters_once_per_micro_batch() {
        let mk = |overlap: bool| {
            let v = serde_json::json!({"model":{"arch":"gpt","layers":24,"hidden":4096,"heads":32,"vocab":51200,"seq":2048},
                "cluster":{"gpu":"A100-80GB","gpus":64},"strategy":{"tp":1,"mbs":1,"gbs":128,"zero":3,
                "recompute":"full","overlap_grad_reduce":overlap}});
            let j = job_from_value(&v, &Fallback::default(), "t").unwrap();
            (predict_time(&j, &CALIB), j)
        };
        let (t, j) = mk(false);
        // 64 ranks over 8 nodes: reduce inside the node on NVLink (300 GB/s),
        // then 1/8 of the data per GPU across the 8 nodes on its NIC (25 GB/s).
        let (pd, pe) = mem_plan::layout::stage_params(&j.model, &layout(&j), 0);
        assert_eq!(pe, 0.0);
        let b = pd * 2.0;
        // (+ a ring's latency: one launch and 63 inter-node steps)
        let p16 = (7.0 / 8.0 * b / 300e9 + 7.0 / 8.0 * b / 8.0 / 25e9) / CALIB.comm_eff
            + CALIB.coll_lat_s
            + 63.0 * CALIB.ring_step_s;
        // 2 micro-batches, each: all-gather (forward), all-gather (recompute
        // + backward), reduce-scatter; nothing per iteration.
        let want = 2.0 * 3.0 * p16;
        assert!((t.breakdown.dp_comm_exposed_s - want).abs() < 1e-9 * want);
        // Prefetch can only hide traffic, never more than a phase lasts.
        let (o, _) = mk(true);
        assert!(o.breakdown.dp_comm_exposed_s < t.breakdown.dp_comm_exposed_s);
        let b = &o.breakdown;
        let c = (b.compute_s + b.recompute_s) / 2.0;
        assert!(b.dp_comm_exposed_s >= 2.0 * (3.0 * p16 - c) - 1e-9);
    }

    #[test]
    fn deepspeed_accumulates_gradients_in_a_pass_of_its_own() {
        let mk = |framework: &str, zero: u64, precision: &str| {
            let v = serde_json::json!({"framework":framework,
                "model":{"arch":"gpt","layers":24,"hidden":4096,"heads":32,"vocab":51200,"seq":2048},
                "cluster":{"gpu":"A100-80GB","gpus":64},"strategy":{"tp":2,"pp":4,"mbs":1,"gbs":64,
                "zero":zero,"recompute":"full","precision":precision,"overlap_grad_reduce":false}});
            let j = job_from_value(&v, &Fallback::default(), "t").unwrap();
            (predict_time(&j, &CALIB), j)
        };
        let (meg, j) = mk("Megatron-LM", 1, "fp16");
        let (ds, jd) = mk("Megatron-DeepSpeed", 1, "fp16");
        let (bf, jb) = mk("Megatron-DeepSpeed", 1, "bf16");
        let accum =
            |j: &Job| crate::input::unfused_grad_accum_bytes(j.deepspeed, j.strategy.zero, j.bf16);
        assert_eq!((accum(&j).0, accum(&jd).0, accum(&jb).0), (0.0, 6.0, 10.0));
        assert!(!accum(&jd).1 && accum(&jb).1);
        assert_eq!(accum(&mk("DeepSpeed", 3, "fp16").1).0, 0.0);
        // The pass follows the strategy's ZeRO stage, as `tune` sets it on a
        // copy of the job: at ZeRO 3 the DeepSpeed job pays no extra pass.
        let mut z3 = jd.clone();
        z3.strategy.zero = 3;
        let mut z3_meg = j.clone();
        z3_meg.strategy.zero = 3;
        z3_meg.strategy.grad_bytes = z3.strategy.grad_bytes;
        assert_eq!(
            predict_time(&z3, &CALIB).breakdown.compute_s,
            predict_time(&z3_meg, &CALIB).breakdown.compute_s
        );
        // DeepSpeed reduces gradients in the training dtype, Megatron its
        // fp32 main grads.
        assert_eq!((j.strategy.grad_bytes, jd.strategy.grad_bytes), (4.0, 2.0));
        // Every micro-batch on the pacing stage pays one pass over its
        // parameters, in the compute term; nothing else moves.
        // fp16: the first of the 8 micro-batches has nothing to add to.
        let micro = 64.0 / 8.0;
        let (pd, pe) = mem_plan::layout::stage_params(&jd.model, &layout(&jd), ds.stage);
        let want = (micro - 1.0) * (pd + pe) * 6.0 / 2039e9;
        let got = ds.breakdown.compute_s - meg.breakdown.compute_s;
        assert_eq!(ds.stage, meg.stage);
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        assert_eq!(ds.breakdown.recompute_s, meg.breakdown.recompute_s);
        assert!(bf.iter_s > ds.iter_s);
    }

    #[test]
    fn deepspeed_zero3_sends_each_shard_through_its_ranks_nic() {
        let mk = |framework: &str| {
            let v = serde_json::json!({"framework":framework,
                "model":{"arch":"gpt","layers":24,"hidden":4096,"heads":32,"vocab":51200,"seq":2048},
                "cluster":{"gpu":"A100-80GB","gpus":64},"strategy":{"tp":1,"mbs":1,"gbs":128,"zero":3,
                "recompute":"full","overlap_grad_reduce":false}});
            let j = job_from_value(&v, &Fallback::default(), "t").unwrap();
            (predict_time(&j, &CALIB), j)
        };
        let (fsdp, j) = mk("PyTorch FSDP");
        let (ds, jd) = mk("DeepSpeed");
        assert!(!j.strategy.z3_rank_nic && jd.strategy.z3_rank_nic);
        // 64 ranks on 8 nodes: NVLink stage, then all 7/8 of the buffer
        // through the rank's own NIC (not 1/8 of it through each of eight).
        let (pd, _) = mem_plan::layout::stage_params(&j.model, &layout(&j), 0);
        let b = pd * 2.0;
        let p16 = (7.0 / 8.0 * b / 300e9 + 7.0 / 8.0 * b / 25e9) / CALIB.comm_eff
            + CALIB.coll_lat_s
            + 63.0 * CALIB.ring_step_s;
        let want = 2.0 * 3.0 * p16;
        assert!((ds.breakdown.dp_comm_exposed_s - want).abs() < 1e-9 * want);
        assert!(ds.breakdown.dp_comm_exposed_s > 4.0 * fsdp.breakdown.dp_comm_exposed_s);
    }

    #[test]
    fn torchtitan_selective_recompute_reruns_half_the_matmuls() {
        let mk = |framework: &str, rc: &str| {
            let v = serde_json::json!({"framework":framework,
                "model":{"arch":"llama","layers":8,"hidden":4096,"heads":32,"kv_heads":8,"ffn":14336,
                "vocab":128256,"seq":8192},"cluster":{"gpu":"H100","gpus":8},
                "strategy":{"tp":1,"mbs":1,"gbs":8,"zero":3,"recompute":rc}});
            let j = job_from_value(&v, &Fallback::default(), "t").unwrap();
            let hw = Hw::of(&j);
            (layer_cost(&j, 0, &hw, &CALIB), j)
        };
        let (mega, _) = mk("Megatron-Core", "selective");
        let (tt, j) = mk("torchtitan", "selective");
        let (full, _) = mk("torchtitan", "full");
        assert!(j.strategy.sac_op);
        // Flash attention under Megatron's selective policy: nothing re-runs.
        assert_eq!(mega.recompute, 0.0);
        let hw = Hw::of(&j);
        let gemm: f64 = weight_modules(&j, 0)
            .0
            .iter()
            .map(|w| w.gemm_s(&hw, &CALIB))
            .sum();
        let (af, _) = attn_core(&j, &hw, &CALIB);
        let elem = full.fwd - gemm - af;
        assert!((tt.recompute - (0.5 * gemm + elem)).abs() < 1e-12);
        assert!(tt.recompute > 0.4 * full.recompute && tt.recompute < 0.6 * full.recompute);
    }

    #[test]
    fn expert_bias_adds_its_fp32_passes_to_moe_layers_only() {
        let mk = |bias: bool| {
            let v = serde_json::json!({"model":{"arch":"llama","layers":4,"hidden":2880,"heads":64,
                "kv_heads":8,"head_dim":64,"ffn":2880,"vocab":32000,"seq":4096,
                "moe":{"experts":128,"topk":4,"expert_ffn":2880,"moe_layers":2,"expert_bias":bias}},
                "cluster":{"gpu":"H100","gpus":8},
                "strategy":{"tp":1,"pp":1,"ep":8,"mbs":1,"gbs":8,"recompute":"none"}});
            job_from_value(&v, &Fallback::default(), "t").unwrap()
        };
        let (plain, biased) = (mk(false), mk(true));
        let hw = Hw::of(&plain);
        // A dense layer (the first) is untouched; a MoE layer pays 28 bytes
        // forward and 36 backward per routed token copy and hidden unit.
        let d0 = layer_cost(&plain, 0, &hw, &CALIB);
        let d1 = layer_cost(&biased, 0, &hw, &CALIB);
        assert_eq!((d0.fwd, d0.bwd), (d1.fwd, d1.bwd));
        let e0 = layer_cost(&plain, 3, &hw, &CALIB);
        let e1 = layer_cost(&biased, 3, &hw, &CALIB);
        let n = 4096.0 * 4.0 * 2880.0 / hw.hbm;
        assert!((e1.fwd - e0.fwd - 28.0 * n).abs() < 1e-12);
        assert!((e1.bwd - e0.bwd - 36.0 * n).abs() < 1e-12);
        let v = serde_json::json!({"model":{"layers":2,"hidden":64,"heads":4,"vocab":100,"seq":64,
            "moe":{"experts":4,"topk":2,"expert_bias":1}},"strategy":{"tp":1}});
        assert!(job_from_value(&v, &Fallback::default(), "t").is_err());
    }

    #[test]
    fn deepep_sends_a_token_once_per_remote_node() {
        let c = Calib {
            coll_lat_s: 0.0,
            ..CALIB
        };
        let hw = Hw {
            intra: 450e9,
            inter: 50e9,
            gpn: 8,
            ..Hw::of(&gpt_job(2, 1024, 8, 8, "none"))
        };
        // EP 32 over 4 nodes, 128 experts (32 per node), top-8.
        let g = hw.group(1, 32);
        let (tok, row) = (4096.0, 8192.0);
        let miss: f64 = (0..8)
            .map(|i| (96.0 - i as f64) / (128.0 - i as f64))
            .product();
        let net = tok * row * 3.0 * (1.0 - miss) / 50e9 / c.comm_eff;
        assert!((g.deepep_s(tok, row, 8.0, 128.0, &c) - net).abs() < 1e-12);
        // NCCL's all-to-all sends all 8 copies, 3/4 of them off the node.
        let a2a = g.alltoall_s(tok * 8.0 * row, &c);
        assert!((a2a - tok * 8.0 * row * 0.75 / 50e9 / c.comm_eff).abs() < 1e-12);
        assert!(net < 0.5 * a2a);
        // Inside one node there is nothing to deduplicate.
        let n8 = hw.group(1, 8);
        assert_eq!(
            n8.deepep_s(tok, row, 8.0, 128.0, &c),
            n8.alltoall_s(tok * 8.0 * row, &c)
        );
    }

    #[test]
    fn zero3_schedule_is_bound_by_traffic_or_by_compute() {
        let mk = |inter: f64| {
            let v = serde_json::json!({"model":{"arch":"gpt","layers":24,"hidden":4096,"heads":32,"vocab":51200,"seq":2048},
                "cluster":{"gpu":"A100-80GB","gpus":64,"inter_node_gbps":inter,"intra_node_gbps":inter.max(300.0)},
                "strategy":{"tp":1,"mbs":1,"gbs":128,"zero":3,"recompute":"full","overlap_grad_reduce":true}});
            let j = job_from_value(&v, &Fallback::default(), "t").unwrap();
            (predict_time(&j, &Z0), j)
        };
        // A 0.25 GB/s link: the link never rests, so a micro-batch lasts its
        // traffic. Per micro-batch (tp 1, 2-byte weights): the forward gathers
        // the embedding E, 24 layers of 12h² (QKV 3h², proj h², fc1 4h²,
        // fc2 4h²) and the tied head V·h; the backward the head, the 24
        // layers (once for recompute + backward) and the embedding; gradients
        // of the layers and the embedding are reduce-scattered once.
        let (t, j) = mk(0.25);
        let (h, v) = (4096.0, 51200.0);
        let layers = 24.0 * 12.0 * h * h;
        let e = j.model.embedding_params() as f64;
        let elems = 2.0 * (e + layers + v * h) + (layers + e);
        let per_byte = (7.0 / 8.0 / 300e9 + 7.0 / 64.0 / 0.25e9) / Z0.comm_eff;
        let link = elems * 2.0 * per_byte;
        let b = &t.breakdown;
        let per_mb = (b.compute_s + b.recompute_s + b.dp_comm_exposed_s) / 2.0;
        assert!(per_mb >= link * (1.0 - 1e-12), "{per_mb} vs {link}");
        assert!(per_mb < link * 1.002, "{per_mb} vs {link}");
        // Fast links: only the first gather and the last reduce-scatter
        // (the embedding's, tiny here) are left in the open.
        let (f, _) = mk(1e6);
        let busy = f.breakdown.compute_s + f.breakdown.recompute_s;
        assert!(f.breakdown.dp_comm_exposed_s < 1e-3 * busy);
    }

    #[test]
    fn allgather_context_parallelism_is_exposed() {
        let mk = |cp_comm: &str| {
            let v = serde_json::json!({"model":{"arch":"llama","layers":8,"hidden":8192,"heads":64,"kv_heads":8,
                "ffn":28672,"vocab":128256,"seq":65536},"cluster":{"gpu":"H100","gpus":64},
                "strategy":{"tp":8,"cp":8,"mbs":1,"gbs":2,"recompute":"selective","cp_comm":cp_comm}});
            predict_time(
                &job_from_value(&v, &Fallback::default(), "t").unwrap(),
                &CALIB,
            )
        };
        // Per layer and micro-batch: K and V of 65536/8 tokens, one KV head
        // per TP rank, 128 wide, 2 bytes; all-gathered over 8 ranks on the
        // NIC (stride 8) forward, reduce-scattered backward.
        let kv = 8192.0 * 2.0 * 128.0 * 2.0;
        let ag = 7.0 / 8.0 * kv * 8.0 / (50e9 * CALIB.comm_eff)
            + CALIB.coll_lat_s
            + 7.0 * CALIB.ring_step_s;
        let want = 2.0 * 8.0 * 2.0 * ag; // 2 micro-batches, 8 layers
        let got = mk("allgather").breakdown.cp_comm_s;
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        // The ring hides the same traffic under the attention at this length.
        assert_eq!(mk("ring").breakdown.cp_comm_s, 0.0);
    }
}
