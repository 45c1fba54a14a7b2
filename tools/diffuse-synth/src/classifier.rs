//! Client classifiers for FedCADO guidance, and the differentiable pieces between
//! the VAE and them: bicubic resize (torch's `interpolate(mode="bicubic",
//! align_corners=False)`, no antialias, as torchvision's Resize(antialias=False)),
//! CLIP normalisation, cross-entropy and the DeepInversion BN-statistics loss.
//!
//! Architectures (`--classifier-arch`): `resnet18`, `resnet34`, `resnet50` (torchvision's,
//! see [`crate::tvresnet`]), or a small JSON description (`json:FILE`, or a path to a
//! `.json` file), weights in a safetensors file with PyTorch's state_dict names, BN layers
//! in eval mode:
//! ```json
//! {"layers": [
//!   {"type": "conv", "name": "conv1", "in": 3, "out": 8, "kernel": 3, "stride": 1, "padding": 1, "bias": false},
//!   {"type": "bn", "name": "bn1", "eps": 1e-5},
//!   {"type": "relu"},
//!   {"type": "avgpool"},
//!   {"type": "linear", "name": "fc", "in": 8, "out": 10}
//! ]}
//! ```

use crate::model::ce;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use ftk::{bail, Error, Result};
use serde::Deserialize;
use std::path::Path;

/// CLIP's image normalisation (FedCADO's classifier transform).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum LayerSpec {
    Conv {
        name: String,
        #[serde(rename = "in")]
        inp: usize,
        out: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default)]
        bias: bool,
    },
    Bn {
        name: String,
        #[serde(default = "bn_eps")]
        eps: f64,
    },
    Relu,
    Avgpool,
    Linear {
        name: String,
        #[serde(rename = "in")]
        inp: usize,
        out: usize,
    },
}

fn one() -> usize {
    1
}
fn bn_eps() -> f64 {
    1e-5
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ArchSpec {
    layers: Vec<LayerSpec>,
}

/// An eval-mode BatchNorm2d whose input also feeds the BN-statistics loss.
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: f64,
    /// The eval-mode map x · scale + shift per channel (f32 as the tensor ops compute it).
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BatchNorm {
    /// `name.{weight,bias,running_mean,running_var}` from `vb` (weights file `src`).
    pub fn load(vb: &VarBuilder, name: &str, eps: f64, src: &Path) -> Result<BatchNorm> {
        let get = |n: &str| -> Result<Tensor> {
            let t = vb
                .get_unchecked_dtype(&format!("{name}.{n}"), DType::F32)
                .map_err(ce(format!("{}: layer `{name}`", src.display())))?;
            if t.rank() != 1 {
                bail!("{}: `{name}.{n}` must be 1-D", src.display());
            }
            Ok(t)
        };
        let (weight, bias) = (get("weight")?, get("bias")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        let affine = || -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
            let inv = (&weight / (&var + eps)?.sqrt()?)?;
            let shift = (&bias - (&mean * &inv)?)?;
            Ok((inv.to_vec1::<f32>()?, shift.to_vec1::<f32>()?))
        };
        let (scale, shift) = affine().map_err(ce(format!("{}: layer `{name}`", src.display())))?;
        Ok(BatchNorm {
            weight,
            bias,
            mean,
            var,
            eps,
            scale,
            shift,
        })
    }

    /// Eval-mode BN of x [N,C,H,W]; adds the DeepInversion term of its input to `loss`:
    /// ||running_var - var||_2 + ||running_mean - mean||_2 (biased variance over N,H,W).
    pub fn forward(&self, x: &Tensor, loss: &mut Tensor) -> candle_core::Result<Tensor> {
        self.add_term(x, loss)?;
        self.apply(x)
    }

    /// relu(BN(x)), adding x's term to `loss` as [`BatchNorm::forward`].
    pub fn forward_relu(&self, x: &Tensor, loss: &mut Tensor) -> candle_core::Result<Tensor> {
        self.add_term(x, loss)?;
        self.apply_relu(x, None)
    }

    fn kernels(x: &Tensor) -> bool {
        x.dtype() == DType::F32 && x.device().is_cpu() && x.rank() == 4
    }

    /// loss += x's DeepInversion term (see [`BatchNorm::forward`]).
    pub fn add_term(&self, x: &Tensor, loss: &mut Tensor) -> candle_core::Result<()> {
        let (mu, v) = if Self::kernels(x) {
            // the CPU kernels: one pass for the statistics
            let st = crate::cpu_kernels::resnet::channel_stats(x)?;
            (st.get(0)?, st.get(1)?)
        } else {
            let mu = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
            let centered = x.broadcast_sub(&mu)?;
            let v = centered
                .sqr()?
                .mean_keepdim(0)?
                .mean_keepdim(2)?
                .mean_keepdim(3)?;
            (mu.flatten_all()?, v.flatten_all()?)
        };
        let r = ((&self.var - &v)?.sqr()?.sum_all()?.sqrt()?
            + (&self.mean - &mu)?.sqr()?.sum_all()?.sqrt()?)?;
        *loss = (&*loss + r)?;
        Ok(())
    }

    /// The eval-mode map alone.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if Self::kernels(x) {
            return crate::cpu_kernels::resnet::channel_affine(x, &self.scale, &self.shift);
        }
        let shape = (1, self.weight.dim(0)?, 1, 1);
        let inv = (&self.weight / (&self.var + self.eps)?.sqrt()?)?;
        let scale = inv.reshape(shape)?;
        let shift = (&self.bias - (&self.mean * &inv)?)?.reshape(shape)?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }

    /// relu(BN(x) + residual) (no residual: relu(BN(x))), no loss term: on f32 CPU
    /// tensors one op (one pass, one graph node) for the three.
    pub fn apply_relu(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        if Self::kernels(x) && residual.is_none_or(cpu) {
            return crate::cpu_kernels::resnet::channel_affine_relu(
                x,
                &self.scale,
                &self.shift,
                residual,
            );
        }
        let y = self.apply(x)?;
        match residual {
            Some(r) => crate::cpu_kernels::resnet::relu(&(y + r)?),
            None => crate::cpu_kernels::resnet::relu(&y),
        }
    }
}

