//! Flower ships two strategy families whose server math differs in places:
//! the legacy `flwr.server.strategy` (what fed-aggregate follows by default)
//! and the message API `flwr.serverapp.strategy` (Flower 1.21+). The
//! differences live here so both stay reproducible from one binary.

use crate::engine;
use clap::ValueEnum;

/// Which Flower strategy family to reproduce (`--flower-api`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FlowerApi {
    /// `flwr.server.strategy` (Strategy with fit/evaluate).
    #[default]
    Legacy,
    /// `flwr.serverapp.strategy` (Message API, Flower 1.21+).
    Message,
}

impl FlowerApi {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowerApi::Legacy => "legacy",
            FlowerApi::Message => "message",
        }
    }

    /// FedOpt's tau when --tau is not given, for a strategy whose legacy
    /// default is `legacy`: the message API's FedAdam and FedAdagrad default
    /// to 1e-3 where the legacy ones use 1e-9 (FedYogi: 1e-3 in both).
    pub fn fedopt_tau(self, legacy: f64) -> f64 {
        match self {
            FlowerApi::Legacy => legacy,
            FlowerApi::Message => 1e-3,
        }
    }

    /// Bulyan's selection set (n - 2f clients, as a mask over all origins).
    /// Legacy: n - 2f rounds of Krum, each dropping its winner and rescoring
    /// the rest. Message API (`select_multikrum`): one Krum scoring over all
    /// clients, keeping the n - 2f best scores.
    pub fn bulyan_select(self, d: &[f64], n_all: usize, active: &[usize], f: usize) -> Vec<bool> {
        let theta = active.len() - 2 * f;
        let mut mask = vec![false; n_all];
        match self {
            FlowerApi::Legacy => {
                let mut remaining = active.to_vec();
                for _ in 0..theta {
                    let scores = engine::krum_scores(d, n_all, &remaining, f);
                    mask[remaining.remove(engine::argmin(&scores))] = true;
                }
            }
            FlowerApi::Message => {
                let scores = engine::krum_scores(d, n_all, active, f);
                let mut order: Vec<usize> = (0..active.len()).collect();
                // Stable on ties, like the first-wins argmin of the legacy loop.
                order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
                for &k in &order[..theta] {
                    mask[active[k]] = true;
                }
            }
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Squared distances of points on a line.
    fn line(p: &[f64]) -> Vec<f64> {
        let n = p.len();
        let mut d = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                d[i * n + j] = (p[i] - p[j]).powi(2);
            }
        }
        d
    }

    #[test]
    fn one_pass_and_iterative_bulyan_keep_different_clients() {
        // Rescoring after each removal lets the far pair (8, 9) in once the
        // cluster around 3 has been taken; one pass keeps the cluster's
        // neighbour 3.4 instead.
        let p = [0.0, 0.5, 3.0, 3.2, 3.4, 8.0, 9.0];
        let d = line(&p);
        let active: Vec<usize> = (0..p.len()).collect();
        let kept = |m: Vec<bool>| -> Vec<usize> { (0..m.len()).filter(|&i| m[i]).collect() };
        let leg = kept(FlowerApi::Legacy.bulyan_select(&d, p.len(), &active, 1));
        let msg = kept(FlowerApi::Message.bulyan_select(&d, p.len(), &active, 1));
        // Brute force of Flower's two loops on these points (numpy argsort).
        assert_eq!(leg, vec![0, 1, 2, 3, 5]);
        assert_eq!(msg, vec![0, 1, 2, 3, 4]);
    }
}
