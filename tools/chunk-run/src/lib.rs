//! chunk-run: a real MoE training step (router, top-k, SwiGLU experts,
//! forward + backward) under none / full / chunked (MemFine FCDA) / auto
//! (MACT) recompute, with MEASURED peak memory and throughput.

pub use ftk::linalg;
pub mod gpu;
pub mod moe;
pub mod sizes;
pub mod stack;
pub mod weights;

use clap::Parser;
use ftk::cli::Stdout;
use ftk::device::{Device, DeviceArg};
use ftk::model::ModelConfig;
use ftk::size::parse_size;
use ftk::table::Table;
use ftk::tensors::TensorFile;
use ftk::{Error, Result};
use mem_plan::memory::{block_peak_act, block_s_prime_max, BlockDims, BlockMode};
use moe::{LayerT, LayerW, Shape};
use route_hist::synth::{LayerModel, Skew};
use serde::Serialize;
use stack::{AutoCfg, CpuEngine, Engine, Recompute, StepCfg};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Each step runs forward and backward through --layers Mixtral-style MoE blocks (y = x + MoE(x))
with loss = Σ y·dy, and prints one record:
  {\"kind\":\"chunk_run\",\"step\",\"recompute\",\"chunks\",\"chunks_per_layer\",\"layers\",\"tokens\",
   \"max_expert_tokens\",\"peak_act_bytes\",\"predicted_act_bytes\",\"peak_bytes\",\"fwd_ms\",\"bwd_ms\",
   \"step_ms\",\"tokens_per_s\",\"loss\"}
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
    /// Hidden size h (default: --weights, else --model).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Expert FFN (intermediate) size.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Number of experts E (default: --weights, else --model).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token k (default: --weights' metadata "topk", else --model).
    #[arg(long)]
    pub topk: Option<usize>,
    /// Tokens per step (ignored with --input).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Stacked MoE blocks (default: with --weights, every block the prefix
    /// '{l}' finds in the file; else 1).
    #[arg(long = "layers", value_name = "N")]
    pub layers_arg: Option<usize>,
    /// The resolved layer count (set by [`run`]).
    #[arg(skip)]
    pub layers: usize,
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
    /// Device memory for auto (MACT), e.g. 2GiB.
    #[arg(long, value_name = "SIZE", value_parser = |s: &str| parse_size(s).map_err(|e| e.to_string()))]
    pub device_mem: Option<u64>,
    /// MACT's safety factor: the budget is --device-mem × alpha.
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// Chunk counts MACT may choose (the smallest that fits is taken).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub chunk_bins: Vec<u64>,
    /// Seed for random weights, inputs and --synthetic routing.
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

fn parse_recompute(s: &str) -> std::result::Result<Recompute, String> {
    match s {
        "none" => Ok(Recompute::None),
        "full" => Ok(Recompute::Full),
        "auto" => Ok(Recompute::Auto),
        _ => match s.strip_prefix("chunked:").map(str::parse::<usize>) {
            Some(Ok(c)) if c >= 1 => Ok(Recompute::Chunked(c)),
            _ => Err(format!("'{s}': use none, full, chunked:C (C >= 1) or auto")),
        },
    }
}

fn mode_name(m: Recompute) -> &'static str {
    match m {
        Recompute::None => "none",
        Recompute::Full => "full",
        Recompute::Chunked(_) => "chunked",
        Recompute::Auto => "auto",
    }
}

#[derive(Serialize)]
struct Record {
    kind: &'static str,
    step: u64,
    recompute: &'static str,
    chunks: usize,
    chunks_per_layer: Vec<usize>,
    layers: usize,
    tokens: usize,
    max_expert_tokens: usize,
    peak_act_bytes: u64,
    predicted_act_bytes: u64,
    peak_bytes: u64,
    device: String,
    dtype: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_reserved_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fwd_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bwd_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
    loss: f64,
}

