//! One prediction: time model + memory + fault tolerance as the output record.

use crate::ft;
use crate::input::Job;
use crate::mem;
use crate::perf::{self, Breakdown, Calib, Terms};
use ftk::records::{MofaMetrics, MofaPredict, Tag};

/// The dominant cause of lost time: the largest breakdown term, or
/// `fault_tolerance` when failures and checkpoints cost more.
pub fn bottleneck(b: &Breakdown, goodput: f64, iter_s: f64) -> &'static str {
    let ft_s = iter_s * (1.0 / goodput - 1.0);
    b.terms()
        .into_iter()
        .chain(std::iter::once(("fault_tolerance", ft_s)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or("compute", |t| t.0)
}

/// One job's prediction as its `mofa_predict` record (no defaults listed in
/// `assumed` yet: the caller knows which the job took).
pub fn predict(job: &Job, c: &Calib) -> MofaPredict {
    let t = perf::predict_time(job, c);
    let gpus = job.cluster.gpus as f64;
    let tokens_per_iter = job.strategy.gbs as f64 * job.seq as f64;
    let tokens_per_s = tokens_per_iter / t.iter_s;
    let tflops = t.model_flops / t.iter_s / gpus / 1e12;
    let hw_tflops = t.hw_flops / t.iter_s / gpus / 1e12;
    let solve = job.run.tokens.map(|n| n / tokens_per_s);
    let (ft, wall) = ft::fault_tolerance(job, solve);
    let mem = mem::peak_bytes(job);
    let metrics = MofaMetrics {
        iter_s: t.iter_s,
        tflops_per_gpu: tflops,
        hw_tflops_per_gpu: hw_tflops,
        mfu: tflops / job.cluster.peak_tflops,
        tokens_per_s,
        mem_gb_per_gpu: mem / 1e9,
        fits: mem <= mem::ALPHA * job.cluster.hbm_gb * 1e9,
        bottleneck: bottleneck(&t.breakdown, ft.goodput, t.iter_s).to_string(),
        breakdown: t.breakdown,
        ft,
        train_days: wall.map(|w| w / 86400.0),
        params_b: job.model.total_params() as f64 / 1e9,
        gpus: job.cluster.gpus,
    };
    MofaPredict {
        kind: Tag::default(),
        id: job.id.clone(),
        metrics,
        assumed: vec![],
    }
}
