//! mofa-predict: MoFa's pretraining performance model (arXiv 2511.09837):
//! iteration time, MFU and memory per GPU for TP/PP/DP/CP/EP/VPP, recompute,
//! ZeRO and overlap; fault tolerance (failures, checkpoints, restarts,
//! goodput); `tune` ranks strategies; `calibrate` reports the error on
//! published measurements.

pub mod calibrate;
pub mod cluster;
pub mod ft;
pub mod input;
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
use ftk::table::Table;
use ftk::{Error, Result};
use input::{Fallback, Job};
use predict::Prediction;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Output: one {\"kind\":\"mofa_predict\",\"id\",\"iter_s\",\"tflops_per_gpu\" (model FLOPs),
\"hw_tflops_per_gpu\" (with recompute),\"mfu\",\"tokens_per_s\",\"mem_gb_per_gpu\",\"fits\",
\"breakdown\":{\"compute_s\",\"recompute_s\",\"tp_comm_s\",\"cp_comm_s\",\"ep_comm_s\",\"pp_bubble_s\",
\"pp_p2p_s\",\"dp_comm_exposed_s\",\"optimizer_s\"},\"ft\":{\"job_mtbf_h\",\"ckpt_s\",\"restart_s\",
\"ckpt_interval_s\",\"expected_failures\",\"goodput\"},\"train_days\",\"params_b\",\"gpus\",\"bottleneck\"}
per input line. Bandwidths are GB/s per GPU per direction; cluster presets: V100, A100-40GB,
A100-80GB, H100, H200, B200, MI300X.

Examples:
  mofa-predict --model llama3-70b.json --seq 8192 --cluster H100 --gpus 1024 \\
    --strategy tp=8,pp=4,vpp=5,mbs=1,gbs=1024,recompute=selective,zero=1 --tokens 15e12 --table
  mofa-predict < jobs.jsonl > predictions.jsonl
  route-hist --synthetic zipf:1.2 --model mixtral.json --ep 8 > hist.jsonl
  mofa-predict --model mixtral.json --cluster H100 --gpus 1024 --strategy tp=2,pp=4,ep=8,gbs=1024 --route-hist hist.jsonl
  mofa-predict tune --model llama3-70b.json --seq 8192 --cluster H100 --gpus 1024 --gbs 1024 --top 10 --table
  mofa-predict calibrate testdata/mofa-predict/measurements.jsonl --table";

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
    /// Hugging Face config.json (or ftk model JSON): the model for records without one.
    #[arg(long, value_name = "CONFIG")]
    pub model: Option<PathBuf>,
    /// Sequence length when the model comes from --model.
    #[arg(long)]
    pub seq: Option<u64>,
    /// Cluster preset (V100, A100-40GB, A100-80GB, H100, H200, B200, MI300X).
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
    /// One job from flags: 'tp=8,pp=4,dp=32,cp=1,ep=1,vpp=1,mbs=1,gbs=1024,recompute=selective,zero=1,sp=true'.
    #[arg(long)]
    pub strategy: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Enumerate valid strategies, rank them by time-to-train including fault tolerance.
    Tune {
        #[command(flatten)]
        common: Common,
        /// Global batch size in sequences.
        #[arg(long)]
        gbs: u64,
        /// How many strategies to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Predict the published measurements and report MAPE on the calibration and validation rows.
    Calibrate {
        /// The measurements (input schema + measured, split, source).
        #[arg(default_value = "testdata/mofa-predict/measurements.jsonl")]
        data: PathBuf,
        /// Refit gemm_eff (A100, H100), gemm_x0 and elem_bytes on the calibration rows.
        #[arg(long)]
        fit: bool,
        #[arg(long)]
        table: bool,
    },
}

fn fallback(c: &Common) -> Result<Fallback> {
    let model = c.model.as_deref().map(ModelConfig::from_file).transpose()?;
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

fn print_predictions(out: &mut Stdout, preds: &[Prediction]) -> Result<()> {
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
    for p in preds {
        t.row(vec![
            match &p.id {
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
            p.bottleneck.into(),
        ]);
    }
    t.print(out)?;
    if let [p] = preds {
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

fn run_predict(a: PredictArgs) -> Result<()> {
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
    let mut preds = vec![];
    let mut emit = |out: &mut Stdout, p: Prediction, table: bool| -> Result<()> {
        if table {
            preds.push(p);
            Ok(())
        } else {
            ftk::jsonl::write_record(out, &p)
        }
    };
    if let Some(s) = &a.strategy {
        if a.input.is_some() {
            ftk::bail!("give either --strategy (one job from flags) or an input file, not both");
        }
        let strat = input::parse_kv(s, "--strategy")?;
        let mut rec = Map::new();
        rec.insert("id".into(), json!(s));
        rec.insert("strategy".into(), Value::Object(strat));
        let v = with_flags(Value::Object(rec), &a.common, imbalance);
        let job = input::job_from_value(&v, &fb, "--strategy")?;
        emit(&mut out, predict::predict(&job, &c), a.common.table)?;
    } else {
        let inp = Input::open(a.input.as_deref().unwrap_or(std::path::Path::new("-")))?;
        let mut rd = Reader::new(inp.name.clone(), inp.reader);
        while let Some(line) = rd.next_line()? {
            let v: Value = serde_json::from_str(line).map_err(|e| rd.decode_error(&e))?;
            let v = with_flags(v, &a.common, imbalance);
            let job = input::job_from_value(&v, &fb, &rd.here())?;
            emit(&mut out, predict::predict(&job, &c), a.common.table)?;
        }
    }
    if a.common.table {
        print_predictions(&mut out, &preds)?;
    }
    out.flush()
}

fn run_tune(c: Common, gbs: u64, top: usize) -> Result<()> {
    let fb = fallback(&c)?;
    if fb.model.is_none() || fb.cluster.is_none() || c.gpus.is_none() {
        ftk::bail!("tune needs --model, --cluster and --gpus");
    }
    if gbs == 0 || top == 0 {
        ftk::bail!("--gbs and --top must be at least 1");
    }
    let gpus = c.gpus.unwrap_or(1);
    let rec = with_flags(
        json!({"id": "tune", "strategy": {"gbs": gbs, "dp": gpus}}),
        &c,
        None,
    );
    let base: Job = input::job_from_value(&rec, &fb, "tune")?;
    let mut base = base;
    if let Some(p) = &c.route_hist {
        let i = Input::open(p)?;
        base.strategy.moe_imbalance = imbalance_from_hists(&i.name.clone(), i.reader)?;
    }
    let t0 = std::time::Instant::now();
    let o = tune::tune(&base, &tune::Space::default(), &perf::CALIB, top);
    let secs = t0.elapsed().as_secs_f64();
    let mut out = Stdout::new();
    let summary = json!({"kind": "mofa_tune_summary", "candidates": o.candidates, "fitting": o.fitting,
        "elapsed_s": secs, "strategies_per_s": o.candidates as f64 / secs.max(1e-9)});
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
                p.bottleneck.into(),
            ]);
        }
        t.print(&mut out)?;
        out.line(&format!(
            "{} strategies, {} fit; {:.0} strategies/s",
            o.candidates,
            o.fitting,
            o.candidates as f64 / secs.max(1e-9)
        ))?;
    } else {
        for r in &o.top {
            ftk::jsonl::write_record(&mut out, r)?;
        }
        ftk::jsonl::write_record(&mut out, &summary)?;
    }
    out.flush()
}

fn run_calibrate(data: PathBuf, fit: bool, table: bool) -> Result<()> {
    let inp = Input::open(&data)?;
    let mut rows = calibrate::read_rows(&inp.name.clone(), inp.reader)?;
    let base = perf::CALIB;
    let (c, fitted) = if fit {
        let start = [
            cluster::A100_GEMM_EFF,
            cluster::H100_GEMM_EFF,
            base.gemm_x0,
            base.elem_bytes,
        ];
        let (x, c) = calibrate::fit(&mut rows, &base, start);
        (c, Some(x))
    } else {
        (base, None)
    };
    let mut out = Stdout::new();
    let mut t = Table::new([
        "id",
        "split",
        "conf",
        "metric",
        "measured",
        "predicted",
        "APE %",
        "fits",
    ]);
    for r in &rows {
        let pred = predict::predict(&r.job, &c);
        let p = calibrate::predicted(r, &c);
        let o = calibrate::RowOut {
            kind: "mofa_calib_row",
            id: &r.id,
            source: &r.source,
            split: &r.split,
            confidence: &r.confidence,
            metric: &r.metric,
            measured: r.value,
            predicted: p,
            ape: (p - r.value).abs() / r.value * 100.0,
            fits: pred.fits,
        };
        if table {
            t.row(vec![
                r.id.clone(),
                r.split.clone(),
                r.confidence.clone(),
                r.metric.replace("_tflops_per_gpu", ""),
                format!("{:.1}", r.value),
                format!("{p:.1}"),
                format!("{:.1}", o.ape),
                if pred.fits { "yes".into() } else { "NO".into() },
            ]);
        } else {
            ftk::jsonl::write_record(&mut out, &o)?;
        }
    }
    let calib = calibrate::split(&rows, "calib");
    let valid = calibrate::split(&rows, "valid");
    let low: Vec<&calibrate::Row> = rows.iter().filter(|r| r.confidence == "low").collect();
    let mut by_source = Map::new();
    for r in &valid {
        by_source.entry(r.source.clone()).or_insert(json!(null));
    }
    for (k, v) in by_source.iter_mut() {
        let rs: Vec<&calibrate::Row> = valid.iter().copied().filter(|r| &r.source == k).collect();
        *v = json!({"n": rs.len(), "mape": calibrate::mean(&calibrate::apes(&rs, &c))});
    }
    let summary = json!({
        "kind": "mofa_calibrate",
        "n_calib": calib.len(),
        "n_valid": valid.len(),
        "n_low_confidence": low.len(),
        "mape_calib": calibrate::mean(&calibrate::apes(&calib, &c)),
        "mape_valid": calibrate::mean(&calibrate::apes(&valid, &c)),
        "mape_low_confidence": calibrate::mean(&calibrate::apes(&low, &c)),
        "baseline_constant_mfu_mape_valid": calibrate::constant_mfu_baseline(&rows),
        "valid_by_source": by_source,
        "calib": c,
        "fitted": fitted.map(|x| json!({"a100_gemm_eff": x[0], "h100_gemm_eff": x[1], "gemm_x0": x[2], "elem_bytes": x[3]})),
    });
    if table {
        t.print(&mut out)?;
        out.line("")?;
    }
    ftk::jsonl::write_record(&mut out, &summary)?;
    out.flush()
}

/// Run the tool.
pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        None => run_predict(a.predict),
        Some(Cmd::Tune { common, gbs, top }) => run_tune(common, gbs, top),
        Some(Cmd::Calibrate { data, fit, table }) => run_calibrate(data, fit, table),
    }
}