fn resolve_shape(a: &Args, wfile: Option<&TensorFile>, tokens: usize) -> Result<Shape> {
    let model = a.model.as_deref().map(ModelConfig::from_file).transpose()?;
    let moe = model.as_ref().and_then(|m| m.moe.clone());
    if let (Some(m), None) = (&model, &moe) {
        ftk::bail!(
            "{}: model '{}' has no experts",
            a.model.as_ref().unwrap().display(),
            m.arch
        );
    }
    let from_file = match wfile {
        Some(f) => Some(weights::infer_shape(
            f,
            &weights::layer_prefix(&a.prefix, 0),
        )?),
        None => None,
    };
    let pick = |flag: Option<usize>,
                file: Option<usize>,
                cfg: Option<usize>,
                name: &str|
     -> Result<usize> {
        let v = file.or(flag).or(cfg).ok_or_else(|| {
            Error::input(format!(
                "--{name} is needed (or --model config.json / --weights)"
            ))
        })?;
        if let (Some(fl), Some(fi)) = (flag, file) {
            if fl != fi {
                ftk::bail!("--{name} {fl} disagrees with the weights file ({fi})");
            }
        }
        if v == 0 {
            ftk::bail!("--{name} must be at least 1");
        }
        Ok(v)
    };
    let m = model.as_ref();
    let hidden = pick(
        a.hidden,
        from_file.map(|x| x.0),
        m.map(|m| m.hidden as usize),
        "hidden",
    )?;
    let ffn = pick(
        a.ffn,
        from_file.map(|x| x.1),
        moe.as_ref().map(|x| x.expert_ffn as usize),
        "ffn",
    )?;
    let experts = pick(
        a.experts,
        from_file.map(|x| x.2),
        moe.as_ref().map(|x| x.experts as usize),
        "experts",
    )?;
    // A weights file may say its top-k in the metadata (ftk's and some
    // exporters' "topk" / transformers' "num_experts_per_tok").
    let file_topk = wfile.and_then(|f| {
        let m = f.metadata()?;
        m.get("topk")
            .or_else(|| m.get("num_experts_per_tok"))
            .and_then(|v| v.parse::<usize>().ok())
    });
    let topk = pick(
        a.topk,
        file_topk,
        moe.as_ref().map(|x| x.topk as usize),
        "topk",
    )?;
    if topk > experts {
        ftk::bail!("--topk {topk} exceeds the {experts} experts");
    }
    let norm_topk_prob = a
        .norm_topk_prob
        .or(moe.as_ref().map(|x| x.norm_topk_prob))
        .unwrap_or(true);
    Ok(Shape {
        tokens,
        hidden,
        ffn,
        experts,
        topk,
        norm_topk_prob,
    })
}

