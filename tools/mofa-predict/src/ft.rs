//! Fault tolerance: job failure rate, checkpoint cost, Young/Daly interval,
//! expected wall time and goodput.
//!
//! Daly, "A higher order estimate of the optimum checkpoint interval for
//! restart dumps", FGCS 22 (2006): with exponential failures of mean M,
//! checkpoint cost δ, restart R and interval τ, solving T_s takes
//! `T_w = M e^{R/M} (e^{(τ+δ)/M} − 1) T_s / τ` (eq. 13) and the optimum is
//! `τ = sqrt(2δM)[1 + (1/3)sqrt(δ/2M) + (1/9)(δ/2M)] − δ` for δ < 2M, else M
//! (eq. 37). Young (1974): τ ≈ sqrt(2δM).

use crate::input::{Job, CKPT_BYTES_PER_PARAM};

/// The fault-tolerance block of a prediction.
pub use ftk::records::MofaFt as Ft;

/// Daly's optimum checkpoint interval.
pub fn daly_interval(delta: f64, m: f64) -> f64 {
    if delta >= 2.0 * m {
        return m;
    }
    let r = delta / (2.0 * m);
    ((2.0 * delta * m).sqrt() * (1.0 + r.sqrt() / 3.0 + r / 9.0) - delta).max(delta.min(m))
}

/// Daly's expected wall time per second of solve time (1/goodput).
pub fn wall_per_solve(tau: f64, delta: f64, restart: f64, m: f64) -> f64 {
    m * (restart / m).exp() * (((tau + delta) / m).exp_m1()) / tau
}

/// Aggregate checkpoint write rate, GB/s: every node writes its shard at
/// `ckpt_gbps_per_node` until the filesystem's `ckpt_write_gbps` caps it.
pub fn ckpt_gbs(job: &Job) -> f64 {
    let c = &job.cluster;
    let nodes = c.gpus.div_ceil(c.gpus_per_node) as f64;
    (nodes * job.run.ckpt_gbps_per_node).min(job.run.ckpt_write_gbps)
}

/// The fault-tolerance block; `solve_s` is failure-free training time.
pub fn fault_tolerance(job: &Job, solve_s: Option<f64>) -> (Ft, Option<f64>) {
    let r = &job.run;
    let c = &job.cluster;
    let nodes = c.gpus.div_ceil(c.gpus_per_node) as f64;
    let per_hour =
        r.gpu_failure_rate_per_hour * c.gpus as f64 + r.node_failure_rate_per_hour * nodes;
    let ckpt_s = job.model.total_params() as f64 * CKPT_BYTES_PER_PARAM / (ckpt_gbs(job) * 1e9);
    if per_hour <= 0.0 {
        // No failures: checkpoints only at the interval given, if any.
        let overhead = r.ckpt_interval_s.map_or(1.0, |tau| (tau + ckpt_s) / tau);
        return (
            Ft {
                job_mtbf_h: None,
                ckpt_s,
                restart_s: r.restart_s,
                ckpt_interval_s: r.ckpt_interval_s,
                expected_failures: solve_s.map(|_| 0.0),
                goodput: 1.0 / overhead,
            },
            solve_s.map(|s| s * overhead),
        );
    }
    let m = 3600.0 / per_hour;
    let tau = r
        .ckpt_interval_s
        .unwrap_or_else(|| daly_interval(ckpt_s, m));
    let wps = wall_per_solve(tau, ckpt_s, r.restart_s, m);
    let wall = solve_s.map(|s| s * wps);
    (
        Ft {
            job_mtbf_h: Some(m / 3600.0),
            ckpt_s,
            restart_s: r.restart_s,
            ckpt_interval_s: Some(tau),
            expected_failures: wall.map(|w| w / m),
            goodput: 1.0 / wps,
        },
        wall,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daly_matches_hand_derived_values() {
        // δ = 60 s, M = 10 h: Young sqrt(2·60·36000) = 2078.46 s; Daly's
        // correction: r = 60/72000, ·(1 + sqrt(r)/3 + r/9) − 60 = 2038.65 s.
        let tau = daly_interval(60.0, 36000.0);
        assert!((tau - 2038.65).abs() < 0.01, "{tau}");
        // δ >= 2M: checkpoint once per MTBF.
        assert_eq!(daly_interval(100.0, 40.0), 40.0);
        // Small δ, R vs M: 1/goodput ≈ 1 + δ/τ + τ/(2M) + R/M to first order.
        let w = wall_per_solve(tau, 60.0, 600.0, 36000.0);
        let approx = 1.0 + 60.0 / tau + tau / 72000.0 + 600.0 / 36000.0;
        // Second-order terms, e.g. (R/M)(τ/2M), are about 1e-3 here.
        assert!((w - approx).abs() < 5e-3 && w > approx, "{w} vs {approx}");
    }

    #[test]
    fn llama3_scale_gives_three_hour_mtbf_and_over_90_percent_goodput() {
        use crate::input::{job_from_value, Fallback};
        let v = serde_json::json!({"model":{"layers":126,"hidden":16384,"heads":128,"kv_heads":8,"ffn":53248,
            "vocab":128256,"seq":8192},"cluster":{"gpu":"H100","gpus":16384},
            "strategy":{"tp":8,"pp":16,"mbs":1,"gbs":2048}});
        let job = job_from_value(&v, &Fallback::default(), "t").unwrap();
        let (ft, _) = fault_tolerance(&job, None);
        // 54 days · 24 h / 419 interruptions = 3.093 h.
        assert!((ft.job_mtbf_h.unwrap() - 54.0 * 24.0 / 419.0).abs() < 1e-9);
        // Llama 3 §3.3.4: "higher than 90% effective training time".
        assert!(ft.goodput > 0.9 && ft.goodput < 1.0, "{}", ft.goodput);
        // Checkpoint: 405.9B params · 14 B from 2048 nodes at 0.71 GB/s
        // each (1456 GB/s, under Tectonic's 2 TB/s) ≈ 3.9 s.
        let bw = 2048.0 * 273.0 / 384.0 * 1e9;
        assert!((ft.ckpt_s - job.model.total_params() as f64 * 14.0 / bw).abs() < 1e-9);
    }
}

/// What a reliability report counts as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counts {
    /// Every interruption of the job (hardware, software, manual restarts).
    All,
    /// Hardware failures only (GPU, host, network components).
    Hardware,
}

