//! MoE routing shared by the tools: where experts live ([`Placement`]),
//! Mixtral's top-k of one router row ([`topk_row`]) and synthetic routing
//! (plan for the skew you expect before you have a trace: [`Skew`],
//! [`LayerModel`]). The `route` and `route_hist` records are in
//! [`crate::records`].
//!
//! Synthetic routing: each layer gets a fixed expert popularity `p` (drawn once per layer from
//! the seed), and every token picks `k` distinct experts by sampling from `p`
//! without replacement (redraw on a repeat, which is exactly sampling from
//! `p` renormalised over the experts not yet chosen).

use crate::rng;
use rand::RngExt;
use rand_distr::{Distribution, Gamma};

/// Where experts live: `ep` ranks, experts placed contiguously.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub experts: usize,
    pub ep: usize,
}

impl Placement {
    pub fn new(experts: usize, ep: usize) -> crate::Result<Placement> {
        if experts == 0 {
            crate::bail!("--experts must be at least 1");
        }
        if ep == 0 || !experts.is_multiple_of(ep) {
            crate::bail!(
                "--ep {ep} does not divide the {experts} experts; experts are placed on EP ranks contiguously, so pick a divisor of {experts}"
            );
        }
        Ok(Placement { experts, ep })
    }

    /// The EP rank holding expert `e`.
    pub fn rank_of(&self, e: usize) -> usize {
        e / (self.experts / self.ep)
    }
}

/// Indices of the k largest values of `row`, ties going to the lower index
/// (softmax is monotone, so this is Mixtral's top-k of the routing weights).
/// Returns `Err(col)` for the first NaN.
#[inline]
pub fn topk_row(row: &[f32], k: usize, out: &mut Vec<(f32, usize)>) -> Result<(), usize> {
    out.clear();
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            return Err(i);
        }
        if out.len() < k {
            // Insert keeping descending order; equal values keep index order.
            let pos = out.iter().position(|&(w, _)| v > w).unwrap_or(out.len());
            out.insert(pos, (v, i));
        } else if v > out[k - 1].0 {
            out.pop();
            let pos = out.iter().position(|&(w, _)| v > w).unwrap_or(out.len());
            out.insert(pos, (v, i));
        }
    }
    Ok(())
}

/// A popularity model for `--synthetic`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Skew {
    /// Every expert equally likely.
    Uniform,
    /// p ∝ 1 / rank^s over a random per-layer ordering of the experts.
    Zipf(f64),
    /// p ~ Dirichlet(alpha, ..., alpha), per layer.
    Dirichlet(f64),
    /// One hot expert per layer is in the top-k of a fraction f of the
    /// tokens; every other choice is uniform over the remaining experts.
    Hot(f64),
}

/// Bad spellings are usage errors (exit 2).
impl std::str::FromStr for Skew {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Skew> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let num = |what: &str, ok: &dyn Fn(f64) -> bool| -> crate::Result<f64> {
            arg.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && ok(*v))
                .ok_or_else(|| {
                    crate::Error::input(format!(
                        "'{s}': {name} needs {what}, e.g. {name}:{}",
                        if name == "hot" { "0.3" } else { "1.2" }
                    ))
                })
        };
        match name {
            "uniform" if arg.is_empty() => Ok(Skew::Uniform),
            "zipf" => Ok(Skew::Zipf(num("an exponent >= 0", &|v| v >= 0.0)?)),
            "dirichlet" => Ok(Skew::Dirichlet(num("a concentration > 0", &|v| v > 0.0)?)),
            "hot" => Ok(Skew::Hot(num("a fraction in [0, 1]", &|v| {
                (0.0..=1.0).contains(&v)
            })?)),
            _ => Err(crate::Error::input(format!(
                "unknown skew '{s}': use uniform, zipf:S, dirichlet:A or hot:F"
            ))),
        }
    }
}

/// Stream ids: popularity per layer, tokens per (layer, step, rank).
const POPULARITY: u64 = 1;
const TOKENS: u64 = 2;

/// Per-layer popularity weights (unnormalised), or the hot expert.
pub struct LayerModel {
    skew: Skew,
    /// Cumulative weights for inverse-CDF sampling (empty for uniform/hot).
    cdf: Vec<f64>,
    hot: usize,
}

