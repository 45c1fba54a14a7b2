//! route-hist: MoE routing traces, router logits or synthetic skew ->
//! per-(layer, step) expert and EP-rank token histograms, the all-to-all
//! matrix, load imbalance and capacity drops.

pub mod count;
pub mod cuda;
pub mod hist;
pub mod route_record;
pub mod trace;

use clap::Parser;
use ftk::cli::Stdout;
use ftk::io::Input;
use ftk::model::ModelConfig;
use ftk::routing::{LayerModel, Placement, Skew};
use ftk::table::Table;
use ftk::tensors::{sniff, TensorFile};
use ftk::{Error, Result};
use hist::Accum;
use rayon::prelude::*;
use std::io::Read;
use std::path::PathBuf;
use trace::{Groups, Settings};

const AFTER_HELP: &str = "\
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

/// Where finished groups go: JSON lines as they come, or a table at the end.
struct Sink {
    out: Stdout,
    table: Option<Table>,
    with_dropped: bool,
    written: u64,
}

impl Sink {
    fn emit(&mut self, acc: &Accum, p: Placement) -> Result<()> {
        let rec = acc.record(p, self.with_dropped);
        self.written += 1;
        match &mut self.table {
            None => {
                ftk::jsonl::write_record(&mut self.out, &rec)?;
                // Stream to live consumers (pipes into mem-plan, a terminal).
                self.out.flush()
            }
            Some(t) => {
                let (hot, max) = rec
                    .counts
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, c)| **c)
                    .map(|(e, c)| (e, *c))
                    .unwrap_or((0, 0));
                let rmax = rec.rank_counts.iter().copied().max().unwrap_or(0);
                let rmean = (rec.tokens * rec.topk) as f64 / rec.ep as f64;
                t.row(vec![
                    rec.layer.to_string(),
                    rec.step.to_string(),
                    rec.tokens.to_string(),
                    format!("{:.3}", rec.max_vio),
                    format!("e{hot}"),
                    max.to_string(),
                    rmax.to_string(),
                    format!(
                        "{:.3}",
                        if rmean > 0.0 {
                            rmax as f64 / rmean
                        } else {
                            0.0
                        }
                    ),
                    rec.dropped.map_or("-".into(), |d| d.to_string()),
                ]);
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<u64> {
        if let Some(t) = &self.table {
            t.print(&mut self.out)?;
        }
        self.out.flush()?;
        Ok(self.written)
    }
}

fn check_args(a: &Args) -> Result<()> {
    if let Some(f) = a.capacity_factor {
        if !(f.is_finite() && f > 0.0) {
            ftk::bail!("--capacity-factor must be a positive number, got {f}");
        }
    }
    if a.ep == 0 {
        ftk::bail!("--ep must be at least 1");
    }
    Ok(())
}

/// Run the tool.
pub fn run(mut a: Args) -> Result<()> {
    check_args(&a)?;
    let model = a.model.as_deref().map(ModelConfig::from_file).transpose()?;
    if let Some(m) = &model {
        let moe = m.moe.as_ref().ok_or_else(|| {
            Error::input(format!(
                "{}: the model has no MoE layers (no expert count in the config)",
                a.model.as_ref().unwrap().display()
            ))
        })?;
        a.experts.get_or_insert(moe.experts as usize);
        a.topk.get_or_insert(moe.topk as usize);
        a.layers.get_or_insert(m.moe_layers());
    }
    let mut sink = Sink {
        out: Stdout::new(),
        table: a.table.then(|| {
            Table::new([
                "layer",
                "step",
                "tokens",
                "max_vio",
                "hot",
                "hot_tokens",
                "max_rank",
                "rank_imb",
                "dropped",
            ])
        }),
        with_dropped: a.capacity_factor.is_some(),
        written: 0,
    };
    let settings = Settings {
        experts: a.experts,
        topk: a.topk,
        ep: a.ep,
        capacity_factor: a.capacity_factor,
        device: a.device.resolve()?,
    };
    if let Some(skew) = a.synthetic {
        if !a.inputs.is_empty() {
            ftk::bail!(
                "--synthetic generates routing; it takes no input files (got {})",
                a.inputs[0].display()
            );
        }
        synthetic(&a, skew, &mut sink)?;
    } else {
        read_inputs(&a, settings, &mut sink)?;
    }
    if sink.written == 0 {
        ftk::bail!("the trace has no routing records; nothing to count (empty input?)");
    }
    sink.finish().map(|_| ())
}

fn synthetic(a: &Args, skew: Skew, sink: &mut Sink) -> Result<()> {
    let need = |v: Option<usize>, flag: &str| {
        v.ok_or_else(|| Error::input(format!("--synthetic needs {flag} (or --model config.json)")))
    };
    let experts = need(a.experts, "--experts")?;
    let k = need(a.topk, "--topk")?;
    let tokens = a
        .tokens
        .ok_or_else(|| Error::input("--synthetic needs --tokens N (tokens per layer and step)"))?;
    if k == 0 || k > experts {
        ftk::bail!("--topk {k} must be in 1..={experts} (the number of experts)");
    }
    if tokens == 0 || a.steps == 0 || a.layers == Some(0) {
        ftk::bail!("--tokens, --steps and --layers must be at least 1");
    }
    let p = Placement::new(experts, a.ep)?;
    let layers = a.layers.unwrap_or(1);
    let models: Vec<LayerModel> = (0..layers)
        .map(|l| LayerModel::new(skew, experts, a.seed, l))
        .collect();
    let bar = ftk::cli::progress(layers * a.steps, "routing");
    for step in 0..a.steps {
        // One stream per (layer, step, rank): the same bytes at any thread count.
        let accs: Vec<Accum> = (0..layers)
            .into_par_iter()
            .map(|layer| {
                let mut acc = Accum::new(layer, step, k as u64, p);
                for r in 0..a.ep {
                    let n = (r as u64 + 1) * tokens / a.ep as u64 - r as u64 * tokens / a.ep as u64;
                    let unit =
                        models[layer as usize].unit(p, k, n, a.seed, [layer, step, r as u64]);
                    acc.add_unit(p, r, n, &unit, a.capacity_factor);
                }
                bar.inc(1);
                acc
            })
            .collect();
        for acc in &accs {
            sink.emit(acc, p)?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn read_inputs(a: &Args, mut s: Settings, sink: &mut Sink) -> Result<()> {
    let inputs = if a.inputs.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        a.inputs.clone()
    };
    let mut groups = Groups::new(a.unordered);
    let mut emit = |acc: &Accum, p: Placement| sink.emit(acc, p);
    for (i, path) in inputs.iter().enumerate() {
        let mut input = Input::open(path)?;
        let head = {
            let buf = input
                .reader
                .fill_buf()
                .map_err(|e| Error::io("reading", &input.name, e))?;
            buf[..buf.len().min(16)].to_vec()
        };
        if sniff(&head) {
            if path.as_os_str() == "-" {
                ftk::bail!("<stdin> looks like safetensors, which is memory-mapped and must be given as a file path");
            }
            let f = TensorFile::open(path)?;
            let step = match f.metadata().and_then(|m| m.get("step")) {
                Some(v) => v.parse::<u64>().map_err(|_| {
                    Error::input(format!(
                        "{}: __metadata__ step '{v}' is not a non-negative integer",
                        f.name()
                    ))
                })?,
                None => a.step + i as u64,
            };
            trace::read_safetensors(&f, step, &s, &mut emit)?;
        } else {
            if head
                .first()
                .is_some_and(|b| *b != b'{' && !b.is_ascii_whitespace())
            {
                // Read a little more to say what it is not.
                let mut peek = String::new();
                let _ = input.reader.by_ref().take(40).read_to_string(&mut peek);
                ftk::bail!(
                    "{}: neither JSON lines nor safetensors (starts with {:?})",
                    input.name,
                    peek.lines().next().unwrap_or("")
                );
            }
            let name = input.name.clone();
            if trace::read_jsonl(&name, input.reader, &mut s, &mut groups, &mut emit)? == 0 {
                ftk::bail!("{name}: no route records (empty input?); expected JSON lines with \"kind\":\"route\"");
            }
        }
    }
    if let Some(e) = s.experts {
        let p = Placement::new(e, s.ep)?;
        for acc in std::mem::replace(&mut groups, Groups::new(a.unordered)).finish() {
            emit(&acc, p)?;
        }
    }
    Ok(())
}