enum Layer {
    Conv(crate::cpu_kernels::Conv2d),
    Bn(BatchNorm),
    Relu,
    Avgpool,
    Linear(crate::cpu_kernels::Linear),
}

enum Net {
    Layers(Vec<Layer>),
    ResNet(Box<crate::tvresnet::ResNet>),
}

/// A classifier in eval mode.
pub struct Classifier {
    net: Net,
    pub num_classes: usize,
}

impl Classifier {
    /// `--classifier-arch`: resnet18 | resnet34 | resnet50 | json:FILE | FILE (JSON).
    pub fn from_arch(arch: &str, weights: &Path) -> Result<Classifier> {
        Classifier::from_arch_on(arch, weights, &Device::Cpu)
    }

    /// [`Classifier::from_arch`] with the (f32) weights on `dev`.
    pub fn from_arch_on(arch: &str, weights: &Path, dev: &Device) -> Result<Classifier> {
        if let Some(a) = crate::tvresnet::Arch::parse(arch) {
            let net = crate::tvresnet::ResNet::load_on(weights, a, dev)?;
            let num_classes = net.plan.num_classes;
            return Ok(Classifier {
                net: Net::ResNet(Box::new(net)),
                num_classes,
            });
        }
        let file = arch.strip_prefix("json:").unwrap_or(arch);
        let p = Path::new(file);
        if !arch.starts_with("json:") && !p.is_file() {
            bail!(
                "--classifier-arch {arch:?}: expected resnet18, resnet34, resnet50, or json:FILE \
                 (a JSON layer list)"
            );
        }
        Classifier::load_on(p, weights, dev)
    }

    /// A JSON-described net (see the module docs).
    pub fn load(arch: &Path, weights: &Path) -> Result<Classifier> {
        Classifier::load_on(arch, weights, &Device::Cpu)
    }