/// Share of Llama 3's 419 unexpected interruptions attributed to confirmed
/// or suspected hardware issues (Dubey et al. 2024 §3.3.4: "approximately
/// 78%"); the only report that splits its count, so the one that converts
/// between the two kinds of count.
pub const HARDWARE_SHARE: f64 = 0.78;

/// A published reliability figure: how often a training job was
/// interrupted on a cluster of a given size and generation.
pub struct MtbfReport {
    pub name: &'static str,
    pub cite: &'static str,
    pub generation: &'static str,
    pub gpus: f64,
    /// Mean time between the failures it counts, hours.
    pub mtbf_h: f64,
    pub counts: Counts,
}

impl MtbfReport {
    /// The per-GPU rate of every interruption this report implies.
    fn all_rate(&self) -> f64 {
        let r = 1.0 / (self.mtbf_h * self.gpus);
        match self.counts {
            Counts::All => r,
            Counts::Hardware => r / HARDWARE_SHARE,
        }
    }

    /// Its MTBF predicted from an all-interruption per-GPU rate.
    fn predict(&self, all_rate: f64) -> f64 {
        let r = match self.counts {
            Counts::All => all_rate,
            Counts::Hardware => all_rate * HARDWARE_SHARE,
        };
        1.0 / (r * self.gpus)
    }
}

/// The reports the failure model is checked on (fitted on one, predicted
/// on the others).
pub const MTBF_REPORTS: &[MtbfReport] = &[
    MtbfReport {
        name: "llama3",
        cite: "Dubey et al. 2024 (Llama 3) §3.3.4: 419 unexpected interruptions in 54 days on 16,384 H100",
        generation: "H100 SXM, 2024, Meta production cluster",
        gpus: 16384.0,
        mtbf_h: 54.0 * 24.0 / 419.0,
        counts: Counts::All,
    },
    MtbfReport {
        name: "bloom",
        cite: "BigScience BLOOM training chronicles (2022): about one GPU failure a week on 384 A100 (48 nodes)",
        generation: "A100 SXM 80GB, 2022, Jean Zay (HPE)",
        gpus: 384.0,
        mtbf_h: 7.0 * 24.0,
        counts: Counts::Hardware,
    },
    MtbfReport {
        name: "opt175b",
        cite: "Zhang et al. 2022 (OPT-175B logbook): 100+ restarts in about 2 months on 992 A100 80GB",
        generation: "A100 SXM 80GB, 2021-22, cloud cluster in bring-up",
        gpus: 992.0,
        mtbf_h: 60.0 * 24.0 / 100.0,
        counts: Counts::All,
    },
    MtbfReport {
        name: "meta-rsc",
        cite: "Kokolis et al. 2024 (arXiv 2410.21680): mean time to failure of a 1,024-GPU job, 7.9 h, on Meta's A100 research clusters (RSC-1, RSC-2)",
        generation: "A100, 2022-23, multi-tenant research cluster",
        gpus: 1024.0,
        mtbf_h: 7.9,
        counts: Counts::All,
    },
];

