//! `mofa-predict calibrate`: predict every published measurement of the
//! corpus and report the **leave-one-source-out** error: for each source,
//! the free constants are fitted on all the other sources and that source is
//! predicted with them. The headline is the mean over sources of those
//! per-source MAPEs, so a large source cannot hide a badly predicted small
//! one and nothing is scored on the rows it was fitted to.
//!
//! Rows come from JSON-lines files in the input schema plus `measured`
//! (`metric`, `value`), `source` (`paper`, `where`) and optional annotations.
//! A source is one corpus file (`corpus/<source>.jsonl`); rows of files
//! outside a `corpus` directory (the original measurements.jsonl) are
//! grouped by their paper (`narayanan2021`, `dubey2024`, ...).

use crate::cluster::{Cluster, PCIE_CLOCK};
use crate::input::{job_from_value, Fallback, Job, Obj};
use crate::perf::Calib;
use crate::predict::predict;
use ftk::jsonl::Reader;
use ftk::records::MofaMetrics;
use ftk::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;

/// The corpus compiled into the binary (so `calibrate` works from any
/// directory): (file name, contents), from build.rs.
pub const EMBEDDED: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/corpus.rs"));

/// What a row measured, as the model predicts it.
pub const METRICS: &[&str] = &[
    "model_tflops_per_gpu",
    "hw_tflops_per_gpu",
    "iter_s",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "mfu",
    "hfu",
];

/// One published measurement with the job that produced it.
#[derive(Clone)]
pub struct Row {
    pub job: Job,
    pub id: String,
    /// The source it belongs to (what leave-one-source-out leaves out).
    pub source: String,
    pub paper: String,
    pub confidence: String,
    pub metric: String,
    pub value: f64,
    /// Read from a `corpus/` file (a source of its own).
    pub in_corpus: bool,
}

/// `narayanan2021` from "Narayanan et al. 2021, Efficient ...": first word
/// and first year of the citation.
pub fn paper_key(paper: &str) -> String {
    let word: String = paper
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    let year = paper
        .as_bytes()
        .windows(4)
        .find(|w| w.iter().all(u8::is_ascii_digit) && (w[0] == b'1' || w[0] == b'2'))
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .unwrap_or_default();
    format!("{word}{year}")
}

/// The source key of a file's rows: its stem inside a `corpus` directory,
/// `None` (group by paper) elsewhere.
pub fn file_source(name: &str) -> Option<String> {
    let p = std::path::Path::new(name);
    let in_corpus = p
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|d| d == "corpus");
    in_corpus.then(|| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

pub fn read_rows(name: &str, r: impl BufRead) -> Result<Vec<Row>> {
    let file_src = file_source(name);
    let mut rd = Reader::new(name, r);
    let mut rows = vec![];
    while let Some(line) = rd.next_line()? {
        let v: Value = serde_json::from_str(line).map_err(|e| rd.decode_error(&e))?;
        let here = rd.here();
        let job = job_from_value(&v, &Fallback::default(), &here)?;
        let Value::Object(map) = &v else {
            unreachable!("checked by job_from_value")
        };
        let root = Obj::new(map, "", &here);
        let meas = root
            .obj("measured")?
            .ok_or_else(|| root.err("measured", "missing"))?;
        let metric = meas.opt_str("metric")?.unwrap_or("").to_string();
        if !METRICS.contains(&metric.as_str()) {
            return Err(meas.err(
                "metric",
                format!("must be one of {}, got '{metric}'", METRICS.join(", ")),
            ));
        }
        let src = root
            .obj("source")?
            .ok_or_else(|| root.err("source", "missing (every row needs its citation)"))?;
        let paper = src
            .opt_str("paper")?
            .ok_or_else(|| src.err("paper", "missing"))?;
        src.opt_str("where")?
            .ok_or_else(|| src.err("where", "missing (table or figure)"))?;
        let id = match map.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => format!("{name}:{}", rd.line_no()),
        };
        rows.push(Row {
            id,
            source: file_src.clone().unwrap_or_else(|| paper_key(paper)),
            paper: paper.to_string(),
            confidence: root.opt_str("confidence")?.unwrap_or("high").to_string(),
            metric,
            value: meas.num("value", None, false)?,
            in_corpus: file_src.is_some(),
            job,
        });
    }
    Ok(rows)
}

/// Every embedded corpus file's rows.
pub fn embedded_rows() -> Result<Vec<Row>> {
    let mut rows = vec![];
    for (name, text) in EMBEDDED {
        rows.extend(read_rows(name, text.as_bytes())?);
    }
    Ok(dedupe(rows))
}