    /// [`Classifier::load`] with the weights on `dev`.
    pub fn load_on(arch: &Path, weights: &Path, dev: &Device) -> Result<Classifier> {
        let text = ftk::io::read_text(arch)?;
        let spec: ArchSpec = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: {e}", arch.display())))?;
        ftk::tensors::TensorFile::open(weights)?;
        // SAFETY: read-only map of a file nobody modifies while we run.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, dev) }
            .map_err(ce(weights.display()))?;
        let mut layers = vec![];
        let mut num_classes = 0;
        let what = |n: &str| format!("{}: layer `{n}`", weights.display());
        for l in spec.layers {
            layers.push(match l {
                LayerSpec::Conv {
                    name,
                    inp,
                    out,
                    kernel,
                    stride,
                    padding,
                    bias,
                } => {
                    let cfg = candle_nn::Conv2dConfig {
                        stride,
                        padding,
                        ..Default::default()
                    };
                    let c = if bias {
                        candle_nn::conv2d(inp, out, kernel, cfg, vb.pp(&name))
                    } else {
                        candle_nn::conv2d_no_bias(inp, out, kernel, cfg, vb.pp(&name))
                    };
                    Layer::Conv(crate::cpu_kernels::Conv2d(c.map_err(ce(what(&name)))?))
                }
                LayerSpec::Bn { name, eps } => {
                    Layer::Bn(BatchNorm::load(&vb, &name, eps, weights)?)
                }
                LayerSpec::Relu => Layer::Relu,
                LayerSpec::Avgpool => Layer::Avgpool,
                LayerSpec::Linear { name, inp, out } => {
                    num_classes = out;
                    Layer::Linear(crate::cpu_kernels::Linear(
                        candle_nn::linear(inp, out, vb.pp(&name)).map_err(ce(what(&name)))?,
                    ))
                }
            });
        }
        if !matches!(layers.last(), Some(Layer::Linear(_))) {
            bail!(
                "{}: the last layer must be `linear` (the class logits)",
                arch.display()
            );
        }
        Ok(Classifier {
            net: Net::Layers(layers),
            num_classes,
        })
    }

    /// Logits and, per BN layer, its input's batch statistics loss
    /// ||running_var - var||_2 + ||running_mean - mean||_2 (biased variance over N,H,W).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let layers = match &self.net {
            Net::ResNet(r) => return r.forward(x),
            Net::Layers(l) => l,
        };
        let mut x = x.clone();
        let mut bn_loss = Tensor::zeros((), DType::F32, x.device())?;
        for l in layers {
            x = match l {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Bn(bn) => bn.forward(&x, &mut bn_loss)?,
                Layer::Relu => crate::cpu_kernels::resnet::relu(&x)?,
                Layer::Avgpool => x.mean_keepdim(2)?.mean_keepdim(3)?.flatten_from(1)?,
                Layer::Linear(lin) => lin.forward(&x)?,
            };
        }
        Ok((x, bn_loss))
    }
}

/// The (out x in) matrix of torch's 1-D bicubic interpolation, align_corners=False,
/// no antialias (A = -0.75, edge indices clamped).
pub fn bicubic_matrix(inp: usize, out: usize) -> Vec<f32> {
    let a = -0.75f64;
    let cubic1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    let scale = inp as f64 / out as f64;
    let mut m = vec![0f32; out * inp];
    for o in 0..out {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let f = src.floor();
        let t = src - f;
        let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let idx = (f as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
            m[o * inp + idx] += *wk as f32;
        }
    }
    m
}

/// Resize [N,C,H,W] to [N,C,size,size] bicubically (differentiable: two matmuls).
pub fn resize_bicubic(x: &Tensor, size: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let dev = x.device();
    let mh = Tensor::from_vec(bicubic_matrix(h, size), (size, h), dev)?;
    let mw = Tensor::from_vec(bicubic_matrix(w, size), (size, w), dev)?;
    let x = x.reshape((n * c, h, w))?;
    let y = mh.broadcast_left(n * c)?.matmul(&x)?; // [nc, size, w]
    let y = y.matmul(&mw.t()?.broadcast_left(n * c)?.contiguous()?)?; // [nc, size, size]
    y.reshape((n, c, size, size))
}

/// CLIP mean/std normalisation of [N,3,H,W] images in [0,1].
pub fn clip_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let dev = x.device();
    let m = Tensor::from_vec(CLIP_MEAN.to_vec(), (1, 3, 1, 1), dev)?;
    let s = Tensor::from_vec(CLIP_STD.to_vec(), (1, 3, 1, 1), dev)?;
    x.broadcast_sub(&m)?.broadcast_div(&s)
}

/// Mean cross-entropy of logits [N,K] against one class.
pub fn cross_entropy(logits: &Tensor, class: usize) -> candle_core::Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let n = logits.dim(0)?;
    lp.narrow(1, class, 1)?
        .sum_all()?
        .affine(-1.0 / n as f64, 0.0)
}
