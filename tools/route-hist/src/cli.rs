//! route-hist's command line: the flags and the checks that need no input.

use clap::Parser;
use ftk::routing::Skew;
use ftk::Result;
use std::path::PathBuf;

pub(crate) const AFTER_HELP: &str = "\
Output: one JSON line per (layer, step), in step then layer order:
  {\"kind\":\"route_hist\",\"layer\",\"step\",\"experts\",\"topk\",\"tokens\",\"counts\":[per expert],
   \"ep\",\"rank_counts\":[per EP rank],\"max_vio\",\"a2a\":[[src rank][dst rank]],\"dropped\"}
  counts      (token, expert) pairs routed to each expert (demand, before any drop)
  rank_counts token copies each EP rank receives; experts sit on ranks contiguously
  max_vio     (max(counts) - mean) / mean, mean = tokens*topk/experts
  a2a         token copies sent from source rank i to the rank holding the expert
              (one copy per (token, expert) pair, as Megatron's all-to-all dispatcher sends)
  dropped     only with --capacity-factor: pairs over Megatron's per-micro-batch capacity
              ceil(tokens*topk/experts * factor), counted per record / source-rank block

Inputs (files or - for stdin; the format is detected from the first bytes):
  JSON lines   {\"kind\":\"route\",\"layer\":L,\"step\":S,\"rank\":R,\"topk\":[[e,e],...]}, one per
               micro-batch, layer and source rank; other kinds are skipped. Rank R sends as
               EP-local rank R mod --ep. Groups are written when a later step begins (constant
               memory); --unordered holds them all until the end.
  safetensors  integer 'layer.{L}.topk' [tokens,k] or float 'layer.{L}.logits' [tokens,experts]
               (softmax then top-k as Mixtral routes; ties go to the lower expert index).
               Tokens split into --ep contiguous source-rank blocks. Step: the file's
               __metadata__ \"step\", else --step plus the file's position on the command line.

Examples:
  route-hist --synthetic zipf:1.2 --tokens 65536 --experts 8 --topk 2 --layers 4 --ep 4 --seed 1
  route-hist --experts 64 --ep 8 trace.jsonl | jq -c '{layer, max_vio}'
  route-hist --model mixtral/config.json --ep 8 --capacity-factor 1.25 router_logits.safetensors
  route-hist --synthetic hot:0.3 --model config.json --tokens 32768 --table";

/// Routing traces -> per-expert and per-EP-rank token histograms.
#[derive(Parser, Debug)]
#[command(name = "route-hist", version, about, after_help = AFTER_HELP)]
pub struct Args {
    /// Trace files (JSON lines or safetensors); '-' or nothing reads stdin.
    pub inputs: Vec<PathBuf>,
    /// Generate routing instead of reading a trace: uniform, zipf:S, dirichlet:A or hot:F.
    #[arg(long, value_name = "SKEW")]
    pub synthetic: Option<Skew>,
    /// Tokens per (layer, step) across all source ranks (synthetic).
    #[arg(long, value_name = "N")]
    pub tokens: Option<u64>,
    /// Routed experts per layer (needed for top-k traces unless --model gives it).
    #[arg(long, value_name = "E")]
    pub experts: Option<usize>,
    /// Experts per token (needed for logits and synthetic unless --model gives it).
    #[arg(long, value_name = "K")]
    pub topk: Option<usize>,
    /// Layers to generate (synthetic; default: the model's MoE layers, else 1).
    #[arg(long, value_name = "L")]
    pub layers: Option<u64>,
    /// Steps to generate (synthetic).
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub steps: u64,
    /// Hugging Face config.json supplying experts and top-k.
    #[arg(long, value_name = "CONFIG")]
    pub model: Option<PathBuf>,
    /// Expert-parallel ranks; experts are placed on them contiguously.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ep: usize,
    /// Report tokens dropped at this capacity factor (Megatron's capacity rule).
    #[arg(long, value_name = "F")]
    pub capacity_factor: Option<f64>,
    /// Step number for a safetensors trace without a "step" metadata entry.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub step: u64,
    /// Hold every (layer, step) until the end of input (for traces not sorted by step).
    #[arg(long)]
    pub unordered: bool,
    /// Seed for --synthetic.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print an aligned table for people instead of JSON lines.
    #[arg(long)]
    pub table: bool,
    /// Where to count top-k traces: cpu, auto (CUDA when a GPU is present), cuda or cuda:N.
    /// The default stays cpu until the CUDA path has been checked on a GPU.
    #[arg(long, default_value = "cpu")]
    pub device: ftk::device::DeviceArg,
}

impl Args {
    /// Flag checks that need no input.
    pub fn check(&self) -> Result<()> {
        if let Some(f) = self.capacity_factor {
            if !(f.is_finite() && f > 0.0) {
                ftk::bail!("--capacity-factor must be a positive number, got {f}");
            }
        }
        if self.ep == 0 {
            ftk::bail!("--ep must be at least 1");
        }
        Ok(())
    }
}