/// Drop rows outside `corpus/` whose paper a corpus file also transcribes
/// (Llama 3's Table 4 is in both): the corpus file is that source.
pub fn dedupe(rows: Vec<Row>) -> Vec<Row> {
    let corpus_papers: std::collections::HashSet<String> = rows
        .iter()
        .filter(|r| r.in_corpus)
        .map(|r| paper_key(&r.paper))
        .collect();
    rows.into_iter()
        .filter(|r| r.in_corpus || !corpus_papers.contains(&paper_key(&r.paper)))
        .collect()
}

/// The row's metric from a prediction.
pub fn metric_of(p: &MofaMetrics, metric: &str, job: &Job) -> f64 {
    match metric {
        "hw_tflops_per_gpu" => p.hw_tflops_per_gpu,
        "iter_s" => p.iter_s,
        "tokens_per_s" => p.tokens_per_s,
        "tokens_per_s_per_gpu" => p.tokens_per_s / job.cluster.gpus as f64,
        "mfu" => p.mfu,
        "hfu" => p.hw_tflops_per_gpu / job.cluster.peak_tflops,
        _ => p.tflops_per_gpu,
    }
}

/// Whether the error of a prediction is that of a rate (higher is faster)
/// or of a time: every metric here is a rate except iter_s.
fn is_time(metric: &str) -> bool {
    metric == "iter_s"
}

/// What the model predicts for a row's metric.
pub fn predicted(row: &Row, c: &Calib) -> f64 {
    metric_of(&predict(&row.job, c).metrics, &row.metric, &row.job)
}

/// Absolute percentage error.
pub fn ape(pred: f64, meas: f64) -> f64 {
    (pred - meas).abs() / meas * 100.0
}

/// Signed error as "too fast" (+) or "too slow" (−), in percent of the
/// measured rate, whatever the metric.
pub fn speed_error(pred: f64, meas: f64, metric: &str) -> f64 {
    if is_time(metric) {
        (meas / pred - 1.0) * 100.0
    } else {
        (pred / meas - 1.0) * 100.0
    }
}

pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        f64::NAN
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Rows that count for the headline numbers (confidence not "low").
pub fn counted(r: &Row) -> bool {
    r.confidence != "low"
}

/// The sources that count (some row not of low confidence), in order,
/// with the indices of their counted rows.
pub fn sources(rows: &[Row]) -> BTreeMap<String, Vec<usize>> {
    let mut m = all_sources(rows);
    m.retain(|_, v| !v.is_empty());
    m
}

/// Every source, also those with only low-confidence rows (predicted, not
/// counted).
pub fn all_sources(rows: &[Row]) -> BTreeMap<String, Vec<usize>> {
    let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let e = m.entry(r.source.clone()).or_default();
        if counted(r) {
            e.push(i);
        }
    }
    m
}

/// The free constants, all physical: best-GEMM efficiency of A100 and H100
/// (fraction of peak), the GEMM size at half efficiency, the elementwise
/// HBM bytes per token and hidden unit, and the fraction of link bandwidth
/// collectives reach.
pub const PARAMS: &[&str] = &[
    "a100_gemm_eff",
    "h100_gemm_eff",
    "gemm_x0",
    "elem_bytes",
    "comm_eff",
    "attn_eff",
];
const BOUNDS: [(f64, f64); 6] = [
    (0.3, 1.0),
    (0.2, 1.0),
    (1.0, 1024.0),
    (0.0, 200.0),
    (0.2, 1.0),
    (0.2, 1.5),
];
pub type X = [f64; 6];
/// Which constants the fit moves: the best-GEMM efficiencies and the
/// attention-kernel efficiency. The others stay at their cited or assumed
/// values: freeing them let each fold wander to constants that predict its
/// held-out source worse (see README, "How the fit was chosen").
pub const FREE: [bool; 6] = [true, true, false, false, false, true];

/// The shipped constants as a parameter vector.
pub fn start(c: &Calib) -> X {
    [
        crate::cluster::A100_GEMM_EFF,
        crate::cluster::H100_GEMM_EFF,
        c.gemm_x0,
        c.elem_bytes,
        c.comm_eff,
        c.attn_eff,
    ]
}

/// Put `x` into the rows' clusters (GEMM efficiencies live there) and the
/// returned constants.
pub fn apply(rows: &mut [Row], x: &X, base: &Calib) -> Calib {
    for r in rows.iter_mut() {
        let c: &mut Cluster = &mut r.job.cluster;
        c.gemm_eff = match c.gpu.as_str() {
            "A100-40GB" | "A100-80GB" => x[0],
            "A100-PCIe-40GB" | "A100-PCIe-80GB" => PCIE_CLOCK * x[0],
            "H100" | "H200" | "H100-PCIe" => x[1],
            _ => c.gemm_eff,
        };
    }
    Calib {
        gemm_x0: x[2],
        elem_bytes: x[3],
        comm_eff: x[4],
        attn_eff: x[5],
        ..*base
    }
}

