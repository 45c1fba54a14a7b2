//! mofa-predict: MoFa's pretraining performance model (arXiv 2511.09837):
//! iteration time, MFU and memory per GPU for TP/PP/DP/CP/EP/VPP, recompute,
//! ZeRO and overlap; fault tolerance (failures, checkpoints, restarts,
//! goodput); `tune` ranks strategies; `calibrate` reports the error on
//! published measurements.

pub mod calibrate;
pub mod cluster;
pub mod ft;
pub mod input;
pub mod keys;
pub mod mem;
pub mod perf;
pub mod predict;
pub mod tune;
pub mod zero3;

use clap::{Parser, Subcommand};
use ftk::cli::Stdout;
use ftk::io::Input;
use ftk::jsonl::Reader;
use ftk::model::ModelConfig;
use ftk::records::MofaPredict;
use ftk::records::{self, Tag};
use ftk::table::Table;
use ftk::{Error, Result};
use input::Fallback;
use perf::Terms;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Input: one JSON object per line (or one job from --strategy and the flags). Every key is
checked: an unknown key is an error with a suggestion. Missing or null cluster and strategy
fields take the defaults below and the output lists them in \"assumed\".
  {\"id\": any,
   \"model\": {\"arch\" (llama|gpt|bloom|opt), \"layers\", \"hidden\", \"heads\", \"kv_heads\", \"ffn\",
     \"vocab\", \"seq\", \"head_dim\", \"tie_embeddings\", \"params_b\" (informational),
     \"sliding_window\" (tokens; default none), \"window_layers\" (layers using it; default all),
     \"mla\": null | {\"q_lora_rank\", \"kv_lora_rank\", \"qk_head_dim\", \"qk_rope_head_dim\", \"v_head_dim\"},
     \"moe\": null | {\"experts\", \"topk\", \"expert_ffn\", \"shared_experts\", \"shared_ffn\", \"moe_layers\",
       \"expert_bias\" (the experts' linear layers carry biases; a --model gpt-oss config sets it)}},
   \"cluster\": {\"gpu\" (preset or vendor name: \"NVIDIA H100 80GB HBM3\", \"A100-SXM4-80GB\",
     \"A100-PCIE-40GB\", \"MI300X\", ...), \"gpus\", \"gpus_per_node\",
     \"peak_tflops\" (dense BF16 TFLOP/s), \"hbm_gb\", \"hbm_gbs\" (GB/s),
     \"intra_node_gbps\" (NVLink, GB/s per GPU per direction),
     \"inter_node_gbps\" (network, GB/s per GPU per direction) or
     \"nic_gbps_per_node\" (Gb/s summed over a node's NICs: 8x400 Gb/s = 3200, which on
     8 GPUs is 3200/8 bits/8 GPUs = 50 GB/s per GPU), \"gemm_eff\", \"attn_tflops\",
     \"power_w\" (a power limit below the rating: the clock falls as its cube root),
     \"rated_power_w\" (the power peak_tflops holds at; presets know it)},
   \"strategy\": {\"tp\", \"pp\", \"dp\", \"cp\", \"ep\", \"vpp\", \"mbs\", \"gbs\" (sequences),
     \"recompute\" (none|selective|full), \"zero\" (0-3), \"sp\", \"flash_attn\",
     \"attn_kernel\" (none|fa1|fa2|fa3), \"overlap_grad_reduce\", \"overlap_param_gather\",
     \"tp_comm_overlap\", \"ep_comm_overlap\", \"etp\", \"moe_imbalance\" (max/mean − 1 of tokens
     per EP rank), \"moe_force_balance\", \"moe_dispatcher\"
     (alltoall|allgather|deepep: a token crosses once per remote node),
     \"cp_comm\" (ring|allgather), \"grad_accum\" (checked = gbs/(mbs·dp)), \"precision\" (bf16|fp16),
     \"fsdp_mixed_precision\" (DEFAULT|FULL: fp32 gradient reduction, PURE: 16-bit),
     \"grad_reduce_dtype\" (fp32|bf16|fp16: the gradient reduction's type where the framework's
     config states it, e.g. NeMo's grad_sync_dtype), \"pp_schedule\",
     \"recompute_modules\" (with recompute selective, Megatron-Core's list of what it re-runs:
     core_attn|moe_act|layernorm|mla_up_proj|mlp|moe|shared_experts; default [\"core_attn\"])},
   \"run\": {\"tokens\", \"gpu_failure_rate_per_hour\", \"node_failure_rate_per_hour\",
     \"ckpt_gbps_per_node\" (GB/s one node writes), \"ckpt_write_gbps\" (filesystem cap, GB/s),
     \"restart_s\", \"ckpt_interval_s\"}}
Measurement rows (calibrate) add \"measured\": {\"metric\", \"value\"}, \"source\": {\"paper\",
\"where\"} and optional \"confidence\", \"note\", \"split\", \"regime\". Any job may name its
\"framework\": one naming DeepSpeed reduces pipeline gradients after the schedule and sends
ZeRO-3 traffic through each rank's own NIC; one naming torchtitan re-runs, under selective
recompute, what its op-level policy does not save (every second matmul, the non-matmul ops).

Defaults: cluster figures from the gpu preset (or --cluster), gpus = tp·pp·cp·dp,
gpus_per_node 8; strategy tp pp cp ep vpp mbs 1 (vpp 4 when pp_schedule names an interleaved
schedule), dp = gpus/(tp·pp·cp), gbs = mbs·dp,
recompute selective, zero 1, sp = (tp > 1), attn_kernel fa2 (flash_attn false = none),
overlap_grad_reduce true (false for a DeepSpeed pipeline, whose
engine reduces gradients after the schedule), overlap_param_gather = overlap_grad_reduce,
tp_comm_overlap false, ep_comm_overlap false, etp = tp, moe_imbalance 0, cp_comm ring; run: Llama 3's failure rate
(419 interruptions / 54 days / 16,384 GPUs), ckpt_gbps_per_node 0.71 (Megatron 1T: 273 GB/s
from 384 nodes), ckpt_write_gbps 2000 (Llama 3's Tectonic), restart_s 600 (assumed),
ckpt_interval_s = Daly's optimum. A bad line gets {\"kind\":\"error\",\"id\",\"error\"} on stdout and
a line on stderr; the other lines are predicted and the exit code is 2 at the end.

Output: one {\"kind\":\"mofa_predict\",\"id\",\"iter_s\",\"tflops_per_gpu\" (model FLOPs),
\"hw_tflops_per_gpu\" (with recompute),\"mfu\",\"tokens_per_s\",\"mem_gb_per_gpu\",\"fits\",
\"breakdown\":{\"compute_s\",\"recompute_s\",\"tp_comm_s\",\"cp_comm_s\",\"ep_comm_s\",\"pp_bubble_s\",
\"pp_p2p_s\",\"dp_comm_exposed_s\",\"optimizer_s\"} (sums to iter_s),\"ft\":{\"job_mtbf_h\",\"ckpt_s\",
\"restart_s\",\"ckpt_interval_s\",\"expected_failures\",\"goodput\"},\"train_days\",\"params_b\",\"gpus\",
\"bottleneck\",\"assumed\":[\"strategy.mbs=1\",...]} per input line. Presets: V100, A100-40GB,
A100-80GB, A100-PCIe-40GB, A100-PCIe-80GB, H100, H100-PCIe, H200, B200, MI300X.

Examples:
  mofa-predict --model llama3-70b/ --seq 8192 --cluster H100 --gpus 1024 \\
    --strategy tp=8,pp=4,vpp=5,mbs=1,gbs=1024,recompute=selective,zero=1 --tokens 15e12 --table
  mofa-predict < jobs.jsonl > predictions.jsonl
  route-hist --synthetic zipf:1.2 --model mixtral.json --ep 8 > hist.jsonl
  mofa-predict --model mixtral.json --cluster H100 --gpus 1024 --strategy tp=2,pp=4,ep=8,gbs=1024 --route-hist hist.jsonl
  mofa-predict tune --model llama3-70b.json --seq 8192 --cluster H100 --gpus 1024 --gbs 1024 --top 10 --table
  mofa-predict calibrate --table";

const TUNE_HELP: &str = "\
Output: the best --top strategies, each {\"kind\":\"mofa_tune\",\"rank\",\"strategy\":{\"tp\",\"pp\",...},
\"id\" (the strategy as tp=..,pp=..),\"iter_s\",...,\"bottleneck\"} (mofa_predict's fields after rank and
strategy, without assumed), then {\"kind\":\"mofa_tune_summary\",\"assumed\",\"candidates\",\"elapsed_s\",
\"fitting\",\"strategies_per_s\"} (elapsed_s and strategies_per_s absent under --no-timing).";

const CALIBRATE_HELP: &str = "\
Output: per measurement {\"kind\":\"mofa_calib_row\",\"id\",\"source\",\"confidence\",\"metric\",\"measured\",
\"predicted\" (shipped constants),\"ape\",\"loso_predicted\" (constants fitted without its source),\"loso_ape\",
\"loso_speed_error\" (+ too fast),\"fits\"}, then {\"kind\":\"mofa_calibrate\",\"baseline_constant_mfu_loso_mape\",
\"calib\":{...},\"fit_iters\",\"fitted_on_all\",\"ft\":{\"ckpt_gbs\",\"mtbf_default_mape\",\"mtbf_h\",\"note\"},
\"gemm_eff\",\"insample_mape_mean_over_sources\",\"loso_by_source\":{...},\"loso_mape_mean_over_sources\" (the
headline),\"loso_mape_worst_source\",\"n_counted\",\"n_rows\",\"n_sources\"}.";

/// MoFa performance model: iteration time, MFU, memory, fault tolerance; strategy tuner.
#[derive(Parser, Debug)]
#[command(name = "mofa-predict", version, about, after_help = AFTER_HELP,
          args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub predict: PredictArgs,
}

#[derive(clap::Args, Debug, Default)]
pub struct Common {
    /// Hugging Face config.json or model directory (its config.json): the model for records without one.
    #[arg(long, value_name = "CONFIG")]
    pub model: Option<PathBuf>,
    /// Sequence length when the model comes from --model.
    #[arg(long)]
    pub seq: Option<u64>,
    /// GPU preset or vendor name (H100, "NVIDIA H100 80GB HBM3", A100-SXM4-80GB, A100-PCIE-40GB, H200, MI300X, ...).
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Number of GPUs.
    #[arg(long)]
    pub gpus: Option<u64>,
    /// Tokens to train on (gives train_days and expected_failures).
    #[arg(long)]
    pub tokens: Option<f64>,
    /// route_hist records (from route-hist): EP load imbalance = mean over records of
    /// max(rank_counts)/mean − 1 (max_vio when rank counts are absent).
    #[arg(long, value_name = "FILE")]
    pub route_hist: Option<PathBuf>,
    /// Print an aligned table for people instead of JSON lines.
    #[arg(long)]
    pub table: bool,
}

#[derive(clap::Args, Debug, Default)]
pub struct PredictArgs {
    /// JSON-lines jobs ('-' or absent: stdin) unless --strategy is given.
    pub input: Option<PathBuf>,
    /// One job from flags: 'tp=8,pp=4,dp=32,cp=1,ep=1,vpp=1,mbs=1,gbs=1024,recompute=selective,zero=1,sp=true'
    /// (any strategy key of the schema; unknown keys are errors).
    #[arg(long)]
    pub strategy: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Enumerate valid strategies, rank them by time-to-train including fault tolerance.
    #[command(after_help = TUNE_HELP)]
    Tune {
        #[command(flatten)]
        common: Common,
        /// Global batch size in sequences.
        #[arg(long)]
        gbs: u64,
        /// How many strategies to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Leave the timing fields (elapsed_s, strategies_per_s) out of stdout, so the same
        /// inputs give the same bytes; the rate goes to stderr instead.
        #[arg(long)]
        no_timing: bool,
    },
    /// Predict the published measurements; report the leave-one-source-out error (each source
    /// predicted by constants fitted on all the others) and the fault-tolerance model's error on
    /// published reliability reports.
    #[command(after_help = CALIBRATE_HELP)]
    Calibrate {
        /// Measurement files or directories (their *.jsonl and corpus/*.jsonl); default: the
        /// corpus compiled into the binary (testdata/mofa-predict/measurements.jsonl and corpus/).
        data: Vec<PathBuf>,
        /// Also fit the constants on every source and print them (what the code ships).
        #[arg(long)]
        fit: bool,
        /// Tables for people: every row, then per-source LOSO MAPE and the mean.
        #[arg(long)]
        table: bool,
        /// Nelder-Mead iterations per fit.
        #[arg(long, default_value_t = 100)]
        iters: usize,
    },
}

/// `--model`: a config.json, or a Hugging Face model directory holding one.
pub fn model_path(p: &std::path::Path) -> Result<PathBuf> {
    if p.is_dir() {
        let c = p.join("config.json");
        if !c.is_file() {
            ftk::bail!(
                "--model {}: a directory without config.json; give a Hugging Face model directory or its config.json",
                p.display()
            );
        }
        return Ok(c);
    }
    Ok(p.to_path_buf())
}

fn fallback(c: &Common) -> Result<Fallback> {
    let model = match &c.model {
        Some(p) => Some(ModelConfig::from_file(&model_path(p)?)?),
        None => None,
    };
    let cluster = match &c.cluster {
        Some(n) => {
            let mut cl = cluster::preset_or_err(n, "--cluster")?;
            cl.gpus = c.gpus.unwrap_or(0);
            Some(cl)
        }
        None => None,
    };
    if c.seq == Some(0) || c.gpus == Some(0) {
        ftk::bail!("--seq and --gpus must be at least 1");
    }
    if let Some(t) = c.tokens {
        if !(t.is_finite() && t > 0.0) {
            ftk::bail!("--tokens must be a positive number, got {t}");
        }
    }
    Ok(Fallback {
        model,
        seq: c.seq,
        cluster,
    })
}

/// EP imbalance from route_hist records.
pub fn imbalance_from_hists(name: &str, r: impl std::io::BufRead) -> Result<f64> {
    let mut rd = Reader::new(name, r);
    let (mut sum, mut n) = (0.0, 0u64);
    while let Some(h) = ftk::records::next::<ftk::records::RouteHist, _>(&mut rd)? {
        let total = h.rank_counts.iter().sum::<u64>() as f64;
        let v = if total > 0.0 {
            let mean = total / h.rank_counts.len() as f64;
            h.rank_counts.iter().copied().max().unwrap_or(0) as f64 / mean - 1.0
        } else if h.max_vio.is_finite() && h.max_vio >= 0.0 {
            h.max_vio
        } else {
            return Err(Error::input(format!(
                "{}: route_hist record with no tokens in rank_counts and no usable max_vio",
                rd.here()
            )));
        };
        sum += v;
        n += 1;
    }
    if n == 0 {
        return Err(Error::input(format!("{name}: no route_hist records")));
    }
    Ok(sum / n as f64)
}

fn with_flags(mut v: Value, c: &Common, imbalance: Option<f64>) -> Value {
    if let Value::Object(m) = &mut v {
        if let Some(t) = c.tokens {
            let run = m.entry("run").or_insert_with(|| json!({}));
            if let Value::Object(r) = run {
                r.entry("tokens").or_insert(json!(t));
            }
        }
        if let (Some(x), Some(Value::Object(s))) = (imbalance, m.get_mut("strategy")) {
            s.insert("moe_imbalance".into(), json!(x));
        }
    }
    v
}

fn print_predictions(out: &mut Stdout, preds: &[MofaPredict]) -> Result<()> {
    let mut t = Table::new([
        "id",
        "iter s",
        "TFLOP/s",
        "MFU",
        "tok/s",
        "mem GB",
        "fits",
        "goodput",
        "days",
        "bottleneck",
    ]);
    for r in preds {
        let p = &r.metrics;
        t.row(vec![
            match &r.id {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            },
            format!("{:.3}", p.iter_s),
            format!("{:.1}", p.tflops_per_gpu),
            format!("{:.1}%", p.mfu * 100.0),
            format!("{:.0}", p.tokens_per_s),
            format!("{:.1}", p.mem_gb_per_gpu),
            if p.fits { "yes".into() } else { "NO".into() },
            format!("{:.3}", p.ft.goodput),
            p.train_days.map_or("-".into(), |d| format!("{d:.1}")),
            p.bottleneck.clone(),
        ]);
    }
    t.print(out)?;
    for r in preds.iter().filter(|r| !r.assumed.is_empty()) {
        out.line(&format!("assumed ({}): {}", r.id, r.assumed.join(", ")))?;
    }
    if let [MofaPredict { metrics: p, .. }] = preds {
        out.line("")?;
        let mut t = Table::new(["term", "seconds", "share"]);
        for (name, s) in p.breakdown.terms() {
            t.row(vec![
                name.into(),
                format!("{s:.4}"),
                format!("{:.1}%", s / p.iter_s * 100.0),
            ]);
        }
        t.print(out)?;
        out.line(&format!(
            "job MTBF {} h, checkpoint {:.1} s every {} s, restart {:.0} s",
            p.ft.job_mtbf_h.map_or("-".into(), |m| format!("{m:.2}")),
            p.ft.ckpt_s,
            p.ft.ckpt_interval_s
                .map_or("-".into(), |x| format!("{x:.0}")),
            p.ft.restart_s
        ))?;
    }
    Ok(())
}

/// An input path that does not exist but looks like a mistyped subcommand
/// (`mofa-predict tun`) gets that said, not "cannot open tun".
fn check_input_path(p: &std::path::Path) -> Result<()> {
    if p.as_os_str() == "-" || p.exists() {
        return Ok(());
    }
    let word = p.to_string_lossy();
    if !word.contains(['/', '.']) {
        if let Some(s) = keys::suggest(&word, &["tune", "calibrate", "help"]) {
            ftk::bail!("unknown subcommand '{word}'; did you mean '{s}'? (an input file of that name does not exist)");
        }
    }
    Ok(())
}

/// The id of a record that failed, when the line is an object with one.
fn id_of(line: &str) -> Value {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(Value::Null)
}

fn run_predict(a: PredictArgs) -> Result<()> {
    if let Some(p) = &a.input {
        check_input_path(p)?;
    }
    let fb = fallback(&a.common)?;
    let imbalance = match &a.common.route_hist {
        Some(p) => {
            let i = Input::open(p)?;
            Some(imbalance_from_hists(&i.name.clone(), i.reader)?)
        }
        None => None,
    };
    let c = perf::CALIB;
    let mut out = Stdout::new();
    let mut preds: Vec<MofaPredict> = vec![];
    let table = a.common.table;
    let mut emit = |out: &mut Stdout, mut p: MofaPredict, assumed: Vec<String>| -> Result<()> {
        p.assumed = assumed;
        if table {
            preds.push(p);
            Ok(())
        } else {
            ftk::jsonl::write_record(out, &p)
        }
    };
    let mut n = 0u64;
    // The latest bad row's error: printed when the next one comes, returned
    // at the end (so every bad row is one stderr line and the exit code is 2).
    let mut held: Option<Error> = None;
    if let Some(s) = &a.strategy {
        if a.input.is_some() {
            ftk::bail!("give either --strategy (one job from flags) or an input file, not both");
        }
        let strat = input::parse_kv(s, "--strategy")?;
        let mut rec = Map::new();
        rec.insert("id".into(), json!(s));
        rec.insert("strategy".into(), Value::Object(strat));
        let v = with_flags(Value::Object(rec), &a.common, imbalance);
        let (job, assumed) = input::job_and_assumed(&v, &fb, "--strategy")?;
        emit(&mut out, predict::predict(&job, &c), assumed)?;
    } else {
        let inp = Input::open(a.input.as_deref().unwrap_or(std::path::Path::new("-")))?;
        let mut rd = Reader::new(inp.name.clone(), inp.reader);
        while let Some(line) = rd.next_line()? {
            n += 1;
            let line = line.to_string();
            let res = serde_json::from_str::<Value>(&line)
                .map_err(|e| rd.decode_error(&e))
                .and_then(|v| {
                    let v = with_flags(v, &a.common, imbalance);
                    input::job_and_assumed(&v, &fb, &rd.here())
                });
            match res {
                Ok((job, assumed)) => emit(&mut out, predict::predict(&job, &c), assumed)?,
                Err(e) => {
                    // One bad row does not stop the stream (ripgrep's
                    // per-file rule): record it, go on, exit 2 at the end.
                    let id = id_of(&line);
                    if !table {
                        ftk::jsonl::write_record(
                            &mut out,
                            &json!({"kind": "error", "id": id, "error": e.to_string()}),
                        )?;
                    }
                    out.flush()?;
                    if let Some(prev) = held.replace(e) {
                        eprintln!("mofa-predict: error: {prev}");
                    }
                }
            }
        }
        if n == 0 {
            ftk::bail!(
                "{}: no jobs (empty input); give JSON lines (schema in --help) or --model/--cluster/--gpus/--strategy",
                inp.name
            );
        }
    }
    if table {
        print_predictions(&mut out, &preds)?;
    }
    out.flush()?;
    held.map_or(Ok(()), Err)
}

fn run_tune(c: Common, gbs: u64, top: usize, no_timing: bool) -> Result<()> {
    let fb = fallback(&c)?;
    if fb.model.is_none() || fb.cluster.is_none() || c.gpus.is_none() {
        ftk::bail!("tune needs --model, --cluster and --gpus");
    }
    if gbs == 0 || top == 0 {
        ftk::bail!("--gbs and --top must be at least 1");
    }
    let gpus = c.gpus.unwrap_or(1);
    // The base job on one data-parallel rank (any gbs is valid there); the
    // enumeration then skips every layout whose dp does not divide gbs.
    let mut fb1 = fb;
    if let Some(cl) = &mut fb1.cluster {
        cl.gpus = 0;
    }
    let rec = with_flags(json!({"id": "tune", "strategy": {"gbs": gbs}}), &c, None);
    let (mut base, assumed) = input::job_and_assumed(&rec, &fb1, "tune")?;
    base.cluster.gpus = gpus;
    if let Some(p) = &c.route_hist {
        let i = Input::open(p)?;
        base.strategy.moe_imbalance = imbalance_from_hists(&i.name.clone(), i.reader)?;
    }
    let t0 = std::time::Instant::now();
    let o = tune::tune(&base, &tune::Space::default(), &perf::CALIB, top);
    let secs = t0.elapsed().as_secs_f64();
    if o.candidates == 0 {
        ftk::bail!(
            "no valid strategy for --gbs {gbs} on --gpus {gpus}: gbs must be a multiple of dp = gpus/(tp·pp·cp) for some tp (dividing the heads and the node), pp and cp"
        );
    }
    let rate = o.candidates as f64 / secs.max(1e-9);
    let mut out = Stdout::new();
    let mut summary = records::MofaTuneSummary {
        // The layout fields are what tune chooses, not defaults.
        assumed: assumed
            .iter()
            .filter(|a| a.starts_with("cluster.") && !a.starts_with("cluster.gpus="))
            .cloned()
            .collect(),
        candidates: o.candidates as u64,
        elapsed_s: None,
        fitting: o.fitting as u64,
        kind: Tag::default(),
        strategies_per_s: None,
    };
    if no_timing {
        eprintln!(
            "mofa-predict: {} strategies in {secs:.3} s, {rate:.0} strategies/s",
            o.candidates
        );
    } else {
        summary.elapsed_s = Some(secs);
        summary.strategies_per_s = Some(rate);
    }
    if o.top.is_empty() {
        ftk::jsonl::write_record(&mut out, &summary)?;
        out.flush()?;
        return Err(Error::Negative(format!(
            "none of the {} strategies fits in {:.0} GB per GPU",
            o.candidates, base.cluster.hbm_gb
        )));
    }
    if c.table {
        let mut t = Table::new([
            "rank",
            "strategy",
            "TFLOP/s",
            "MFU",
            "mem GB",
            "goodput",
            "days",
            "bottleneck",
        ]);
        for r in &o.top {
            let p = &r.prediction;
            t.row(vec![
                r.rank.to_string(),
                r.strategy.compact(),
                format!("{:.1}", p.tflops_per_gpu),
                format!("{:.1}%", p.mfu * 100.0),
                format!("{:.1}", p.mem_gb_per_gpu),
                format!("{:.3}", p.ft.goodput),
                p.train_days.map_or("-".into(), |d| format!("{d:.1}")),
                p.bottleneck.clone(),
            ]);
        }
        t.print(&mut out)?;
        if no_timing {
            out.line(&format!("{} strategies, {} fit", o.candidates, o.fitting))?;
        } else {
            out.line(&format!(
                "{} strategies, {} fit; {rate:.0} strategies/s",
                o.candidates, o.fitting
            ))?;
        }
    } else {
        for r in &o.top {
            ftk::jsonl::write_record(&mut out, &r.record())?;
        }
        ftk::jsonl::write_record(&mut out, &summary)?;
    }
    out.flush()
}

/// The measurement files a calibrate argument names: a file, or a
/// directory's *.jsonl and its corpus/*.jsonl, sorted.
fn data_files(p: &std::path::Path) -> Result<Vec<PathBuf>> {
    if !p.is_dir() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut out = vec![];
    for d in [p.to_path_buf(), p.join("corpus")] {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        v.sort();
        out.extend(v);
    }
    if out.is_empty() {
        ftk::bail!(
            "{}: no *.jsonl measurement files in this directory",
            p.display()
        );
    }
    Ok(out)
}

/// Fitted constants by name.
fn named(x: &calibrate::X) -> BTreeMap<String, f64> {
    calibrate::PARAMS
        .iter()
        .zip(x)
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// The time model's constants by name.
fn calib_map(c: &perf::Calib) -> BTreeMap<String, f64> {
    match serde_json::to_value(c) {
        Ok(Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn run_calibrate(data: Vec<PathBuf>, fit: bool, table: bool, iters: usize) -> Result<()> {
    let rows = if data.is_empty() {
        calibrate::embedded_rows()?
    } else {
        let mut rows = vec![];
        for p in &data {
            for f in data_files(p)? {
                let inp = Input::open(&f)?;
                rows.extend(calibrate::read_rows(&inp.name.clone(), inp.reader)?);
            }
        }
        calibrate::dedupe(rows)
    };
    calibrate::check(&rows)?;
    let base = perf::CALIB;
    let folds = calibrate::loso(&rows, &base, iters);
    let mut loso_pred = vec![f64::NAN; rows.len()];
    for f in &folds {
        for &(i, p) in &f.predictions {
            loso_pred[i] = p;
        }
    }
    let fitted = fit.then(|| {
        let mut all = rows.clone();
        calibrate::fit(&mut all, &base, calibrate::start(&base), iters).0
    });
    let mut out = Stdout::new();
    let mut t = Table::new([
        "id",
        "source",
        "metric",
        "measured",
        "predicted",
        "APE %",
        "LOSO pred",
        "LOSO APE %",
        "fits",
    ]);
    let mut in_sample: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for (i, r) in rows.iter().enumerate() {
        let pred = predict::predict(&r.job, &base).metrics;
        let p = calibrate::metric_of(&pred, &r.metric, &r.job);
        let finite = |x: f64| Some(x).filter(|x| x.is_finite());
        let o = records::MofaCalibRow {
            kind: Tag::default(),
            id: r.id.clone(),
            source: r.source.clone(),
            confidence: r.confidence.clone(),
            metric: r.metric.clone(),
            measured: r.value,
            predicted: p,
            ape: calibrate::ape(p, r.value),
            loso_predicted: finite(loso_pred[i]),
            loso_ape: finite(calibrate::ape(loso_pred[i], r.value)),
            loso_speed_error: finite(calibrate::speed_error(loso_pred[i], r.value, &r.metric)),
            fits: pred.fits,
        };
        if calibrate::counted(r) {
            in_sample.entry(&r.source).or_default().push(o.ape);
        }
        let sig = |x: f64| {
            if x.abs() >= 100.0 {
                format!("{x:.0}")
            } else if x.abs() >= 1.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.4}")
            }
        };
        if table {
            t.row(vec![
                format!(
                    "{}{}",
                    r.id,
                    if calibrate::counted(r) { "" } else { " (low)" }
                ),
                r.source.clone(),
                r.metric.replace("_tflops_per_gpu", "_tflops"),
                sig(r.value),
                sig(p),
                format!("{:.1}", o.ape),
                sig(loso_pred[i]),
                format!("{:.1}", calibrate::ape(loso_pred[i], r.value)),
                if pred.fits { "yes".into() } else { "NO".into() },
            ]);
        } else {
            ftk::jsonl::write_record(&mut out, &o)?;
        }
    }
    let mut st = Table::new(["source", "rows", "LOSO MAPE %", "in-sample MAPE %"]);
    let mut by_source = BTreeMap::new();
    for f in folds.iter().filter(|f| f.n > 0) {
        let ins = calibrate::mean(in_sample.get(f.source.as_str()).map_or(&[][..], |v| v));
        by_source.insert(
            f.source.clone(),
            records::MofaSourceLoso {
                fitted_without: named(&f.fitted),
                insample_mape: ins,
                loso_mape: f.mape,
                n: f.n as u64,
            },
        );
        st.row(vec![
            f.source.clone(),
            f.n.to_string(),
            format!("{:.1}", f.mape),
            format!("{ins:.1}"),
        ]);
    }
    let counted: Vec<&calibrate::Fold> = folds.iter().filter(|f| f.n > 0).collect();
    let per: Vec<f64> = counted.iter().map(|f| f.mape).collect();
    let loso_mean = calibrate::mean(&per);
    let worst = counted.iter().max_by(|a, b| a.mape.total_cmp(&b.mape));
    let ins_mean = calibrate::mean(
        &in_sample
            .values()
            .map(|v| calibrate::mean(v))
            .collect::<Vec<_>>(),
    );
    let ftr = ft::reliability_report();
    let summary = records::MofaCalibrate {
        baseline_constant_mfu_loso_mape: calibrate::constant_mfu_baseline(&rows),
        calib: calib_map(&base),
        fit_iters: iters as u64,
        fitted_on_all: fitted.map(|x| named(&x)),
        ft: ftr.clone(),
        gemm_eff: records::MofaGemmEff {
            a100: cluster::A100_GEMM_EFF,
            h100: cluster::H100_GEMM_EFF,
        },
        insample_mape_mean_over_sources: ins_mean,
        kind: Tag::default(),
        loso_by_source: by_source,
        loso_mape_mean_over_sources: loso_mean,
        loso_mape_worst_source: worst.map(|w| records::MofaWorstSource {
            mape: w.mape,
            source: w.source.clone(),
        }),
        n_counted: rows.iter().filter(|r| calibrate::counted(r)).count() as u64,
        n_rows: rows.len() as u64,
        n_sources: counted.len() as u64,
    };
    if table {
        t.print(&mut out)?;
        out.line("")?;
        st.row(vec![
            "mean over sources".into(),
            rows.iter()
                .filter(|r| calibrate::counted(r))
                .count()
                .to_string(),
            format!("{loso_mean:.1}"),
            format!("{ins_mean:.1}"),
        ]);
        st.print(&mut out)?;
        out.line("")?;
        ft::print_report(&mut out, &ftr)?;
        out.line("")?;
    }
    ftk::jsonl::write_record(&mut out, &summary)?;
    out.flush()
}

/// Run the tool.
pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        None => run_predict(a.predict),
        Some(Cmd::Tune {
            common,
            gbs,
            top,
            no_timing,
        }) => run_tune(common, gbs, top, no_timing),
        Some(Cmd::Calibrate {
            data,
            fit,
            table,
            iters,
        }) => run_calibrate(data, fit, table, iters),
    }
}
