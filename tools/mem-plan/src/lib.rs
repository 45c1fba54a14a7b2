//! mem-plan: MemFine's memory model. Static and activation memory per MoE
//! layer and EP rank for no, full and chunked recompute, and MACT's choice of
//! chunk count for a device budget.

pub mod layout;
pub mod memory;
pub mod plan;
pub mod routing;

pub mod cli;
pub use cli::Args;

use ftk::cli::Stdout;
use ftk::io::Input;
use ftk::memory::{Dims, RunShape};
use ftk::model::ModelConfig;
use ftk::records::{MemPlanSummary, Tag};
use ftk::size::format_bytes;
use ftk::table::Table;
use ftk::{Error, Result};
use layout::{Layout, Precision};
use plan::Inputs;

/// Run the tool.
pub fn run(a: Args) -> Result<()> {
    a.check()?;
    let m = ModelConfig::from_file(&a.model)?;
    let layout = Layout::new(a.tp, a.pp, a.ep, a.cp, a.dp, a.vpp, &m)?;
    let dt = a.dtype_bytes();
    let dims = Dims::new(
        &m,
        RunShape {
            dt,
            micro_batch: a.micro_batch,
            seq: a.seq,
            tp: a.tp,
            cp: a.cp,
        },
    );
    let recv = received(&a, &m)?;
    let budget = a.mact.budget();
    let inputs = Inputs {
        model: &m,
        layout,
        dims,
        precision: Precision::new(dt, a.grad_fp32, &a.optimizer),
        zero: a.zero,
        budget,
        bins: a.mact.chunk_bins.clone(),
        fixed_chunks: a.chunks,
        recv: &recv,
        dense_act: a.dense_act,
        sequence_parallel: a.sequence_parallel,
    };
    let mut p = plan::plan(&inputs);
    saturated(&p, &a)?;
    let summary = MemPlanSummary {
        kind: Tag::default(),
        model: m.arch.clone(),
        params: m.total_params(),
        layers: m.layers,
        moe_layers: m.moe_layers(),
        layout,
        micro_batch: a.micro_batch,
        seq: a.seq,
        dtype: a.dtype.clone(),
        optimizer: a.optimizer.clone(),
        zero: a.zero,
        routing: recv.source.clone(),
        hist_records: recv.hist_records,
        hist_layers: recv.hist_layers,
        device_bytes: a.mact.device_mem,
        alpha: a.mact.alpha,
        budget_bytes: budget.map(|b| b.floor() as u64),
        chunk_bins: a.mact.chunk_bins.clone(),
        chunks: p.chunks,
        peak_bytes: p.min_peak,
        fits: p.fits,
        dominant: p.dominant.to_string(),
        why: p.why.clone(),
        stages: std::mem::take(&mut p.stages),
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
            None => format!("any chunk count in {:?}", a.mact.chunk_bins),
        };
        return Err(Error::Negative(format!(
            "does not fit with {how}: the smallest peak is {} against a budget of {} (α={} × {}); {}",
            format_bytes(p.min_peak as f64),
            format_bytes(budget.unwrap_or(0.0)),
            a.mact.alpha,
            format_bytes(a.mact.device_mem.unwrap_or(0) as f64),
            p.why
        )));
    }
    Ok(())
}

/// The plan's byte counts are f64 rounded to u64, which saturates: a
/// count at u64::MAX is not an answer but an overflow (an absurd --seq,
/// --micro-batch or --tokens-received), so it is refused, not printed.
fn saturated(p: &plan::Plan, a: &Args) -> Result<()> {
    let over = p.min_peak == u64::MAX
        || p.records.iter().any(|r| {
            [
                r.tokens_received,
                r.static_bytes,
                r.layer_static_bytes,
                r.ckpt_bytes,
                r.act_bytes.none,
                r.act_bytes.full,
                r.act_bytes.chunked,
                r.peak_bytes,
            ]
            .contains(&u64::MAX)
        });
    if over {
        ftk::bail!(
            "--seq {} --micro-batch {}{}: the memory per device exceeds 2^64 bytes (16 EiB), beyond what mem-plan counts; lower them",
            a.seq,
            a.micro_batch,
            a.tokens_received
                .map(|t| format!(" --tokens-received {t}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// s' per MoE layer and EP rank: --tokens-received, route_hist records
/// (--hist FILE, or stdin with --hist -; stdin is never read unless asked)
/// or uniform routing.
fn received(a: &Args, m: &ModelConfig) -> Result<routing::Received> {
    let moe_layers = m.moe_layers() as usize;
    let ep = a.ep as usize;
    if let Some(n) = a.tokens_received {
        return Ok(routing::Received {
            per_layer: vec![vec![n; ep]; moe_layers],
            source: "tokens-received".into(),
            hist_records: 0,
            hist_layers: 0,
        });
    }
    let bs = (a.micro_batch * a.seq) as f64;
    let src = a.hist.clone();
    let from = match (src, &m.moe) {
        (Some(p), Some(x)) => {
            let input = Input::open(&p)?;
            let shape = routing::Expect {
                moe_layers,
                experts: x.experts,
                topk: x.topk,
                ep,
                bs,
            };
            routing::from_hists(&input.name.clone(), input.reader, &shape)?
        }
        _ => None,
    };
    if let (Some(p), None) = (&a.hist, &from) {
        ftk::bail!("{}: no route_hist records", p.display());
    }
    let topk = m.moe.as_ref().map_or(0, |x| x.topk);
    Ok(from.unwrap_or_else(|| routing::uniform(moe_layers, ep, bs, topk as f64)))
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

fn print_tables(out: &mut Stdout, p: &plan::Plan, s: &MemPlanSummary) -> Result<()> {
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
    for st in &s.stages {
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
