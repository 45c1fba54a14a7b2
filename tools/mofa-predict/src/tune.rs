//! `mofa-predict tune`: enumerate valid strategies, predict each (rayon),
//! rank by time-to-train including fault tolerance, name each bottleneck.

use crate::input::{apply_layout_defaults, Job, Strategy};
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
                                        ..base.strategy.clone()
                                    };
                                    // The defaults a job with this layout
                                    // gets (gradient overlap, reduction
                                    // dtype, ZeRO-3 NIC, torchtitan's SAC),
                                    // not the base layout's.
                                    apply_layout_defaults(
                                        &mut j.strategy,
                                        &base.given,
                                        base.deepspeed,
                                        base.torchtitan,
                                    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{job_from_value, Fallback};
    use serde_json::{json, Value};

    /// A base job as `tune` gets one: layout on one rank, the cluster's
    /// GPUs set afterwards.
    fn base(framework: &str, strategy: Value) -> Job {
        let v = json!({"model": {"arch":"gpt","layers":8,"hidden":1024,"heads":16,"vocab":32000,"seq":2048},
            "cluster": {"gpu":"A100-80GB"}, "framework": framework, "strategy": strategy});
        let mut j = job_from_value(&v, &Fallback::default(), "t").unwrap();
        j.cluster.gpus = 16;
        j
    }

    #[test]
    fn candidates_take_their_own_layouts_defaults() {
        // The base (pp 1, ZeRO 1) overlaps its reduction and has no ZeRO-3
        // NIC; DeepSpeed candidates with pp > 1 must not overlap, and those
        // at ZeRO 3 must send through each rank's NIC.
        let b = base("Megatron-DeepSpeed", json!({"gbs": 64}));
        assert!(b.strategy.overlap_grad_reduce && !b.strategy.z3_rank_nic);
        let c = enumerate(&b, &Space::default());
        assert!(c.iter().any(|j| j.strategy.pp > 1) && c.iter().any(|j| j.strategy.zero == 3));
        for j in &c {
            let s = &j.strategy;
            assert_eq!(s.overlap_grad_reduce, s.pp == 1, "{}", s.compact());
            assert_eq!(s.overlap_param_gather, s.overlap_grad_reduce);
            assert_eq!(s.z3_rank_nic, s.zero == 3, "{}", s.compact());
            assert_eq!(s.grad_bytes, 2.0);
            assert!(!s.sac_op);
        }
        // The same from a DeepSpeed pipeline base, the other way round.
        let b = base("DeepSpeed", json!({"gbs": 64, "pp": 2, "zero": 3}));
        assert!(!b.strategy.overlap_grad_reduce && b.strategy.z3_rank_nic);
        for j in enumerate(&b, &Space::default()) {
            assert_eq!(j.strategy.overlap_grad_reduce, j.strategy.pp == 1);
            assert_eq!(j.strategy.z3_rank_nic, j.strategy.zero == 3);
        }
        // Megatron: fp32 gradients except at ZeRO 3, always overlapped.
        for j in enumerate(&base("Megatron-LM", json!({"gbs": 64})), &Space::default()) {
            let s = &j.strategy;
            assert!(s.overlap_grad_reduce && !s.z3_rank_nic);
            assert_eq!(s.grad_bytes, if s.zero == 3 { 2.0 } else { 4.0 });
        }
        // torchtitan's op-level SAC follows the candidate's recompute.
        let b = base("torchtitan", json!({"gbs": 64, "recompute": "full"}));
        assert!(!b.strategy.sac_op);
        for j in enumerate(&b, &Space::default()) {
            assert_eq!(
                j.strategy.sac_op,
                j.strategy.recompute == Recompute::Selective
            );
        }
    }

    #[test]
    fn candidates_keep_what_the_user_set() {
        let b = base(
            "DeepSpeed",
            json!({"gbs": 64, "overlap_grad_reduce": true, "overlap_param_gather": false,
                   "fsdp_mixed_precision": "FULL"}),
        );
        let c = enumerate(&b, &Space::default());
        assert!(c.iter().any(|j| j.strategy.pp > 1) && c.iter().any(|j| j.strategy.zero == 3));
        for j in &c {
            let s = &j.strategy;
            assert!(
                s.overlap_grad_reduce && !s.overlap_param_gather,
                "{}",
                s.compact()
            );
            assert_eq!(s.grad_bytes, 4.0);
        }
    }

    #[test]
    fn candidates_keep_recompute_modules() {
        // Megatron-Core re-running the dense MLP: every candidate keeps the
        // list; the selective ones pay for it (flash attention's default
        // "selective" costs no time), and `mofa_tune` records carry it.
        let b = base(
            "Megatron-Core",
            json!({"gbs": 64, "recompute": "selective", "recompute_modules": ["mlp"]}),
        );
        let rm = b.strategy.recompute_modules;
        assert!(rm.is_some());
        let mut seen = 0;
        for j in enumerate(&b, &Space::default()) {
            assert_eq!(j.strategy.recompute_modules, rm);
            if j.strategy.recompute == Recompute::Selective {
                let mut d = j.clone();
                d.strategy.recompute_modules = None;
                let (p, q) = (
                    crate::perf::predict_time(&j, &crate::perf::CALIB),
                    crate::perf::predict_time(&d, &crate::perf::CALIB),
                );
                assert!(p.breakdown.recompute_s > 0.0 && q.breakdown.recompute_s == 0.0);
                seen += 1;
            }
        }
        assert!(seen > 0);
        let text = serde_json::to_string(&b.strategy).unwrap();
        assert!(text.contains(r#""recompute_modules":["mlp"]"#), "{text}");
        let back: ftk::records::MofaStrategy = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b.strategy);
        // Without the field the record has none (older records parse).
        let plain = base("Megatron-Core", json!({"gbs": 64}));
        assert!(!serde_json::to_string(&plain.strategy)
            .unwrap()
            .contains("recompute_modules"));
    }
}
