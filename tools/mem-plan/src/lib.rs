//! mem-plan: MemFine's memory model. Static and activation memory per MoE
//! layer and EP rank for no, full and chunked recompute, and MACT's choice of
//! chunk count for a device budget.

pub mod layout;
pub mod memory;
pub mod plan;
pub mod routing;

use clap::Parser;
use ftk::cli::Stdout;
use ftk::io::Input;
use ftk::model::ModelConfig;
use ftk::size::{format_bytes, parse_size};
use ftk::table::Table;
use ftk::{Error, Result};
use layout::{Layout, Precision};
use memory::Dims;
use plan::{DenseAct, Inputs};
use serde::Serialize;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Reads route_hist records (from route-hist) from --hist FILE, or stdin with --hist -; without
them routing is uniform (every EP rank receives b·s·topk token copies). stdin is never read
unless asked, so `while read cfg; do mem-plan ...; done < list` keeps its input.
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
    | mem-plan --model cfg.json --hist - --ep 8 --dp 8 --device-mem 24GiB --table
  mem-plan --model deepseek-v3/config.json --ep 32 --dp 32 --tokens-received 600000 --chunks 8";

/// MemFine memory model: static + activation memory per MoE layer and EP rank; MACT chunk choice.
#[derive(Parser, Debug)]
#[command(name = "mem-plan", version, about, after_help = AFTER_HELP)]
pub struct Args {
    /// Hugging Face config.json (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, Llama, GPT-2) or ftk model JSON.
    #[arg(long, value_name = "CONFIG")]
    pub model: PathBuf,
    /// route_hist records ('-' for stdin; default: none, uniform routing).
    #[arg(long, value_name = "FILE")]
    pub hist: Option<PathBuf>,
    /// Assume uniform routing (the default without --hist; kept for scripts).
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
    /// Optimizer state per parameter beside the fp32 master copy: adam (m and
    /// v, 8 bytes) or sgd with momentum (one buffer, 4 bytes).
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd"])]
    pub optimizer: String,
    /// ZeRO stage: 1 shards optimizer states (Megatron's distributed optimizer), 2 also gradients, 3 also weights.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3))]
    pub zero: u64,
    /// Device memory, e.g. 24GiB or 80GB; enables MACT and `fits`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub device_mem: Option<u64>,
    /// Usable fraction α of device memory.
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// MACT's chunk bins, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub chunk_bins: Vec<u64>,
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

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

#[derive(Serialize)]
struct Summary<'a> {
    kind: &'static str,
    model: &'a str,
    params: u64,
    layers: u64,
    moe_layers: u64,
    layout: Layout,
    micro_batch: u64,
    seq: u64,
    dtype: &'a str,
    optimizer: &'a str,
    zero: u64,
    routing: &'a str,
    hist_records: u64,
    hist_layers: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_bytes: Option<u64>,
    alpha: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_bytes: Option<u64>,
    chunk_bins: &'a [u64],
    chunks: u64,
    peak_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    fits: Option<bool>,
    dominant: &'a str,
    why: &'a str,
    stages: &'a [plan::StageSummary],
}

/// MACT's flags, shared with chunk-run: `--alpha` in (0, 1] and ascending
/// positive `--chunk-bins`.
pub fn check_mact_flags(alpha: f64, bins: &[u64]) -> Result<()> {
    if !(alpha > 0.0 && alpha <= 1.0) {
        ftk::bail!("--alpha must be in (0, 1], got {alpha}");
    }
    if bins.is_empty() || bins.contains(&0) || bins.windows(2).any(|w| w[0] >= w[1]) {
        ftk::bail!("--chunk-bins must be ascending positive integers, e.g. 1,2,4,8");
    }
    Ok(())
}

fn check(a: &Args) -> Result<()> {
    check_mact_flags(a.alpha, &a.chunk_bins)?;
    if a.chunks == Some(0) {
        ftk::bail!("--chunks must be at least 1");
    }
    if a.micro_batch == 0 || a.seq == 0 {
        ftk::bail!("--micro-batch and --seq must be at least 1");
    }
    if let Some(n) = a.tokens_received {
        if !(n.is_finite() && n >= 0.0) {
            ftk::bail!("--tokens-received must be a non-negative number, got {n}");
        }
    }
    if !a.seq.is_multiple_of(a.cp) {
        ftk::bail!("--seq {} must be divisible by --cp {}", a.seq, a.cp);
    }
    Ok(())
}