impl LayerModel {
    pub fn new(skew: Skew, experts: usize, seed: u64, layer: u64) -> LayerModel {
        let mut r = rng::stream(seed, rng::stream_id(&[POPULARITY, layer]));
        let mut weights = match skew {
            Skew::Uniform | Skew::Hot(_) => vec![],
            Skew::Zipf(s) => {
                let mut order: Vec<usize> = (0..experts).collect();
                // Fisher-Yates with our own stream, so the bytes are portable.
                for i in (1..experts).rev() {
                    order.swap(i, r.random_range(0..=i));
                }
                let mut w = vec![0.0; experts];
                for (rank, &e) in order.iter().enumerate() {
                    w[e] = 1.0 / ((rank + 1) as f64).powf(s);
                }
                w
            }
            Skew::Dirichlet(a) => {
                let g = Gamma::new(a, 1.0).expect("alpha checked > 0");
                (0..experts).map(|_| g.sample(&mut r)).collect()
            }
        };
        // Underflowed Gamma draws would make an expert unreachable; keep every
        // expert possible, however unlikely, so k distinct choices exist.
        let max = weights.iter().cloned().fold(0.0, f64::max);
        for w in &mut weights {
            *w = w.max(max * 1e-300).max(f64::MIN_POSITIVE);
        }
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        let hot = if matches!(skew, Skew::Hot(_)) {
            r.random_range(0..experts)
        } else {
            0
        };
        LayerModel { skew, cdf, hot }
    }

    fn draw(&self, r: &mut impl rand::Rng, experts: usize) -> usize {
        if self.cdf.is_empty() {
            return r.random_range(0..experts);
        }
        let total = *self.cdf.last().unwrap();
        let u = r.random::<f64>() * total;
        self.cdf.partition_point(|&c| c <= u).min(experts - 1)
    }

    /// A model with the given popularity weights (e.g. a measured histogram).
    pub fn from_weights(weights: &[f64]) -> LayerModel {
        let max = weights.iter().cloned().fold(0.0, f64::max);
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w.max(max * 1e-300).max(f64::MIN_POSITIVE);
                acc
            })
            .collect();
        LayerModel {
            skew: Skew::Uniform,
            cdf,
            hot: 0,
        }
    }

    /// The random stream for (layer, step, source rank) under `seed`.
    pub fn stream(seed: u64, ids: [u64; 3]) -> rand_chacha::ChaCha8Rng {
        rng::stream(seed, rng::stream_id(&[TOKENS, ids[0], ids[1], ids[2]]))
    }

    /// One token's `k` distinct experts, into `chosen` (cleared first).
    pub fn draw_token(&self, r: &mut impl rand::Rng, e: usize, k: usize, chosen: &mut Vec<usize>) {
        chosen.clear();
        if let Skew::Hot(f) = self.skew {
            if r.random::<f64>() < f {
                chosen.push(self.hot);
            }
            while chosen.len() < k {
                // uniform over the experts other than the hot one
                let mut x = r.random_range(0..e - 1);
                if x >= self.hot {
                    x += 1;
                }
                if !chosen.contains(&x) {
                    chosen.push(x);
                }
            }
        } else {
            let mut misses = 0;
            while chosen.len() < k {
                let x = self.draw(r, e);
                if !chosen.contains(&x) {
                    chosen.push(x);
                } else {
                    misses += 1;
                    if misses > 64 {
                        // Extreme skew: finish by exact sequential sampling over the rest.
                        self.finish_exact(r, e, k, chosen);
                    }
                }
            }
        }
    }

    /// Per-expert counts for `tokens` tokens routed top-`k`.
    pub fn unit(&self, p: Placement, k: usize, tokens: u64, seed: u64, ids: [u64; 3]) -> Vec<u64> {
        let e = p.experts;
        let mut r = Self::stream(seed, ids);
        let mut counts = vec![0u64; e];
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        for _ in 0..tokens {
            self.draw_token(&mut r, e, k, &mut chosen);
            for &x in &chosen {
                counts[x] += 1;
            }
        }
        counts
    }

    fn finish_exact(&self, r: &mut impl rand::Rng, e: usize, k: usize, chosen: &mut Vec<usize>) {
        let w = |i: usize| {
            if self.cdf.is_empty() {
                1.0
            } else {
                self.cdf[i] - if i == 0 { 0.0 } else { self.cdf[i - 1] }
            }
        };
        while chosen.len() < k {
            let total: f64 = (0..e).filter(|i| !chosen.contains(i)).map(w).sum();
            let mut u = r.random::<f64>() * total;
            let mut pick = None;
            for i in (0..e).filter(|i| !chosen.contains(i)) {
                pick = Some(i);
                u -= w(i);
                if u < 0.0 {
                    break;
                }
            }
            chosen.push(pick.expect("k <= experts"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!("uniform".parse::<Skew>().unwrap(), Skew::Uniform);
        assert_eq!("zipf:1.2".parse::<Skew>().unwrap(), Skew::Zipf(1.2));
        assert_eq!("hot:0.5".parse::<Skew>().unwrap(), Skew::Hot(0.5));
        for bad in [
            "zipf",
            "zipf:-1",
            "hot:2",
            "dirichlet:0",
            "normal:1",
            "uniform:3",
        ] {
            assert!(bad.parse::<Skew>().is_err(), "{bad}");
        }
    }
}