/// Forced routing for every layer: [T·k] expert ids each.
fn forced_routing(a: &Args, sh: &Shape) -> Result<Option<Vec<Vec<u32>>>> {
    let models: Vec<LayerModel> = if let Some(skew) = a.synthetic {
        (0..a.layers)
            .map(|l| LayerModel::new(skew, sh.experts, a.seed, l as u64))
            .collect()
    } else if let Some(p) = &a.route {
        let input = ftk::io::Input::open(p)?;
        let mut r = ftk::jsonl::Reader::new(input.name.clone(), input.reader);
        let mut by_layer: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
        while let Some(v) = r.next_record::<serde_json::Value>()? {
            if v["kind"] != "route_hist" {
                continue;
            }
            let counts: Vec<f64> = v["counts"]
                .as_array()
                .map(|c| c.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            if counts.len() != sh.experts {
                ftk::bail!(
                    "{}: histogram has {} counts but the block has {} experts",
                    r.here(),
                    counts.len(),
                    sh.experts
                );
            }
            let layer = v["layer"].as_u64().ok_or_else(|| {
                Error::input(format!("{}: route_hist record has no 'layer'", r.here()))
            })?;
            by_layer.entry(layer).or_insert(counts);
        }
        if by_layer.is_empty() {
            ftk::bail!("{}: no route_hist records", input.name);
        }
        let layers: Vec<&Vec<f64>> = by_layer.values().collect();
        (0..a.layers)
            .map(|l| LayerModel::from_weights(layers[l % layers.len()]))
            .collect()
    } else {
        return Ok(None);
    };
    let (t, k) = (sh.tokens, sh.topk);
    let mut chosen = Vec::with_capacity(k);
    Ok(Some(
        models
            .iter()
            .enumerate()
            .map(|(l, m)| {
                let mut r = LayerModel::stream(a.seed, [l as u64, 0, 0]);
                let mut ids = Vec::with_capacity(t * k);
                for _ in 0..t {
                    m.draw_token(&mut r, sh.experts, k, &mut chosen);
                    ids.extend(chosen.iter().map(|&e| e as u32));
                }
                ids
            })
            .collect(),
    ))
}

/// Blocks in `f` under `prefix` ('{l}' = 0, 1, ... while a gate exists).
fn layers_in_file(f: &TensorFile, prefix: &str) -> usize {
    if !prefix.contains("{l}") {
        return 1;
    }
    (0..)
        .take_while(|&l| {
            f.get(&format!("{}gate.weight", weights::layer_prefix(prefix, l)))
                .is_some()
        })
        .count()
        .max(1)
}

/// Run the tool.
pub fn run(mut a: Args) -> Result<()> {
    if a.quiet {
        ftk::cli::set_quiet();
    }
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| Error::input(format!("--threads: {e}")))?;
    }
    mem_plan::check_mact_flags(a.alpha, &a.chunk_bins)?;
    if a.recompute.contains(&Recompute::Auto) && a.device_mem.is_none() {
        ftk::bail!("--recompute auto needs --device-mem (MACT sizes chunks to a memory budget)");
    }
    let wfile = a.weights.as_deref().map(TensorFile::open).transpose()?;
    a.layers = match (a.layers_arg, &wfile) {
        (Some(n), _) => n,
        (None, Some(f)) => layers_in_file(f, &a.prefix),
        (None, None) => 1,
    };
    if a.layers == 0 || a.steps == 0 {
        ftk::bail!("--layers and --steps must be at least 1");
    }
    // Each layer needs its own names: '{l}' in the prefix, or one layer.
    let prefix = match (a.prefix.contains("{l}"), a.layers, &wfile) {
        (true, _, _) | (false, 1, _) => a.prefix.clone(),
        (false, _, None) => format!("{}layers.{{l}}.", a.prefix),
        (false, n, Some(_)) => ftk::bail!("--layers {n} reads {n} blocks from --weights: put '{{l}}' in --prefix (e.g. 'layers.{{l}}.')"),
    };
    let infile = a.input.as_deref().map(TensorFile::open).transpose()?;
    // Open --grads-out before the work (after the inputs, so one of them
    // named as the output is refused now): an unwritable path fails here.
    let grads_out = a
        .grads_out
        .as_deref()
        .map(ftk::output::Output::create)
        .transpose()?;
    let tokens = match &infile {
        Some(f) => f.require("x")?.shape.first().copied().unwrap_or(0),
        None => a.tokens,
    };
    if tokens == 0 {
        match &a.input {
            Some(p) => ftk::bail!(
                "{}: tensor 'x' has no tokens (shape [0, h]); give at least one row",
                p.display()
            ),
            None => ftk::bail!("--tokens must be at least 1"),
        }
    }
    let sh = resolve_shape(&a, wfile.as_ref(), tokens)?;
    sizes::check(&sh, a.layers)?;
    let (x, dy) = match &infile {
        Some(f) => {
            let (_, x, dy) = weights::load_inputs(f, sh.hidden)?;
            (x, dy)
        }
        None => (
            weights::random_tensor(tokens * sh.hidden, a.seed, 0),
            weights::random_tensor(tokens * sh.hidden, a.seed, 1),
        ),
    };
    let layers: Vec<LayerW> = (0..a.layers)
        .map(|l| match &wfile {
            Some(f) => weights::load_layer(f, &weights::layer_prefix(&prefix, l), &sh),
            None => Ok(weights::random_layer(&sh, a.seed, l)),
        })
        .collect::<Result<_>>()?;
    let forced = forced_routing(&a, &sh)?;
    let device = a.device.resolve()?;
    if a.dtype == "bf16" && device == Device::Cpu {
        ftk::bail!("--dtype bf16 runs on CUDA only (--device cuda); the CPU path is f32");
    }
    let mut grads: Vec<LayerW> = (0..a.layers).map(|_| LayerW::zeros(&sh)).collect();
    let run = Run {
        a: &a,
        sh,
        dy: &dy,
        forced: forced.as_deref(),
        device,
    };
    let last = match device {
        Device::Cpu => {
            let lts: Vec<LayerT> = layers.iter().map(|lw| LayerT::new(&sh, lw)).collect();
            linalg::warm_up();
            let mut eng = CpuEngine {
                sh,
                layers: &layers,
                lts: &lts,
                grads: &mut grads,
            };
            run.drive(&mut eng, &x, &dy)?
        }
        Device::Cuda(n) => {
            if a.dtype == "bf16" {
                run.drive_gpu::<half::bf16>(n, &layers, &x, &mut grads)?
            } else {
                run.drive_gpu::<f32>(n, &layers, &x, &mut grads)?
            }
        }
    };
    if let (Some(out), Some((y, dx))) = (grads_out, &last) {
        ftk::tensors::write_safetensors_on(
            out,
            &weights::grad_tensors(&grads, &sh, &prefix, y, dx),
            None,
        )?
        .commit()?;
    }
    Ok(())
}

