//! `mofa-predict tune`: enumerate valid strategies, predict each (rayon),
//! rank by time-to-train including fault tolerance, name each bottleneck.

use crate::input::{Job, Strategy};
use crate::perf::Calib;
use crate::predict::predict;
use ftk::records::{MofaMetrics, MofaTune, Tag};
use mem_plan::memory::Recompute;
use rayon::prelude::*;

/// The search space's knobs.
pub struct Space {
    pub mbs: Vec<u64>,
    pub vpp: Vec<u64>,
    pub zero: Vec<u64>,
    pub recompute: Vec<Recompute>,
    pub max_cp: u64,
}

impl Default for Space {
    fn default() -> Self {
        Space {
            mbs: vec![1, 2, 4],
            vpp: vec![1, 2, 4],
            zero: vec![0, 1, 3],
            recompute: vec![Recompute::None, Recompute::Selective, Recompute::Full],
            max_cp: 16,
        }
    }
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Every strategy for `base` (model, cluster with `gpus`, seq, gbs in
/// `base.strategy.gbs`) that passes the divisibility rules. Memory is
/// checked by the prediction (`fits`).
pub fn enumerate(base: &Job, sp: &Space) -> Vec<Job> {
    let m = &base.model;
    let n = base.cluster.gpus;
    let gbs = base.strategy.gbs;
    let heads = m.heads();
    let kv = m.kv_heads();
    let mut out = vec![];
    let tps: Vec<u64> = divisors(base.cluster.gpus_per_node)
        .into_iter()
        .filter(|t| heads.is_multiple_of(*t) && (kv.is_multiple_of(*t) || t.is_multiple_of(kv)))
        .collect();
    for &tp in &tps {
        for pp in divisors(n / tp)
            .into_iter()
            .filter(|p| *p <= m.layers && *p <= 128)
        {
            for cp in divisors(n / (tp * pp))
                .into_iter()
                .filter(|c| *c <= sp.max_cp && base.seq.is_multiple_of(*c))
            {
                let dp = n / (tp * pp * cp);
                if !gbs.is_multiple_of(dp) {
                    continue;
                }
                let eps: Vec<u64> = match &m.moe {
                    Some(x) => divisors(x.experts)
                        .into_iter()
                        .filter(|e| (dp * cp).is_multiple_of(*e))
                        .collect(),
                    None => vec![1],
                };
                for &ep in &eps {
                    for &vpp in sp
                        .vpp
                        .iter()
                        .filter(|v| **v == 1 || (pp > 1 && pp * **v <= m.layers))
                    {
                        for &mbs in sp.mbs.iter().filter(|b| gbs.is_multiple_of(*b * dp)) {
                            for &recompute in &sp.recompute {
                                for &zero in &sp.zero {
                                    let mut j = base.clone();
                                    j.strategy = Strategy {
                                        tp,
                                        pp,
                                        dp,
                                        cp,
                                        ep,
                                        vpp,
                                        mbs,
                                        gbs,
                                        recompute,
                                        zero,
                                        sp: tp > 1,
                                        etp: tp,
                                        // The same default a job gets.
                                        grad_bytes: crate::input::default_grad_bytes(
                                            zero,
                                            base.deepspeed,
                                        ),
                                        ..base.strategy.clone()
                                    };
                                    out.push(j);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Seconds per token at the wall clock (failures included): the ranking key.
pub fn wall_s_per_token(p: &MofaMetrics) -> f64 {
    1.0 / (p.tokens_per_s * p.ft.goodput)
}

pub struct Ranked {
    pub rank: usize,
    pub strategy: Strategy,
    pub prediction: MofaMetrics,
}

impl Ranked {
    /// The `mofa_tune` record.
    pub fn record(&self) -> MofaTune {
        MofaTune {
            rank: self.rank as u64,
            strategy: self.strategy.clone(),
            kind: Tag::default(),
            id: self.strategy.compact().into(),
            metrics: self.prediction.clone(),
        }
    }
}

pub struct Outcome {
    pub candidates: usize,
    pub fitting: usize,
    pub top: Vec<Ranked>,
}

pub fn tune(base: &Job, space: &Space, c: &Calib, top: usize) -> Outcome {
    let jobs = enumerate(base, space);
    let mut preds: Vec<(usize, MofaMetrics)> = jobs
        .par_iter()
        .enumerate()
        .map(|(i, j)| (i, predict(j, c).metrics))
        .filter(|(_, p)| p.fits && p.iter_s.is_finite())
        .collect();
    let fitting = preds.len();
    preds.sort_by(|a, b| {
        wall_s_per_token(&a.1)
            .total_cmp(&wall_s_per_token(&b.1))
            .then(a.0.cmp(&b.0))
    });
    let top = preds
        .into_iter()
        .take(top)
        .enumerate()
        .map(|(r, (i, p))| Ranked {
            rank: r + 1,
            strategy: jobs[i].strategy.clone(),
            prediction: p,
        })
        .collect();
    Outcome {
        candidates: jobs.len(),
        fitting,
        top,
    }
}
