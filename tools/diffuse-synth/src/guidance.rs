//! FedCADO guidance (MingzhaoYang/FedCADO `generate_images.py`): the gradient of
//! cross-entropy(target class) + bn_weight x BN-statistics loss of a client
//! classifier, through UNet -> predicted x0 -> VAE decode -> bicubic resize ->
//! CLIP normalisation -> classifier, taken with respect to the latents.
//!
//! As in the authors' code the latents are then moved against it,
//! `z <- z - scale * grad` (scale 1 there), before the ordinary (no-grad) step;
//! noise editing runs the same update with the BN term only at the first timestep.

use crate::classifier::{clip_normalize, cross_entropy, resize_bicubic, Classifier};
use crate::model::{ce, Unet, Vae};
use crate::scheduler::Scheduler;
use candle_core::{Tensor, Var};
use ftk::{Error, Result};

/// The UNet with its conditions: one sample's unconditional + conditional passes.
pub struct Denoiser<'a> {
    pub unet: &'a Unet,
    /// [copies, L, D]: negative first when guided, then one row per condition.
    pub ctx: Tensor,
    /// [copies, P]: the class labels of a Stable-unCLIP UNet, one row per pass.
    pub class_labels: Option<Tensor>,
    pub weights: Vec<f64>,
    pub guided: bool,
}

impl Denoiser<'_> {
    /// The guided noise prediction for one sample's (scaled) UNet input [1,C,h,w],
    /// as differentiable tensor ops: e_u + sum_i w_i (e_i - e_u).
    pub fn eps(&self, xin: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        let copies = self.ctx.dim(0)?;
        let inp = Tensor::cat(&vec![xin; copies], 0)?;
        let e = self
            .unet
            .eps(&inp, t, &self.ctx, self.class_labels.as_ref())?;
        if !self.guided {
            return e.narrow(0, 0, 1);
        }
        let u = e.narrow(0, 0, 1)?;
        let mut acc = u.clone();
        for (ci, &w) in self.weights.iter().enumerate() {
            acc = (acc + ((e.narrow(0, ci + 1, 1)? - &u)? * w)?)?;
        }
        Ok(acc)
    }
}

/// What FedCADO's loss needs.
pub struct FedCado<'a> {
    pub classifier: &'a Classifier,
    pub class: usize,
    /// Classifier input size (pixels, square).
    pub size: usize,
    pub bn_weight: f64,
}

/// Loss and d loss / d z at step `i` (timestep `t`) for one sample's latents `z`
/// ([1,C,h,w] flattened). `with_ce` false gives the noise-editing loss (BN term only).
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad(
    den: &Denoiser,
    vae: &Vae,
    fc: &FedCado,
    sched: &mut Scheduler,
    i: usize,
    t: f64,
    z: &[f32],
    shape: (usize, usize, usize, usize),
    with_ce: bool,
) -> Result<(f32, Vec<f32>)> {
    let (c_in, a, b) = sched.x0_coeffs(i)?;
    let what = format!("FedCADO guidance at step {i}");
    let run = || -> candle_core::Result<(f32, Vec<f32>)> {
        let zv = Var::from_vec(z.to_vec(), shape, &den.unet.place.device)?;
        let zt = zv.as_tensor();
        let ph = crate::timing::phase(|| "guidance unet forward".into());
        let eps = crate::timing::backward_mark(den.eps(&(zt * f64::from(c_in))?, t)?, "vae")?;
        ph.done();
        let ph = crate::timing::phase(|| "guidance vae forward".into());
        let x0 = ((zt * f64::from(a))? + (eps * f64::from(b))?)?;
        let x = (x0 / vae.scaling_factor)?;
        let img = vae.decode_f32(&x)?;
        let img =
            crate::timing::backward_mark(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?, "classifier")?;
        ph.done();
        let ph = crate::timing::phase(|| "guidance classifier forward".into());
        let inp = clip_normalize(&resize_bicubic(&img, fc.size)?)?;
        let (logits, bn) = fc.classifier.forward(&inp)?;
        let mut loss = (bn * fc.bn_weight)?;
        if with_ce {
            loss = (loss + cross_entropy(&logits, fc.class)?)?;
        }
        ph.done();
        let ph = crate::timing::phase(|| "guidance backward".into());
        crate::timing::backward_start();
        let grads = loss.backward()?;
        crate::timing::backward_end("unet");
        ph.done();
        let g = grads
            .get(zt)
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the latents".into()))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((loss.to_scalar::<f32>()?, g))
    };
    let (l, g) = run().map_err(ce(what.clone()))?;
    if !l.is_finite() || g.iter().any(|v| !v.is_finite()) {
        return Err(Error::input(format!(
            "{what}: loss or gradient is not finite"
        )));
    }
    Ok((l, g))
}