/// MACT finds no chunk count in --chunk-bins that fits: the answer is "no"
/// (exit 1), as mem-plan says it, not a run at the largest count.
fn nothing_fits(a: &Args, sh: &Shape, c: &AutoCfg) -> Result<()> {
    let s = (sh.tokens * sh.topk) as f64;
    if mem_plan::memory::mact_chunks(s, c.s_max, &c.bins).is_some() {
        return Ok(());
    }
    Err(Error::Negative(format!(
        "recompute auto: does not fit with any chunk count in {:?}: {} token copies arrive per layer and a chunk may hold at most {:.0} within --device-mem {} × --alpha {} (after weights, gradients and inputs)",
        c.bins,
        s,
        c.s_max.max(0.0),
        ftk::size::format_bytes(a.device_mem.unwrap_or(0) as f64),
        a.alpha
    )))
}

/// Memory accounting and host transfers an engine offers the driver loop.
pub trait Measured: Engine {
    /// Bytes counted live now (heap on the CPU, device buffers on CUDA).
    fn live(&self) -> usize;
    fn peak(&self) -> usize;
    fn reset_peak(&self);
    fn zero_grads(&mut self) -> Result<()>;
    fn to_host(&self, b: &Self::Buf) -> Result<Vec<f32>>;
    /// What the device driver reports in use, where there is one.
    fn reserved(&self) -> Result<Option<usize>>;
}

impl Measured for CpuEngine<'_> {
    fn live(&self) -> usize {
        ftk::alloc::live()
    }
    fn peak(&self) -> usize {
        ftk::alloc::peak()
    }
    fn reset_peak(&self) {
        ftk::alloc::reset_peak()
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.grads.iter_mut().for_each(LayerW::fill_zero);
        Ok(())
    }
    fn to_host(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }
    fn reserved(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}

impl<T: gpu::Act> Measured for gpu::GpuEngine<T> {
    fn live(&self) -> usize {
        self.mem.live()
    }
    fn peak(&self) -> usize {
        self.mem.peak()
    }
    fn reset_peak(&self) {
        self.mem.reset_peak()
    }
    fn zero_grads(&mut self) -> Result<()> {
        gpu::GpuEngine::zero_grads(self)
    }
    fn to_host(&self, b: &gpu::DBuf<f32>) -> Result<Vec<f32>> {
        self.download(b)
    }
    fn reserved(&self) -> Result<Option<usize>> {
        self.synchronize()?;
        self.device_used().map(Some)
    }
}

/// One invocation's settings, shared by the CPU and CUDA drivers.
struct Run<'a> {
    a: &'a Args,
    sh: Shape,
    dy: &'a [f32],
    forced: Option<&'a [Vec<u32>]>,
    device: Device,
}

