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

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Ft {
    /// Mean time between job interruptions, hours (null when no failures).
    pub job_mtbf_h: Option<f64>,
    pub ckpt_s: f64,
    pub restart_s: f64,
    /// Checkpoint interval used (given, or Daly's optimum); null without failures.
    pub ckpt_interval_s: Option<f64>,
    /// Expected interruptions over the run (null without run.tokens).
    pub expected_failures: Option<f64>,
    /// Useful training time / wall time.
    pub goodput: f64,
}

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

/// The fault-tolerance block; `solve_s` is failure-free training time.
pub fn fault_tolerance(job: &Job, solve_s: Option<f64>) -> (Ft, Option<f64>) {
    let r = &job.run;
    let c = &job.cluster;
    let nodes = c.gpus.div_ceil(c.gpus_per_node) as f64;
    let per_hour =
        r.gpu_failure_rate_per_hour * c.gpus as f64 + r.node_failure_rate_per_hour * nodes;
    let ckpt_s = job.model.total_params() as f64 * CKPT_BYTES_PER_PARAM / (r.ckpt_write_gbps * 1e9);
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
        // Checkpoint: 405.9B params · 14 B / 2 TB/s ≈ 2.8 s.
        assert!((ft.ckpt_s - job.model.total_params() as f64 * 14.0 / 2e12).abs() < 1e-9);
    }
}