/// Mean over the sources in `rows` of each source's MAPE (counted rows).
pub fn mean_source_mape(rows: &[Row], c: &Calib) -> f64 {
    let per: Vec<f64> = sources(rows)
        .values()
        .map(|idx| {
            mean(
                &idx.iter()
                    .map(|&i| ape(predicted(&rows[i], c), rows[i].value))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    mean(&per)
}

/// Nelder-Mead on `rows`' mean-over-sources MAPE, from `x0`. Returns the
/// fitted vector and the constants; the rows' clusters carry the fit.
pub fn fit(rows: &mut [Row], base: &Calib, x0: X, iters: usize) -> (X, Calib) {
    const N: usize = 6;
    let mut obj = |x: &X| -> f64 {
        if x.iter().zip(BOUNDS).any(|(v, (lo, hi))| *v < lo || *v > hi) {
            return f64::INFINITY;
        }
        let c = apply(rows, x, base);
        mean_source_mape(rows, &c)
    };
    let free: Vec<usize> = (0..N).filter(|&k| FREE[k]).collect();
    let m = free.len();
    let mut simplex: Vec<(X, f64)> = (0..=m)
        .map(|i| {
            let mut x = x0;
            if i > 0 {
                let k = free[i - 1];
                x[k] = if x[k] == 0.0 { 5.0 } else { x[k] * 0.9 };
            }
            let f = obj(&x);
            (x, f)
        })
        .collect();
    for _ in 0..iters {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut cen = [0.0; N];
        for (x, _) in &simplex[..m] {
            for k in 0..N {
                cen[k] += x[k] / m as f64;
            }
        }
        let worst = simplex[m];
        let at = |t: f64| -> X { std::array::from_fn(|k| cen[k] + t * (worst.0[k] - cen[k])) };
        let xr = at(-1.0);
        let fr = obj(&xr);
        if fr < simplex[0].1 {
            let xe = at(-2.0);
            let fe = obj(&xe);
            simplex[m] = if fe < fr { (xe, fe) } else { (xr, fr) };
        } else if fr < simplex[m - 1].1 {
            simplex[m] = (xr, fr);
        } else {
            let xc = at(0.5);
            let fc = obj(&xc);
            if fc < worst.1 {
                simplex[m] = (xc, fc);
            } else {
                let best = simplex[0].0;
                for s in simplex.iter_mut().skip(1) {
                    s.0 = std::array::from_fn(|k| best[k] + 0.5 * (s.0[k] - best[k]));
                    s.1 = obj(&s.0);
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    let x = simplex[0].0;
    let c = apply(rows, &x, base);
    (x, c)
}

/// One source predicted by a model fitted without it.
#[derive(Clone, Debug, Serialize)]
pub struct Fold {
    pub source: String,
    /// Counted rows of the source.
    pub n: usize,
    /// Constants fitted on every other source.
    pub fitted: X,
    /// (row index, prediction) for every row of the source.
    pub predictions: Vec<(usize, f64)>,
    pub mape: f64,
}

/// Leave-one-source-out: for each source, fit on the rows of all other
/// sources (the held-out rows are removed before the fit, so they cannot
/// influence it) and predict the held-out source. Sources run in parallel.
pub fn loso(rows: &[Row], base: &Calib, iters: usize) -> Vec<Fold> {
    let srcs: Vec<(String, Vec<usize>)> = all_sources(rows).into_iter().collect();
    srcs.par_iter()
        .map(|(s, idx)| {
            let mut train: Vec<Row> = rows.iter().filter(|r| &r.source != s).cloned().collect();
            let (x, c) = fit(&mut train, base, start(base), iters);
            let mut held: Vec<Row> = rows.iter().filter(|r| &r.source == s).cloned().collect();
            let c = apply(&mut held, &x, &c);
            let all: Vec<usize> = (0..rows.len()).filter(|&i| &rows[i].source == s).collect();
            let predictions: Vec<(usize, f64)> = all
                .iter()
                .zip(&held)
                .map(|(&i, r)| (i, predicted(r, &c)))
                .collect();
            let apes: Vec<f64> = predictions
                .iter()
                .filter(|(i, _)| idx.contains(i))
                .map(|&(i, p)| ape(p, rows[i].value))
                .collect();
            Fold {
                source: s.clone(),
                n: idx.len(),
                fitted: x,
                predictions,
                mape: mean(&apes),
            }
        })
        .collect()
}

/// Baseline: one constant MFU (measured model FLOP/s over peak, per GPU
/// generation where the training sources have it), leave-one-source-out;
/// mean over sources of the per-source MAPE. Only rows whose metric is a
/// FLOP rate or MFU take part.
pub fn constant_mfu_baseline(rows: &[Row]) -> f64 {
    let frac = |r: &Row| -> Option<f64> {
        let peak = r.job.cluster.peak_tflops;
        match r.metric.as_str() {
            "model_tflops_per_gpu" | "hw_tflops_per_gpu" => Some(r.value / peak),
            "mfu" | "hfu" => Some(r.value),
            _ => None,
        }
    };
    let per: Vec<f64> = sources(rows)
        .iter()
        .filter_map(|(s, idx)| {
            let train: Vec<(&str, f64)> = rows
                .iter()
                .filter(|r| &r.source != s && counted(r))
                .filter_map(|r| frac(r).map(|f| (r.job.cluster.gpu.as_str(), f)))
                .collect();
            let apes: Vec<f64> = idx
                .iter()
                .filter_map(|&i| {
                    let r = &rows[i];
                    let f = frac(r)?;
                    let same: Vec<f64> = train
                        .iter()
                        .filter(|(g, _)| *g == r.job.cluster.gpu)
                        .map(|x| x.1)
                        .collect();
                    let guess = if same.is_empty() {
                        mean(&train.iter().map(|x| x.1).collect::<Vec<_>>())
                    } else {
                        mean(&same)
                    };
                    Some(ape(guess, f))
                })
                .collect();
            (!apes.is_empty()).then(|| mean(&apes))
        })
        .collect();
    mean(&per)
}

/// Refuse an empty corpus and duplicate ids (a row counted twice would
/// weigh twice).
pub fn check(rows: &[Row]) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::input("calibrate: no measurement rows"));
    }
    let mut seen = std::collections::HashSet::new();
    for r in rows {
        if !seen.insert((&r.source, &r.id)) {
            return Err(Error::input(format!(
                "calibrate: source {}: row id '{}' appears twice",
                r.source, r.id
            )));
        }
    }
    if sources(rows).len() < 2 {
        return Err(Error::input(
            "calibrate: leave-one-source-out needs rows from at least two sources",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_files_in_corpus_or_papers_elsewhere() {
        assert_eq!(
            paper_key("Narayanan et al. 2021, Efficient Large-Scale"),
            "narayanan2021"
        );
        assert_eq!(
            paper_key("BigScience 2022, BLOOM: A 176B"),
            "bigscience2022"
        );
        assert_eq!(
            file_source("testdata/mofa-predict/corpus/mosaicml.jsonl").as_deref(),
            Some("mosaicml")
        );
        assert_eq!(file_source("corpus/x.jsonl").as_deref(), Some("x"));
        assert_eq!(
            file_source("testdata/mofa-predict/measurements.jsonl"),
            None
        );
    }

    #[test]
    fn llama3_table4_is_counted_once() {
        let rows = embedded_rows().unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert!(ids.contains(&"llama3-405b-g8192-cp1-s8192"));
        assert!(!ids.contains(&"llama3-405B-8192-cp1"));
        assert!(rows.iter().all(|r| r.source != "dubey2024"));
        check(&rows).unwrap();
    }

    /// The property leave-one-source-out rests on: the constants that
    /// predict source S are fitted without S's rows. Garbling S's
    /// measurements must leave S's fold (fit and predictions) exactly as it
    /// was, while folds that train on S see the change.
    #[test]
    fn a_fold_never_sees_its_held_out_source() {
        let rows = embedded_rows().unwrap();
        let srcs = sources(&rows);
        assert!(srcs.len() >= 3);
        let held = srcs.keys().next().unwrap().clone();
        let base = crate::perf::CALIB;
        let f1 = loso(&rows, &base, 6);
        let mut garbled = rows.clone();
        for r in garbled.iter_mut().filter(|r| r.source == held) {
            r.value *= 3.0;
        }
        let f2 = loso(&garbled, &base, 6);
        let mut others_changed = false;
        for (a, b) in f1.iter().zip(&f2) {
            assert_eq!(a.source, b.source);
            if a.source == held {
                assert_eq!(a.fitted, b.fitted);
                assert_eq!(a.predictions, b.predictions);
                assert_ne!(
                    a.mape, b.mape,
                    "the held-out error is scored on its measurements"
                );
            } else {
                others_changed |= a.fitted != b.fitted;
            }
        }
        assert!(
            others_changed,
            "no fold that trains on {held} noticed its rows"
        );
        // Every row is predicted by exactly one fold: its own source's.
        let mut seen = vec![0; rows.len()];
        for f in &f1 {
            for &(i, _) in &f.predictions {
                assert_eq!(rows[i].source, f.source);
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}
