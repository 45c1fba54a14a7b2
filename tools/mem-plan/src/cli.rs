//! mem-plan's command line: the flags and the checks that need no file.

use crate::plan::DenseAct;
use clap::Parser;
use ftk::mact::MactArgs;
use ftk::Result;
use std::path::PathBuf;

pub(crate) const AFTER_HELP: &str = "\
Reads route_hist records (from route-hist) on stdin when it is not a terminal, or from
--hist; without them routing is uniform (every EP rank receives b·s·topk token copies).
Histogram layer L is the model's L-th MoE layer; counts are re-placed on this plan's EP
ranks and scaled to ep·b·s tokens; each rank keeps its worst step; MoE layers without a
histogram take the worst measured layer.

The model (MemFine, arXiv 2511.21431, eqs. 1-3, 8, 9, Table 2; symbols as in the paper):
  static   Ψ·(2 + 2 + 12) bytes: bf16 weights and grads, fp32 master + Adam m, v (ZeRO
           paper's 16Ψ); --zero 1/2/3 shards optimizer/grads/weights over DP×CP (experts:
           DP×CP/EP); experts E/ep per rank; everything but routers sharded by t
  act.full     D_t b [s(5h + a h_d + 2k_a h_d + e_n) + s'(2h + 2g_e)]/(tc)   (eq. 2, m_g = 1)
  act.chunked  the same with the s' term divided by C (FCDA)
  act.none     m_g/v × act.full, m_g = vp + p − 2r_pp − 1 micro-batches in flight
  ckpt     layer inputs kept under recompute: (m_g/v)·l·D_t b s h/(tc)
  peak     static + ckpt + act.chunked, fits if ≤ α·device memory
  MACT     s'_max = (α M − static − ckpt − s-term)/(D_t b (2h+2g_e)/(tc)) per stage (eq. 8),
           C = ceil(s'/s'_max) rounded up to a bin (eq. 9), shared by the layer's EP ranks

Output: one {\"kind\":\"mem_plan\",\"layer\",\"moe_layer\",\"stage\",\"rank\",\"tokens_received\",
\"static_bytes\" (whole GPU),\"layer_static_bytes\",\"ckpt_bytes\",\"act_bytes\":{\"none\",\"full\",\"chunked\"},\"chunks\",\"peak_bytes\",
\"fits\"} per MoE layer and EP rank, then one {\"kind\":\"mem_plan_summary\",...} with per-stage
peaks, s_max, the chosen chunks, the dominant term and why. Exit 1 when no chunk count fits.

Examples:
  mem-plan --model mixtral/config.json --ep 8 --dp 8 --seq 4096 --device-mem 80GB
  route-hist --synthetic zipf:1.2 --model cfg.json --tokens 32768 --ep 8 \\
    | mem-plan --model cfg.json --ep 8 --dp 8 --device-mem 24GiB --table
  mem-plan --model deepseek-v3/config.json --ep 32 --dp 32 --tokens-received 600000 --chunks 8";

/// MemFine memory model: static + activation memory per MoE layer and EP rank; MACT chunk choice.
#[derive(Parser, Debug)]
#[command(name = "mem-plan", version, about, after_help = AFTER_HELP)]
pub struct Args {
    /// Hugging Face config.json (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, Llama, GPT-2) or ftk model JSON.
    #[arg(long, value_name = "CONFIG")]
    pub model: PathBuf,
    /// route_hist records ('-' for stdin; default: stdin when it is not a terminal).
    #[arg(long, value_name = "FILE")]
    pub hist: Option<PathBuf>,
    /// Ignore stdin and assume uniform routing.
    #[arg(long, conflicts_with = "hist")]
    pub uniform: bool,
    /// Tensor-parallel size t (also shards the experts: expert TP = TP).
    #[arg(long, default_value_t = 1)]
    pub tp: u64,
    /// Pipeline-parallel size p.
    #[arg(long, default_value_t = 1)]
    pub pp: u64,
    /// Expert-parallel size e; experts sit on EP ranks contiguously.
    #[arg(long, default_value_t = 1)]
    pub ep: u64,
    /// Context-parallel size c.
    #[arg(long, default_value_t = 1)]
    pub cp: u64,
    /// Data-parallel size d (EP groups form inside DP × CP, as in Megatron-LM).
    #[arg(long, default_value_t = 1)]
    pub dp: u64,
    /// Virtual pipeline stages per GPU (interleaved 1F1B).
    #[arg(long, default_value_t = 1)]
    pub vpp: u64,
    /// Micro-batch size b.
    #[arg(long, default_value_t = 1)]
    pub micro_batch: u64,
    /// Sequence length s.
    #[arg(long, default_value_t = 4096)]
    pub seq: u64,
    /// Activation and weight precision.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "fp16", "fp32"])]
    pub dtype: String,
    /// Keep gradients in fp32 (Megatron's --accumulate-allreduce-grads-in-fp32).
    #[arg(long)]
    pub grad_fp32: bool,
    /// Optimizer states: adam (fp32 m and v) or sgd (one fp32 momentum buffer).
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd"])]
    pub optimizer: String,
    /// ZeRO stage: 1 shards optimizer states (Megatron's distributed optimizer), 2 also gradients, 3 also weights.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3))]
    pub zero: u64,
    /// MACT: --device-mem (enables MACT and `fits`), --alpha, --chunk-bins.
    #[command(flatten)]
    pub mact: MactArgs,
    /// Report this chunk count instead of choosing one.
    #[arg(long, value_name = "C")]
    pub chunks: Option<u64>,
    /// Set s' (token copies every MoE layer's EP rank receives) directly.
    #[arg(long, value_name = "N", conflicts_with = "hist")]
    pub tokens_received: Option<f64>,
    /// Dense-layer activation model.
    #[arg(long, value_enum, default_value = "memfine")]
    pub dense_act: DenseAct,
    /// Sequence parallelism (Korthikanti dense model; MemFine's terms always divide by t).
    #[arg(long)]
    pub sequence_parallel: bool,
    /// Print aligned tables for people instead of JSON lines.
    #[arg(long)]
    pub table: bool,
}

impl Args {
    /// Flag checks that need no file.
    pub fn check(&self) -> Result<()> {
        self.mact.check()?;
        if self.chunks == Some(0) {
            ftk::bail!("--chunks must be at least 1");
        }
        if self.micro_batch == 0 || self.seq == 0 {
            ftk::bail!("--micro-batch and --seq must be at least 1");
        }
        if let Some(n) = self.tokens_received {
            if !(n.is_finite() && n >= 0.0) {
                ftk::bail!("--tokens-received must be a non-negative number, got {n}");
            }
        }
        if !self.seq.is_multiple_of(self.cp) {
            ftk::bail!("--seq {} must be divisible by --cp {}", self.seq, self.cp);
        }
        Ok(())
    }

    /// Bytes per activation and weight element.
    pub fn dtype_bytes(&self) -> f64 {
        match self.dtype.as_str() {
            "fp32" => 4.0,
            _ => 2.0,
        }
    }
}
