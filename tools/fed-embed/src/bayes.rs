//! pFedBayesPT's instance-wise prompt sampling from a semi-implicit
//! generator (no public code; the paper's abstract fixes only the framing).
//!
//! The generator is an MLP g over [feature, ε], ε ~ N(0, I_noise): the
//! implicit mixing distribution ψ = g(f, ε). With `"output": "mean"` the
//! prompt is ψ itself; with `"output": "mean_logvar"` ψ = [μ, log σ²] is an
//! explicit Gaussian layer and p = μ + exp(log σ² / 2) η, η ~ N(0, I) — the
//! SIVI hierarchy q(p) = ∫ q(p | ψ) q(ψ) dψ. Running it M times per instance
//! gives the Monte-Carlo mean and (unbiased, as `torch.var`) variance.
//!
//! Architecture file (JSON):
//! `{"noise_dim": 8, "prompt_shape": [4, 16], "output": "mean",
//!   "layers": [{"weight": "net.0.weight", "bias": "net.0.bias", "activation": "relu"}, ...]}`
//! Weights are PyTorch `nn.Linear` layout [out, in]; the last layer's width
//! is prod(prompt_shape) (twice that for mean_logvar).

use crate::input::Matrix;
use ftk::linalg;
use ftk::{bail, Result};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Arch {
    pub noise_dim: usize,
    pub prompt_shape: Vec<usize>,
    #[serde(default = "default_output")]
    pub output: Output,
    pub layers: Vec<LayerSpec>,
}

fn default_output() -> Output {
    Output::Mean
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    Mean,
    MeanLogvar,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    pub weight: String,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default = "default_act")]
    pub activation: Act,
}

fn default_act() -> Act {
    Act::Identity
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    Identity,
    Relu,
    Tanh,
    Sigmoid,
    Silu,
    /// GELU with the tanh approximation (`approximate="tanh"`).
    GeluTanh,
}

impl Act {
    fn apply(self, v: f32) -> f32 {
        match self {
            Act::Identity => v,
            Act::Relu => v.max(0.0),
            Act::Tanh => v.tanh(),
            Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Act::Silu => v / (1.0 + (-v).exp()),
            Act::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh())
            }
        }
    }
}

/// One loaded layer.
pub struct Layer {
    pub w: Matrix,
    pub b: Option<Vec<f32>>,
    pub act: Act,
}

pub struct Generator {
    pub arch: Arch,
    pub layers: Vec<Layer>,
    /// Width of one prompt sample (prod of prompt_shape).
    pub width: usize,
}

impl Generator {
    /// Check the chain of shapes: input = feat + noise_dim, each layer's
    /// input = previous output, last output = width (x2 for mean_logvar).
    pub fn check(&self, feat: usize, what: &str) -> Result<()> {
        let mut inp = feat + self.arch.noise_dim;
        for (i, (l, s)) in self.layers.iter().zip(&self.arch.layers).enumerate() {
            if l.w.cols != inp {
                bail!(
                    "{what}: layer {i} ('{}') takes {} inputs, but {} arrive ({}); weights are [out, in]",
                    s.weight,
                    l.w.cols,
                    inp,
                    if i == 0 {
                        format!("{feat} feature + {} noise", self.arch.noise_dim)
                    } else {
                        "the previous layer's outputs".into()
                    }
                );
            }
            if let Some(b) = &l.b {
                if b.len() != l.w.rows {
                    bail!(
                        "{what}: bias '{}' has {} entries for {} outputs",
                        s.bias.as_deref().unwrap_or(""),
                        b.len(),
                        l.w.rows
                    );
                }
            }
            inp = l.w.rows;
        }
        let want = match self.arch.output {
            Output::Mean => self.width,
            Output::MeanLogvar => 2 * self.width,
        };
        if inp != want {
            bail!(
                "{what}: the last layer gives {inp} outputs, but prompt_shape {:?} with output {:?} needs {want}",
                self.arch.prompt_shape,
                self.arch.output
            );
        }
        Ok(())
    }

    /// ψ = g([f, ε]) for a batch: f [N, F], eps [N, noise] -> [N, out].
    pub fn forward(&self, f: &Matrix, eps: &[f32]) -> Matrix {
        let (n, nd) = (f.rows, self.arch.noise_dim);
        let inp = f.cols + nd;
        let mut h = Matrix::zeros(n, inp);
        h.data.par_chunks_mut(inp).enumerate().for_each(|(i, r)| {
            r[..f.cols].copy_from_slice(f.row(i));
            r[f.cols..].copy_from_slice(&eps[i * nd..(i + 1) * nd]);
        });
        for l in &self.layers {
            let o = l.w.rows;
            let mut y = Matrix::zeros(n, o);
            linalg::matmul_bt(&mut y.data, &h.data, &l.w.data, n, o, h.cols, false);
            y.data.par_chunks_mut(o).for_each(|r| {
                if let Some(b) = &l.b {
                    r.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
                r.iter_mut().for_each(|v| *v = l.act.apply(*v));
            });
            h = y;
        }
        h
    }
}

/// Standard normal draws for sample `m`: ε [N, noise] then η [N, width],
/// each instance from its own stream so results do not depend on batching.
pub fn draw(
    seed: u64,
    m: usize,
    n: usize,
    nd: usize,
    width: usize,
    eta: bool,
) -> (Vec<f32>, Vec<f32>) {
    let per: Vec<(Vec<f32>, Vec<f32>)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut r = ftk::rng::stream(seed, ftk::rng::stream_id(&[m as u64, i as u64]));
            let e: Vec<f32> = (0..nd).map(|_| StandardNormal.sample(&mut r)).collect();
            let h: Vec<f32> = if eta {
                (0..width).map(|_| StandardNormal.sample(&mut r)).collect()
            } else {
                vec![]
            };
            (e, h)
        })
        .collect();
    let mut e = Vec::with_capacity(n * nd);
    let mut h = Vec::with_capacity(if eta { n * width } else { 0 });
    for (a, b) in per {
        e.extend(a);
        h.extend(b);
    }
    (e, h)
}

