//! chunk-run's command line: the flags and the checks that need no file.

use clap::Parser;
use ftk::device::DeviceArg;
use ftk::mact::MactArgs;
use ftk::recompute::Recompute;
use ftk::routing::Skew;
use ftk::Result;
use std::path::PathBuf;

pub(crate) const AFTER_HELP: &str = "\
Each step runs forward and backward through --layers Mixtral-style MoE blocks (y = x + MoE(x))
with loss = Σ y·dy, and prints one record:
  {\"kind\":\"chunk_run\",\"step\",\"recompute\",\"chunks\",\"chunks_per_layer\",\"layers\",\"tokens\",
   \"max_expert_tokens\",\"peak_act_bytes\",\"predicted_act_bytes\",\"peak_bytes\",\"device\",\"dtype\",
   \"device_reserved_bytes\" (CUDA),\"fwd_ms\",\"bwd_ms\",\"step_ms\",\"tokens_per_s\",\"loss\"}
Memory is measured by a counting allocator: peak_bytes is the heap high-water mark, and
peak_act_bytes that mark minus what was live before the step (weights, gradient buffers,
x and dy). predicted_act_bytes is mem-plan's itemised model of the same run. On CUDA
(--device cuda) the same is counted over device buffers (like PyTorch's
max_memory_allocated), and device_reserved_bytes is what the driver reports in use after
the step (cuMemGetInfo) minus what it reported before the first step.

Recompute modes:
  none        keep every activation
  full        keep each block's input; recompute the block in backward
  chunked:C   MemFine FCDA: route once, then dispatch -> experts -> combine C token chunks at
              a time; backward recomputes and back-propagates chunk by chunk
  auto        MACT: per layer, C = ceil(s''/s'_max) rounded up to --chunk-bins, s'_max from
              mem-plan's model for --device-mem × --alpha

Weights: --weights FILE with transformers' names under --prefix ('{l}' becomes the layer):
gate.weight [E,h] and experts.{e}.w1/w2/w3.weight, or transformers 5's fused
experts.gate_up_proj [E,2f,h] and experts.down_proj [E,h,f]. --input FILE holds x and dy [T,h].
Without them, seeded N(0, 0.02²) weights and N(0,1) inputs of the given shape.
--grads-out writes y, grad.x and grad.[layers.{l}.]gate.weight / experts.{e}.w1.weight ...

Examples:
  chunk-run --hidden 1024 --ffn 2816 --experts 8 --topk 2 --tokens 4096 --layers 4 \\
            --synthetic hot:0.45 --recompute none,full,chunked:4 --table
  chunk-run --model mixtral/config.json --hidden 512 --ffn 1024 --recompute auto --device-mem 2GiB
  chunk-run --weights layer.safetensors --input x.safetensors --topk 2 --grads-out grads.safetensors
  chunk-run --device cuda --dtype bf16 --hidden 4096 --ffn 14336 --experts 8 --topk 2 \
            --tokens 16384 --recompute none,chunked:4 --table";

/// A real MoE training step with none / full / chunked (FCDA) / auto (MACT) recompute.
#[derive(Parser, Debug)]
#[command(name = "chunk-run", version, about, after_help = AFTER_HELP)]
pub struct Args {
    /// Block weights (safetensors, transformers' names).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Tensor-name prefix of a block inside --weights; '{l}' is replaced by the layer index.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// x and dy [tokens, hidden] (safetensors).
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Hugging Face config.json for the shape (hidden, expert FFN, experts, top-k).
    #[arg(long, value_name = "CONFIG")]
    pub model: Option<PathBuf>,
    /// Hidden size h of the residual stream.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Expert FFN (intermediate) size.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Routed experts per block.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts each token is routed to.
    #[arg(long)]
    pub topk: Option<usize>,
    /// Tokens per step (ignored with --input).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Stacked MoE blocks [default: every consecutive '{l}' block of --weights from 0,
    /// else 1]. Fewer than the file holds runs the first N.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Renormalise the top-k weights (Mixtral: true; Qwen2-MoE style: false).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub norm_topk_prob: Option<bool>,
    /// none, full, chunked:C or auto; a comma list runs each mode in turn (side by side with --table).
    #[arg(long, default_value = "full", value_parser = parse_recompute, value_delimiter = ',')]
    pub recompute: Vec<Recompute>,
    /// Force routing to a skew: uniform, zipf:S, dirichlet:A or hot:F (router weights still weigh the experts).
    #[arg(long, value_name = "SKEW", conflicts_with = "route")]
    pub synthetic: Option<Skew>,
    /// Force routing to follow route_hist records (layer L's counts drive block L).
    #[arg(long, value_name = "FILE")]
    pub route: Option<PathBuf>,
    /// MACT (--recompute auto): --device-mem, --alpha, --chunk-bins.
    #[command(flatten)]
    pub mact: MactArgs,
    /// Seed for the random weights and inputs and for --synthetic/--route routing.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps to run (one record each).
    #[arg(long, default_value_t = 1)]
    pub steps: u64,
    /// Write y and every gradient of the last step here (safetensors, atomic).
    #[arg(long, value_name = "FILE")]
    pub grads_out: Option<PathBuf>,
    /// Where the step runs: auto (CUDA when a GPU is present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Expert weights and activations: f32, or bf16 (CUDA only; f32 accumulation,
    /// f32 router, residual stream and weight gradients).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print an aligned table instead of JSON lines.
    #[arg(long)]
    pub table: bool,
    /// Leave the timing fields (fwd_ms, bwd_ms, step_ms, tokens_per_s) out
    /// of the records, so that the same inputs give the same bytes.
    #[arg(long)]
    pub no_timing: bool,
    /// No progress bar on stderr (it shows only when stderr is a terminal).
    #[arg(long)]
    pub quiet: bool,
}

/// chunk-run's modes: every [`Recompute`] but selective (the blocks have no
/// attention core to drop).
fn parse_recompute(s: &str) -> ftk::Result<Recompute> {
    match s.parse::<Recompute>() {
        Ok(Recompute::Selective) | Err(_) => Err(ftk::Error::input(format!(
            "'{s}': use none, full, chunked:C (C >= 1) or auto"
        ))),
        Ok(m) => Ok(m),
    }
}

impl Args {
    /// The number of stacked blocks (`run` fills it from --weights when not given).
    pub fn layers(&self) -> usize {
        self.layers.unwrap_or(1)
    }

    /// Flag checks that need no file.
    pub fn check(&self) -> Result<()> {
        if self.layers == Some(0) || self.steps == 0 {
            ftk::bail!("--layers and --steps must be at least 1");
        }
        self.mact.check()?;
        if self.recompute.contains(&Recompute::Auto) && self.mact.device_mem.is_none() {
            ftk::bail!(
                "--recompute auto needs --device-mem (MACT sizes chunks to a memory budget)"
            );
        }
        Ok(())
    }

    /// Bytes per expert activation element.
    pub fn elem_bytes(&self) -> f64 {
        if self.dtype == "bf16" {
            2.0
        } else {
            4.0
        }
    }
}
