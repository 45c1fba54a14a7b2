//! Per-(layer, step) accumulation of routing counts and the `route_hist` record.
//!
//! Every source (JSON-lines records, safetensors blocks, synthetic draws)
//! reduces a micro-batch from one source rank to per-expert counts — a
//! "unit" — and hands it here. Everything in the record derives from units,
//! so memory is O(experts + ep²) per open group, whatever the trace size.

use ftk::records::{RouteHist, Tag};
use ftk::routing::Placement;

/// Megatron-LM's expert capacity for one micro-batch:
/// `ceil(tokens * topk / experts * capacity_factor)` (get_capacity applied to
/// tokens*topk, as topk_softmax_with_capacity does).
pub fn capacity(tokens: u64, topk: u64, experts: usize, factor: f64) -> u64 {
    ((tokens * topk) as f64 / experts as f64 * factor).ceil() as u64
}

/// Running totals for one (layer, step).
#[derive(Clone, Debug)]
pub struct Accum {
    pub layer: u64,
    pub step: u64,
    pub topk: u64,
    pub tokens: u64,
    pub counts: Vec<u64>,
    /// Row-major [ep][ep]: source rank -> destination rank.
    pub a2a: Vec<u64>,
    pub dropped: u64,
}

impl Accum {
    pub fn new(layer: u64, step: u64, topk: u64, p: Placement) -> Accum {
        Accum {
            layer,
            step,
            topk,
            tokens: 0,
            counts: vec![0; p.experts],
            a2a: vec![0; p.ep * p.ep],
            dropped: 0,
        }
    }

    /// Add one unit: `tokens` tokens from source rank `src` whose per-expert
    /// (token, expert) pair counts are `unit`.
    pub fn add_unit(
        &mut self,
        p: Placement,
        src: usize,
        tokens: u64,
        unit: &[u64],
        capacity_factor: Option<f64>,
    ) {
        debug_assert_eq!(unit.len(), p.experts);
        self.tokens += tokens;
        let cap = capacity_factor.map(|f| capacity(tokens, self.topk, p.experts, f));
        for (e, &c) in unit.iter().enumerate() {
            self.counts[e] += c;
            self.a2a[src * p.ep + p.rank_of(e)] += c;
            if let Some(cap) = cap {
                self.dropped += c.saturating_sub(cap);
            }
        }
    }

    /// Merge another accumulator of the same group (used by parallel sources).
    pub fn merge(&mut self, o: &Accum) {
        self.tokens += o.tokens;
        self.dropped += o.dropped;
        self.counts
            .iter_mut()
            .zip(&o.counts)
            .for_each(|(a, b)| *a += b);
        self.a2a.iter_mut().zip(&o.a2a).for_each(|(a, b)| *a += b);
    }

    pub fn record(&self, p: Placement, with_dropped: bool) -> RouteHist {
        let per_rank = p.experts / p.ep;
        let rank_counts: Vec<u64> = self
            .counts
            .chunks(per_rank)
            .map(|c| c.iter().sum())
            .collect();
        let mean = (self.tokens * self.topk) as f64 / p.experts as f64;
        let max = self.counts.iter().copied().max().unwrap_or(0) as f64;
        let max_vio = if mean > 0.0 { (max - mean) / mean } else { 0.0 };
        RouteHist {
            kind: Tag::default(),
            layer: self.layer,
            step: self.step,
            experts: p.experts as u64,
            topk: self.topk,
            tokens: self.tokens,
            counts: self.counts.clone(),
            ep: p.ep as u64,
            rank_counts,
            max_vio,
            a2a: self.a2a.chunks(p.ep).map(<[u64]>::to_vec).collect(),
            dropped: with_dropped.then_some(self.dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_capacity() {
        // 4096 tokens, top-2 over 8 experts at 1.25: ceil(1024 * 1.25) = 1280
        assert_eq!(capacity(4096, 2, 8, 1.25), 1280);
        assert_eq!(capacity(3, 1, 2, 1.0), 2);
    }

    #[test]
    fn unit_feeds_a2a_and_drops() {
        let p = Placement::new(4, 2).unwrap();
        let mut a = Accum::new(0, 0, 1, p);
        // 4 tokens from rank 1: three to expert 0 (rank 0), one to expert 3 (rank 1)
        a.add_unit(p, 1, 4, &[3, 0, 0, 1], Some(1.0));
        let r = a.record(p, true);
        assert_eq!(r.a2a, vec![vec![0, 0], vec![3, 1]]);
        assert_eq!(r.rank_counts, vec![3, 1]);
        assert_eq!(r.dropped, Some(2)); // capacity 1 per expert
        assert!((r.max_vio - 2.0).abs() < 1e-12);
        assert!(Placement::new(6, 4).is_err());
    }
}
