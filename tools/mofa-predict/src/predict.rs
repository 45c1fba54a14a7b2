//! One prediction: time model + memory + fault tolerance as the output record.

use crate::ft::{self, Ft};
use crate::input::Job;
use crate::mem;
use crate::perf::{self, Breakdown, Calib, Terms};
use ftk::records::{MofaPredict, MofaStrategy, MofaTune, Tag};

/// One job's prediction; [`Prediction::record`] is its wire format
/// (`{"kind":"mofa_predict", ...}`, see `--help`).
#[derive(Clone, Debug)]
pub struct Prediction {
    pub id: serde_json::Value,
    pub iter_s: f64,
    /// Model FLOP/s per GPU (Megatron's convention, no recompute), TFLOP/s.
    pub tflops_per_gpu: f64,
    /// Hardware FLOP/s per GPU including recomputed FLOPs, TFLOP/s.
    pub hw_tflops_per_gpu: f64,
    pub mfu: f64,
    pub tokens_per_s: f64,
    pub mem_gb_per_gpu: f64,
    pub fits: bool,
    pub breakdown: Breakdown,
    pub ft: Ft,
    /// Wall-clock days for run.tokens including failures (null without it).
    pub train_days: Option<f64>,
    pub params_b: f64,
    pub gpus: u64,
    pub bottleneck: &'static str,
}

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

pub fn predict(job: &Job, c: &Calib) -> Prediction {
    let t = perf::predict_time(job, c);
    let gpus = job.cluster.gpus as f64;
    let tokens_per_iter = job.strategy.gbs as f64 * job.seq as f64;
    let tokens_per_s = tokens_per_iter / t.iter_s;
    let tflops = t.model_flops / t.iter_s / gpus / 1e12;
    let hw_tflops = t.hw_flops / t.iter_s / gpus / 1e12;
    let solve = job.run.tokens.map(|n| n / tokens_per_s);
    let (ft, wall) = ft::fault_tolerance(job, solve);
    let mem = mem::peak_bytes(job);
    Prediction {
        id: job.id.clone(),
        iter_s: t.iter_s,
        tflops_per_gpu: tflops,
        hw_tflops_per_gpu: hw_tflops,
        mfu: tflops / job.cluster.peak_tflops,
        tokens_per_s,
        mem_gb_per_gpu: mem / 1e9,
        fits: mem <= mem::ALPHA * job.cluster.hbm_gb * 1e9,
        bottleneck: bottleneck(&t.breakdown, ft.goodput, t.iter_s),
        breakdown: t.breakdown,
        ft,
        train_days: wall.map(|w| w / 86400.0),
        params_b: job.model.total_params() as f64 / 1e9,
        gpus: job.cluster.gpus,
    }
}

impl Prediction {
    /// The `mofa_predict` record, with the defaults the job took.
    pub fn record(&self, assumed: Vec<String>) -> MofaPredict {
        MofaPredict {
            kind: Tag::default(),
            id: self.id.clone(),
            iter_s: self.iter_s,
            tflops_per_gpu: self.tflops_per_gpu,
            hw_tflops_per_gpu: self.hw_tflops_per_gpu,
            mfu: self.mfu,
            tokens_per_s: self.tokens_per_s,
            mem_gb_per_gpu: self.mem_gb_per_gpu,
            fits: self.fits,
            breakdown: self.breakdown,
            ft: self.ft,
            train_days: self.train_days,
            params_b: self.params_b,
            gpus: self.gpus,
            bottleneck: self.bottleneck.to_string(),
            assumed,
        }
    }

    /// The `mofa_tune` record of the strategy ranked `rank`; its id is the
    /// strategy in compact form.
    pub fn tune_record(&self, rank: usize, strategy: MofaStrategy, id: String) -> MofaTune {
        MofaTune {
            rank: rank as u64,
            strategy,
            kind: Tag::default(),
            id: serde_json::Value::String(id),
            iter_s: self.iter_s,
            tflops_per_gpu: self.tflops_per_gpu,
            hw_tflops_per_gpu: self.hw_tflops_per_gpu,
            mfu: self.mfu,
            tokens_per_s: self.tokens_per_s,
            mem_gb_per_gpu: self.mem_gb_per_gpu,
            fits: self.fits,
            breakdown: self.breakdown,
            ft: self.ft,
            train_days: self.train_days,
            params_b: self.params_b,
            gpus: self.gpus,
            bottleneck: self.bottleneck.to_string(),
        }
    }
}