/// Run the tool.
pub fn run(a: Args) -> Result<()> {
    check(&a)?;
    let m = ModelConfig::from_file(&a.model)?;
    let layout = Layout::new(a.tp, a.pp, a.ep, a.cp, a.dp, a.vpp, &m)?;
    let dt = match a.dtype.as_str() {
        "fp32" => 4.0,
        _ => 2.0,
    };
    let moe = m.moe.clone();
    let dims = Dims {
        dt,
        b: a.micro_batch as f64,
        s: a.seq as f64,
        h: m.hidden as f64,
        a: m.heads() as f64,
        hd: m.head_dim() as f64,
        ka: m.kv_heads() as f64,
        en: moe.as_ref().map_or(0.0, |x| x.experts as f64),
        ge: moe.as_ref().map_or(0.0, |x| x.expert_ffn as f64),
        gd: m.ffn as f64,
        t: a.tp as f64,
        c: a.cp as f64,
    };
    let moe_layers = m.moe_layers() as usize;
    let topk = moe.as_ref().map_or(0, |x| x.topk);
    let bs = (a.micro_batch * a.seq) as f64;
    let recv = if let Some(n) = a.tokens_received {
        routing::Received {
            per_layer: vec![vec![n; a.ep as usize]; moe_layers],
            source: "tokens-received".into(),
            hist_records: 0,
            hist_layers: 0,
        }
    } else {
        let src = match &a.hist {
            Some(p) => Some(p.clone()),
            None => None,
        };
        let from = match (src, &moe) {
            (Some(p), Some(x)) => {
                let input = Input::open(&p)?;
                routing::from_hists(
                    &input.name.clone(),
                    input.reader,
                    moe_layers,
                    x.experts,
                    x.topk,
                    a.ep as usize,
                    bs,
                )?
            }
            _ => None,
        };
        if let (Some(p), None) = (&a.hist, &from) {
            ftk::bail!("{}: no route_hist records", p.display());
        }
        from.unwrap_or_else(|| routing::uniform(moe_layers, a.ep as usize, bs, topk as f64))
    };
    let budget = a.device_mem.map(|d| d as f64 * a.alpha);
    let inputs = Inputs {
        model: &m,
        layout,
        dims,
        precision: Precision::new(dt, a.grad_fp32, &a.optimizer),
        zero: a.zero,
        budget,
        bins: a.chunk_bins.clone(),
        fixed_chunks: a.chunks,
        recv: &recv,
        dense_act: a.dense_act,
        sequence_parallel: a.sequence_parallel,
    };
    let p = plan::plan(&inputs);
    let summary = Summary {
        kind: "mem_plan_summary",
        model: &m.arch,
        params: m.total_params(),
        layers: m.layers,
        moe_layers: moe_layers as u64,
        layout,
        micro_batch: a.micro_batch,
        seq: a.seq,
        dtype: &a.dtype,
        optimizer: &a.optimizer,
        zero: a.zero,
        routing: &recv.source,
        hist_records: recv.hist_records,
        hist_layers: recv.hist_layers,
        device_bytes: a.device_mem,
        alpha: a.alpha,
        budget_bytes: budget.map(|b| b.floor() as u64),
        chunk_bins: &a.chunk_bins,
        chunks: p.chunks,
        peak_bytes: p.min_peak,
        fits: p.fits,
        dominant: p.dominant,
        why: &p.why,
        stages: &p.stages,
    };
    let mut out = Stdout::new();
    if a.table {
        print_tables(&mut out, &p, &summary)?;
    } else {
        for r in &p.records {
            ftk::jsonl::write_record(&mut out, r)?;
        }
        ftk::jsonl::write_record(&mut out, &summary)?;
    }
    out.flush()?;
    if p.fits == Some(false) {
        let how = match a.chunks {
            Some(c) => format!("C={c}"),
            None => format!("any chunk count in {:?}", a.chunk_bins),
        };
        return Err(Error::Negative(format!(
            "does not fit with {how}: the smallest peak is {} against a budget of {} (α={} × {}); {}",
            format_bytes(p.min_peak as f64),
            format_bytes(budget.unwrap_or(0.0)),
            a.alpha,
            format_bytes(a.device_mem.unwrap_or(0) as f64),
            p.why
        )));
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

fn print_tables(out: &mut Stdout, p: &plan::Plan, s: &Summary) -> Result<()> {
    out.line(&format!(
        "{} ({:.2}B params), {} layers ({} MoE), tp={} pp={} ep={} cp={} dp={} vpp={}, b={} s={}, routing: {}",
        s.model,
        s.params as f64 / 1e9,
        s.layers,
        s.moe_layers,
        s.layout.tp,
        s.layout.pp,
        s.layout.ep,
        s.layout.cp,
        s.layout.dp,
        s.layout.vpp,
        s.micro_batch,
        s.seq,
        s.routing
    ))?;
    out.line("")?;
    let mut t = Table::new([
        "stage",
        "layers",
        "m_g",
        "static",
        "ckpt",
        "peak none",
        "peak full",
        "peak chunked",
        "s'_max",
        "C",
        "fits",
    ]);
    for st in s.stages {
        t.row(vec![
            st.stage.to_string(),
            st.layers.to_string(),
            st.m_g.to_string(),
            gib(st.static_bytes),
            gib(st.ckpt_bytes),
            gib(st.peak_bytes.none),
            gib(st.peak_bytes.full),
            gib(st.peak_bytes.chunked),
            st.s_max.map_or("-".into(), |x| x.to_string()),
            st.chunks.to_string(),
            st.fits
                .map_or("-".into(), |f| if f { "yes".into() } else { "NO".into() }),
        ]);
    }
    t.print(out)?;
    out.line("")?;
    let mut t = Table::new([
        "layer",
        "stage",
        "max s'",
        "rank",
        "act none",
        "act full",
        "act chunked",
        "C",
        "peak",
        "fits",
    ]);
    for grp in p.records.chunk_by(|a, b| a.layer == b.layer) {
        let r = grp
            .iter()
            .max_by_key(|r| r.tokens_received)
            .expect("non-empty group");
        t.row(vec![
            r.layer.to_string(),
            r.stage.to_string(),
            r.tokens_received.to_string(),
            r.rank.to_string(),
            gib(r.act_bytes.none),
            gib(r.act_bytes.full),
            gib(r.act_bytes.chunked),
            r.chunks.to_string(),
            gib(r.peak_bytes),
            r.fits
                .map_or("-".into(), |f| if f { "yes".into() } else { "NO".into() }),
        ]);
    }
    t.print(out)?;
    out.line("")?;
    out.line("(GiB)")?;
    out.line(&format!("dominant term: {}; {}", s.dominant, s.why))
}