impl Run<'_> {
    fn drive_gpu<T: gpu::Act>(
        &self,
        ordinal: usize,
        layers: &[LayerW],
        x: &[f32],
        grads: &mut [LayerW],
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let mut eng = gpu::GpuEngine::<T>::new(ordinal, &self.sh, layers, self.forced)?;
        let xd = eng.upload(x)?;
        let dyd = eng.upload(self.dy)?;
        let last = self.drive(&mut eng, &xd, &dyd)?;
        for (l, gw) in grads.iter_mut().enumerate() {
            eng.grads_into(l, gw)?;
        }
        Ok(last)
    }

    /// Every (mode, step): zero the gradients, run the step, print its record.
    /// Returns the last step's y and input gradient.
    fn drive<E: Measured>(
        &self,
        eng: &mut E,
        x: &E::Buf,
        dy: &E::Buf,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (a, sh) = (self.a, &self.sh);
        let dims = BlockDims {
            t: sh.tokens as f64,
            h: sh.hidden as f64,
            f: sh.ffn as f64,
            e: sh.experts as f64,
            k: sh.topk as f64,
            layers: a.layers as f64,
            elem: if a.dtype == "bf16" { 2.0 } else { 4.0 },
        };
        let mut out = Stdout::new();
        let mut table = a.table.then(|| {
            Table::new([
                "step",
                "recompute",
                "chunks",
                "peak_act",
                "predicted",
                "peak",
                "fwd_ms",
                "bwd_ms",
                "tokens/s",
            ])
        });
        let reserved0 = eng.reserved()?;
        let timed = !a.no_timing;
        let runs = a.recompute.len() as u64 * a.steps;
        let bar = ftk::cli::progress(runs, "steps");
        let mut last = None;
        for (mode, step) in a
            .recompute
            .iter()
            .flat_map(|&m| (0..a.steps).map(move |s| (m, s)))
        {
            eng.zero_grads()?;
            let base = eng.live();
            let auto = a.device_mem.map(|m| AutoCfg {
                s_max: block_s_prime_max(&dims, m as f64 * a.alpha, base as f64),
                bins: a.chunk_bins.clone(),
            });
            if let (Recompute::Auto, Some(c)) = (mode, &auto) {
                nothing_fits(a, sh, c)?;
            }
            eng.sync()?;
            eng.reset_peak();
            let t0 = std::time::Instant::now();
            let cfg = StepCfg {
                mode,
                forced: self.forced,
                auto: auto.as_ref(),
            };
            let r = stack::step(eng, sh, a.layers, x, dy, &cfg)?;
            let step_ms = t0.elapsed().as_secs_f64() * 1e3;
            let peak = eng.peak();
            let reserved = match (reserved0, eng.reserved()?) {
                (Some(b), Some(n)) => Some(n.saturating_sub(b) as u64),
                _ => None,
            };
            let c_max = r.chunks.iter().copied().max().unwrap_or(1);
            let bmode = match mode {
                Recompute::None => BlockMode::None,
                Recompute::Full => BlockMode::Full,
                _ => BlockMode::Chunked(c_max as f64),
            };
            let y = eng.to_host(&r.y)?;
            let loss: f64 = y
                .iter()
                .zip(self.dy)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            if !loss.is_finite() {
                ftk::bail!("the step produced a non-finite loss ({loss}); check the inputs and weights for huge values");
            }
            let rec = Record {
                kind: "chunk_run",
                step,
                recompute: mode_name(mode),
                chunks: c_max,
                chunks_per_layer: r.chunks.clone(),
                layers: a.layers,
                tokens: sh.tokens,
                max_expert_tokens: r.max_expert_tokens,
                peak_act_bytes: peak.saturating_sub(base) as u64,
                predicted_act_bytes: block_peak_act(&dims, bmode).round() as u64,
                peak_bytes: peak as u64,
                device: self.device.to_string(),
                dtype: a.dtype.clone(),
                device_reserved_bytes: reserved,
                fwd_ms: timed.then_some(r.fwd_ms),
                bwd_ms: timed.then_some(r.bwd_ms),
                step_ms: timed.then_some(step_ms),
                tokens_per_s: timed.then_some(sh.tokens as f64 / (step_ms / 1e3)),
                loss,
            };
            match &mut table {
                Some(t) => {
                    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
                    t.row(vec![
                        step.to_string(),
                        if let Recompute::Chunked(c) = mode {
                            format!("chunked:{c}")
                        } else {
                            rec.recompute.to_string()
                        },
                        format!("{:?}", rec.chunks_per_layer),
                        mib(rec.peak_act_bytes),
                        mib(rec.predicted_act_bytes),
                        mib(rec.peak_bytes),
                        format!("{:.1}", r.fwd_ms),
                        format!("{:.1}", r.bwd_ms),
                        format!("{:.0}", sh.tokens as f64 / (step_ms / 1e3)),
                    ]);
                }
                None => {
                    ftk::jsonl::write_record(&mut out, &rec)?;
                    out.flush()?;
                }
            }
            let dx = eng.to_host(&r.dx)?;
            last = Some((y, dx));
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some(t) = &table {
            t.print(&mut out)?;
        }
        out.flush()?;
        Ok(last)
    }
}
