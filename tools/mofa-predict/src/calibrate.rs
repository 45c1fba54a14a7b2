//! `mofa-predict calibrate`: predict every published measurement, report the
//! error on the calibration and validation rows, and (with `--fit`) refit
//! the free constants on the calibration rows only.

use crate::cluster::Cluster;
use crate::input::{job_from_value, Fallback, Job, Obj};
use crate::perf::Calib;
use crate::predict::predict;
use ftk::jsonl::Reader;
use ftk::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::io::BufRead;

/// One published measurement with the job that produced it.
pub struct Row {
    pub job: Job,
    pub id: String,
    pub source: String,
    pub split: String,
    pub confidence: String,
    /// "model_tflops_per_gpu" or "hw_tflops_per_gpu".
    pub metric: String,
    pub value: f64,
}

pub fn read_rows(name: &str, r: impl BufRead) -> Result<Vec<Row>> {
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
        if metric != "model_tflops_per_gpu" && metric != "hw_tflops_per_gpu" {
            return Err(meas.err(
                "metric",
                "must be model_tflops_per_gpu or hw_tflops_per_gpu",
            ));
        }
        let split = root.opt_str("split")?.unwrap_or("").to_string();
        if split != "calib" && split != "valid" {
            return Err(root.err("split", "must be calib or valid"));
        }
        let src = root
            .obj("source")?
            .ok_or_else(|| root.err("source", "missing (every row needs its citation)"))?;
        let paper = src
            .opt_str("paper")?
            .ok_or_else(|| src.err("paper", "missing"))?;
        src.opt_str("where")?
            .ok_or_else(|| src.err("where", "missing (table or figure)"))?;
        rows.push(Row {
            id: v["id"].as_str().unwrap_or("").to_string(),
            source: paper.to_string(),
            split,
            confidence: root.opt_str("confidence")?.unwrap_or("high").to_string(),
            metric,
            value: meas.num("value", None, false)?,
            job,
        });
    }
    if rows.is_empty() {
        return Err(Error::input(format!("{name}: no measurement rows")));
    }
    Ok(rows)
}

/// What the model predicts for a row's metric.
pub fn predicted(row: &Row, c: &Calib) -> f64 {
    let p = predict(&row.job, c);
    if row.metric == "hw_tflops_per_gpu" {
        p.hw_tflops_per_gpu
    } else {
        p.tflops_per_gpu
    }
}

/// Absolute percentage error of each row.
pub fn apes(rows: &[&Row], c: &Calib) -> Vec<f64> {
    rows.iter()
        .map(|r| (predicted(r, c) - r.value).abs() / r.value * 100.0)
        .collect()
}

pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        f64::NAN
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Rows that count for the headline numbers (confidence not "low").
pub fn split<'a>(rows: &'a [Row], which: &str) -> Vec<&'a Row> {
    rows.iter()
        .filter(|r| r.split == which && r.confidence != "low")
        .collect()
}

/// The free parameters: A100 and H100 best-GEMM efficiency, gemm_x0, elem_bytes.
fn apply(rows: &mut [Row], x: &[f64; 4], base: &Calib) -> Calib {
    for r in rows.iter_mut() {
        let c: &mut Cluster = &mut r.job.cluster;
        if c.gpu.starts_with("A100") {
            c.gemm_eff = x[0];
        } else if c.gpu.starts_with("H100") {
            c.gemm_eff = x[1];
        }
    }
    Calib {
        gemm_x0: x[2],
        elem_bytes: x[3],
        ..*base
    }
}

/// Nelder-Mead on the calibration rows' MAPE. Returns the fitted vector.
pub fn fit(rows: &mut [Row], base: &Calib, start: [f64; 4]) -> ([f64; 4], Calib) {
    let bounds = [(0.3, 1.0), (0.2, 1.0), (1.0, 1024.0), (0.0, 200.0)];
    let mut obj = |x: &[f64; 4]| -> f64 {
        if x.iter().zip(bounds).any(|(v, (lo, hi))| *v < lo || *v > hi) {
            return f64::INFINITY;
        }
        let c = apply(rows, x, base);
        let calib: Vec<&Row> = split(rows, "calib");
        mean(&apes(&calib, &c))
    };
    let mut simplex: Vec<([f64; 4], f64)> = (0..5)
        .map(|i| {
            let mut x = start;
            if i > 0 {
                x[i - 1] *= 1.2;
                if x[i - 1] == 0.0 {
                    x[i - 1] = 5.0;
                }
            }
            let f = obj(&x);
            (x, f)
        })
        .collect();
    for _ in 0..600 {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut cen = [0.0; 4];
        for (x, _) in &simplex[..4] {
            for k in 0..4 {
                cen[k] += x[k] / 4.0;
            }
        }
        let worst = simplex[4];
        let at =
            |t: f64| -> [f64; 4] { std::array::from_fn(|k| cen[k] + t * (worst.0[k] - cen[k])) };
        let xr = at(-1.0);
        let fr = obj(&xr);
        if fr < simplex[0].1 {
            let xe = at(-2.0);
            let fe = obj(&xe);
            simplex[4] = if fe < fr { (xe, fe) } else { (xr, fr) };
        } else if fr < simplex[3].1 {
            simplex[4] = (xr, fr);
        } else {
            let xc = at(0.5);
            let fc = obj(&xc);
            if fc < worst.1 {
                simplex[4] = (xc, fc);
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

/// Baseline: one constant fraction of peak per GPU type, fitted as the mean
/// measured fraction on the calibration rows; MAPE on validation rows.
pub fn constant_mfu_baseline(rows: &[Row]) -> f64 {
    let frac = |r: &Row| r.value / r.job.cluster.peak_tflops;
    let calib = split(rows, "calib");
    let per_gpu = |gpu: &str| {
        let v: Vec<f64> = calib
            .iter()
            .filter(|r| r.job.cluster.gpu == gpu)
            .map(|r| frac(r))
            .collect();
        if v.is_empty() {
            mean(&calib.iter().map(|r| frac(r)).collect::<Vec<_>>())
        } else {
            mean(&v)
        }
    };
    let v: Vec<f64> = split(rows, "valid")
        .iter()
        .map(|r| {
            let p = per_gpu(&r.job.cluster.gpu) * r.job.cluster.peak_tflops;
            (p - r.value).abs() / r.value * 100.0
        })
        .collect();
    mean(&v)
}

#[derive(Serialize)]
pub struct RowOut<'a> {
    pub kind: &'static str,
    pub id: &'a str,
    pub source: &'a str,
    pub split: &'a str,
    pub confidence: &'a str,
    pub metric: &'a str,
    pub measured: f64,
    pub predicted: f64,
    pub ape: f64,
    pub fits: bool,
}