/// One prompt sample [N, width] from ψ and η.
pub fn sample(psi: &Matrix, eta: &[f32], out: Output, width: usize) -> Vec<f32> {
    match out {
        Output::Mean => psi.data.clone(),
        Output::MeanLogvar => {
            let mut p = vec![0f32; psi.rows * width];
            p.par_chunks_mut(width).enumerate().for_each(|(i, o)| {
                let r = psi.row(i);
                for j in 0..width {
                    o[j] = r[j] + (0.5 * r[width + j]).exp() * eta[i * width + j];
                }
            });
            p
        }
    }
}

/// Streaming mean and unbiased variance over M samples (Welford, f64).
pub struct Moments {
    n: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments {
    pub fn new(len: usize) -> Self {
        Moments {
            n: 0,
            mean: vec![0.0; len],
            m2: vec![0.0; len],
        }
    }

    pub fn push(&mut self, x: &[f32]) {
        self.n += 1;
        let n = self.n as f64;
        self.mean
            .par_iter_mut()
            .zip(self.m2.par_iter_mut())
            .zip(x.par_iter())
            .for_each(|((m, s), &v)| {
                let v = f64::from(v);
                let d = v - *m;
                *m += d / n;
                *s += d * (v - *m);
            });
    }

    /// (mean, unbiased variance); variance is 0 when M = 1.
    pub fn finish(self) -> (Vec<f32>, Vec<f32>) {
        let den = (self.n.max(2) - 1) as f64;
        let var = if self.n < 2 {
            vec![0.0; self.m2.len()]
        } else {
            self.m2.iter().map(|s| (s / den) as f32).collect()
        };
        (self.mean.iter().map(|&v| v as f32).collect(), var)
    }
}

/// Where the Monte-Carlo noise comes from.
pub enum Noise {
    /// ε (and η) from ftk's seeded streams ([`draw`]).
    Seeded(u64),
    /// Given draws: ε [M, N, noise_dim] and, for mean_logvar, η [M, N, width].
    Explicit { eps: Vec<f32>, eta: Vec<f32> },
}

/// Mean and unbiased variance of the prompts [N, width] over `m` samples,
/// and (with `keep`) every sample [M, N, width].
pub struct Sampled {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub all: Vec<f32>,
}

impl Generator {
    /// Run the generator `m` times per instance of `x`.
    pub fn sample_moments(&self, x: &Matrix, m: usize, noise: &Noise, keep: bool) -> Sampled {
        let (n, nd, width) = (x.rows, self.arch.noise_dim, self.width);
        let logvar = self.arch.output == Output::MeanLogvar;
        let mut mom = Moments::new(n * width);
        let mut all = if keep {
            Vec::with_capacity(m * n * width)
        } else {
            vec![]
        };
        for s in 0..m {
            let (e, h) = match noise {
                Noise::Explicit { eps, eta } => (
                    eps[s * n * nd..(s + 1) * n * nd].to_vec(),
                    if logvar {
                        eta[s * n * width..(s + 1) * n * width].to_vec()
                    } else {
                        vec![]
                    },
                ),
                Noise::Seeded(seed) => draw(*seed, s, n, nd, width, logvar),
            };
            let psi = self.forward(x, &e);
            let p = sample(&psi, &h, self.arch.output, width);
            mom.push(&p);
            if keep {
                all.extend_from_slice(&p);
            }
        }
        let (mean, var) = mom.finish();
        Sampled { mean, var, all }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_match_two_pass() {
        let xs = [[1.0f32, 2.0], [3.0, 2.0], [8.0, 2.0]];
        let mut m = Moments::new(2);
        xs.iter().for_each(|x| m.push(x));
        let (mean, var) = m.finish();
        assert!((mean[0] - 4.0).abs() < 1e-6 && var[1] == 0.0);
        // ((1-4)^2 + (3-4)^2 + (8-4)^2) / 2 = 13
        assert!((var[0] - 13.0).abs() < 1e-5);
    }

    #[test]
    fn logvar_head_scales_the_noise() {
        let psi = Matrix::new(1, 2, vec![1.0, 2f32.ln() * 2.0]);
        let p = sample(&psi, &[0.5], Output::MeanLogvar, 1);
        assert!((p[0] - 2.0).abs() < 1e-6); // 1 + sqrt(4) * 0.5
    }
}