/// A published checkpoint write: bytes, rate and the nodes writing.
pub struct CkptReport {
    pub name: &'static str,
    pub cite: &'static str,
    pub nodes: f64,
    /// Aggregate write rate, GB/s.
    pub gbs: f64,
}

pub const CKPT_REPORTS: &[CkptReport] = &[
    CkptReport {
        name: "megatron-1t",
        cite: "Narayanan et al. 2021 §5.10: 13.8 TB at 273 GB/s from 384 DGX A100 nodes (Lustre)",
        nodes: 384.0,
        gbs: 273.0,
    },
    CkptReport {
        name: "llama3",
        cite: "Dubey et al. 2024 §3.3.4: Tectonic sustains 2 TB/s for checkpoints from 16,384 H100 (2,048 nodes)",
        nodes: 2048.0,
        gbs: 2000.0,
    },
];

pub use ftk::records::{MofaCrossCheck as CrossCheck, MofaFtReport as FtReport};

fn cross(fit_on: &str, predict: &str, published: f64, predicted: f64) -> CrossCheck {
    CrossCheck {
        ape: (predicted - published).abs() / published * 100.0,
        fit_on: fit_on.into(),
        predict: predict.into(),
        predicted,
        published,
    }
}

/// The fault-tolerance model against published reliability reports: the
/// job MTBF scales as 1/GPUs at a per-GPU rate (a hardware-only count is
/// [`HARDWARE_SHARE`] of every interruption) and the checkpoint rate as
/// the number of nodes; each is fitted on one report and predicts the rest.
pub fn reliability_report() -> FtReport {
    let mut mtbf = vec![];
    for f in MTBF_REPORTS {
        let rate = f.all_rate();
        for p in MTBF_REPORTS.iter().filter(|p| p.name != f.name) {
            mtbf.push(cross(f.name, p.name, p.mtbf_h, p.predict(rate)));
        }
    }
    let default: Vec<f64> = mtbf
        .iter()
        .filter(|c| c.fit_on == "llama3")
        .map(|c| c.ape)
        .collect();
    let mut ckpt = vec![];
    for f in CKPT_REPORTS {
        let per_node = f.gbs / f.nodes;
        for p in CKPT_REPORTS.iter().filter(|p| p.name != f.name) {
            ckpt.push(cross(f.name, p.name, p.gbs, per_node * p.nodes));
        }
    }
    FtReport {
        ckpt_gbs: ckpt,
        mtbf_default_mape: default.iter().sum::<f64>() / default.len() as f64,
        mtbf_h: mtbf,
        note:
            "generations differ: Llama 3 is a 2024 H100 production cluster; BLOOM, OPT and Meta's RSC \
               ran on 2021-23 A100 clusters, OPT's during bring-up (its restarts include software \
               faults and manual restarts) and RSC's shared by many research jobs; BLOOM counts \
               GPU failures only, predicted as Llama 3's hardware share (78%) of its interruptions"
                .into(),
    }
}

pub fn print_report(out: &mut ftk::cli::Stdout, r: &FtReport) -> ftk::Result<()> {
    let mut t = ftk::table::Table::new([
        "FT check",
        "fitted on",
        "predicts",
        "published",
        "predicted",
        "APE %",
    ]);
    for (what, v) in [("job MTBF h", &r.mtbf_h), ("ckpt GB/s", &r.ckpt_gbs)] {
        for c in v {
            t.row(vec![
                what.into(),
                c.fit_on.clone(),
                c.predict.clone(),
                format!("{:.1}", c.published),
                format!("{:.1}", c.predicted),
                format!("{:.0}", c.ape),
            ]);
        }
    }
    t.print(out)?;
    out.line(&format!(
        "default failure rate (Llama 3) on the other reports: {:.0}% mean APE; {}",
        r.mtbf_default_mape, r.note
    ))
}
