//! The denoising loop: up to [`UNET_SAMPLES`] samples per UNet call, each sample's
//! unconditional and conditional rows side by side (sample-major), as diffusers batches
//! them; FedCADO's classifier guidance (and noise editing) one sample at a time; the
//! scheduler step with each sample's own noise stream.
//!
//! Every kernel computes a row independently of the others in its batch, so `--shard i/n`
//! still reproduces the rows of one run bit for bit (tests/pipeline.rs checks it).

use crate::cli::Args;
use crate::conditions::{read_tensor, Dense};
use crate::guidance::{self, Denoiser, FedCado};
use crate::model::ce;
use crate::plan::{Models, Plan};
use crate::scheduler::Scheduler;
use crate::{normals, sample_seed};
use candle_core::{Device, Tensor};
use ftk::{bail, Error, Result};

/// Samples denoised together in one UNet call (times their condition rows).
const UNET_SAMPLES: usize = 8;

/// Everything the loop reads, fixed before the first step.
pub struct Denoise<'a> {
    a: &'a Args,
    plan: &'a Plan,
    models: &'a Models,
    /// [negative; cond_1; ...], each [rows, L, D].
    ctx_parts: Vec<Tensor>,
    /// Each row's seed (none with --latents).
    seeds: Vec<Option<u64>>,
    step_noise: Option<Dense>,
    /// Stop before the last timestep and keep its predicted x0.
    final_x0: bool,
    run_steps: usize,
    ts: Vec<f64>,
    fedcado: Option<FedCado<'a>>,
}

/// Final latents (or x0) of one shard's rows, [rows, C, h, w] flattened.
pub fn denoise(a: &Args, plan: &Plan, models: &Models, ctx_parts: Vec<Tensor>) -> Result<Vec<f32>> {
    let d = Denoise::new(a, plan, models, ctx_parts)?;
    let rows = plan.rows();
    let (c, h, w) = models.latent;
    let bar = ftk::cli::progress((rows * d.run_steps) as u64, "denoising");
    let mut lat_all: Vec<f32> = Vec::with_capacity(rows * c * h * w);
    for c0 in (0..rows).step_by(UNET_SAMPLES) {
        let chunk: Vec<usize> = (c0..rows.min(c0 + UNET_SAMPLES)).collect();
        for l in d.chunk(&chunk, &|n| bar.inc(n))? {
            lat_all.extend_from_slice(&l);
        }
    }
    bar.finish_and_clear();
    Ok(lat_all)
}

/// One sample's state through the loop.
struct Sample {
    sched: Scheduler,
    lat: Vec<f32>,
    /// Scheduler noise draws so far.
    draws: usize,
    /// The last step's predicted x0 (with --final x0).
    x0: Vec<f32>,
}

impl<'a> Denoise<'a> {
    fn new(
        a: &'a Args,
        plan: &'a Plan,
        models: &'a Models,
        ctx_parts: Vec<Tensor>,
    ) -> Result<Self> {
        let (c, h, w) = models.latent;
        let total = plan.total;
        let seeds: Vec<Option<u64>> = (plan.start..plan.end)
            .map(|j| a.seed.map(|s| sample_seed(s, j)))
            .collect();
        let step_noise = match &a.step_noise {
            Some(p) => {
                let d = read_tensor(p, "noise", 5, "[draws, batch, channels, height, width]")?;
                if d.shape[1] != total || d.shape[2..] != [c, h, w] {
                    bail!(
                        "{}: `noise` shape {:?} does not match [draws, {total}, {c}, {h}, {w}]",
                        p.display(),
                        d.shape
                    );
                }
                Some(d)
            }
            None => None,
        };
        let final_x0 = match a.final_mode.as_deref() {
            Some(m) => m == "x0",
            None => models.classifier.is_some(),
        };
        let ts: Vec<f64> = plan.sched.timesteps().to_vec();
        let run_steps = ts.len() - usize::from(final_x0);
        if run_steps == 0 {
            bail!("--final x0 stops before the last timestep: it needs --steps 2 or more");
        }
        let fedcado = models.classifier.as_ref().map(|cl| FedCado {
            classifier: cl,
            class: a.class.unwrap_or(0) as usize,
            size: a.classifier_size,
            bn_weight: a.bn_weight,
        });
        Ok(Denoise {
            a,
            plan,
            models,
            ctx_parts,
            seeds,
            step_noise,
            final_x0,
            run_steps,
            ts,
            fedcado,
        })
    }

    fn per(&self) -> usize {
        let (c, h, w) = self.models.latent;
        c * h * w
    }

    /// Rows `chunk` of the shard from their initial noise to their final latents.
    fn chunk(&self, chunk: &[usize], tick: &dyn Fn(u64)) -> Result<Vec<Vec<f32>>> {
        let (ctxs, labels) = self.chunk_conditions(chunk)?;
        let ctx = Tensor::cat(&ctxs, 0).map_err(ce("prompt embeddings"))?;
        let chunk_labels = match self.models.unclip {
            Some(_) => {
                let ls: Vec<Tensor> = labels.iter().flatten().cloned().collect();
                Some(Tensor::cat(&ls, 0).map_err(ce("image embeddings"))?)
            }
            None => None,
        };
        // FedCADO differentiates one sample at a time through this denoiser
        let dens: Vec<Denoiser> = match self.fedcado {
            Some(_) => ctxs
                .iter()
                .zip(&labels)
                .map(|(ctx, lab)| Denoiser {
                    unet: &self.models.unet,
                    ctx: ctx.clone(),
                    class_labels: lab.clone(),
                    weights: self.plan.weights.clone(),
                    guided: self.plan.guided,
                })
                .collect(),
            None => vec![],
        };
        let mut samples = chunk
            .iter()
            .enumerate()
            .map(|(j, &r)| self.start_sample(r, dens.get(j)))
            .collect::<Result<Vec<_>>>()?;
        for i in 0..self.run_steps {
            let ph = crate::timing::phase(|| format!("step {i} ({} samples)", chunk.len()));
            let t = self.ts[i];
            if let Some(fc) = &self.fedcado {
                if i + 1 < self.ts.len() {
                    for (s, den) in samples.iter_mut().zip(&dens) {
                        let (_, gr) = guidance::loss_and_grad(
                            den,
                            &self.models.vae,
                            fc,
                            &mut s.sched,
                            i,
                            t,
                            &s.lat,
                            self.zshape(),
                            true,
                        )?;
                        let sc = self.a.classifier_scale as f32;
                        s.lat.iter_mut().zip(&gr).for_each(|(z, g)| *z -= sc * g);
                    }
                }
            }
            let ph_eps = crate::timing::phase(|| format!("step {i} unet eps"));
            let eps_all = self.unet_eps(&mut samples, i, &ctx, chunk_labels.as_ref())?;
            ph_eps.done();
            let rows_per = self.ctx_parts.len() * self.per();
            for ((s, &r), rows_j) in samples.iter_mut().zip(chunk).zip(eps_all.chunks(rows_per)) {
                let eps = self.combine(rows_j);
                self.step_sample(s, r, i, &eps)?;
            }
            tick(chunk.len() as u64);
            ph.done();
        }
        Ok(samples
            .into_iter()
            .map(|s| if self.final_x0 { s.x0 } else { s.lat })
            .collect())
    }

    fn zshape(&self) -> (usize, usize, usize, usize) {
        let (c, h, w) = self.models.latent;
        (1, c, h, w)
    }

    /// Each sample's context rows [copies, L, D] and (Stable unCLIP) noised image
    /// embeddings, one row per context row.
    #[allow(clippy::type_complexity)]
    fn chunk_conditions(&self, chunk: &[usize]) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>)> {
        let ctx_of = |r: usize| -> Result<Tensor> {
            let parts: Vec<Tensor> = self
                .ctx_parts
                .iter()
                .map(|p| p.narrow(0, r, 1))
                .collect::<candle_core::Result<_>>()
                .map_err(ce("prompt embeddings"))?;
            Tensor::cat(&parts, 0).map_err(ce("prompt embeddings"))
        };
        let ctxs: Vec<Tensor> = chunk.iter().map(|&r| ctx_of(r)).collect::<Result<_>>()?;
        let labels: Vec<Option<Tensor>> = chunk
            .iter()
            .map(|&r| {
                let g = self.plan.start + r;
                self.models
                    .unclip
                    .as_ref()
                    .map(|u| {
                        u.labels(
                            g,
                            sample_seed(self.a.seed.unwrap_or(0), g),
                            self.plan.guided,
                        )
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok((ctxs, labels))
    }

    /// Row `r`'s scheduler and initial latents, after FedCADO's noise editing (BN term
    /// only, at the first timestep) when `den` is given.
    fn start_sample(&self, r: usize, den: Option<&Denoiser>) -> Result<Sample> {
        let g = self.plan.start + r; // global sample index
        let per = self.per();
        let mut sched = Scheduler::new(&self.plan.cfg, self.plan.steps, self.a.eta)?;
        let init: Vec<f32> = match &self.plan.given {
            Some(d) => d.data[g * per..(g + 1) * per].to_vec(),
            None => normals(self.seeds[r].unwrap_or(0), 0, per),
        };
        let ins = sched.init_noise_sigma();
        let mut lat: Vec<f32> = init.iter().map(|x| x * ins).collect();
        if let (Some(fc), Some(den)) = (&self.fedcado, den) {
            for _ in 0..self.a.noise_edit_steps {
                let (_, gr) = guidance::loss_and_grad(
                    den,
                    &self.models.vae,
                    fc,
                    &mut sched,
                    0,
                    self.ts[0],
                    &lat,
                    self.zshape(),
                    false,
                )?;
                lat.iter_mut().zip(&gr).for_each(|(z, g)| *z -= g);
            }
        }
        Ok(Sample {
            sched,
            lat,
            draws: 0,
            x0: Vec::new(),
        })
    }

    /// The UNet's noise predictions for every sample's condition rows at step `i`,
    /// [samples x copies, C, h, w] flattened.
    fn unet_eps(
        &self,
        samples: &mut [Sample],
        i: usize,
        ctx: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Vec<f32>> {
        let (c, h, w) = self.models.latent;
        let copies = self.ctx_parts.len();
        let mut x = Vec::with_capacity(samples.len() * copies * self.per());
        for s in samples.iter_mut() {
            let xj = s.sched.scale_model_input(i, &s.lat)?;
            for _ in 0..copies {
                x.extend_from_slice(&xj);
            }
        }
        let inp = Tensor::from_vec(x, (samples.len() * copies, c, h, w), &Device::Cpu)
            .map_err(ce("latents"))?;
        self.models
            .unet
            .eps(&inp, self.ts[i], ctx, labels)
            .and_then(|e| e.flatten_all())
            .and_then(|e| e.to_vec1::<f32>())
            .map_err(ce(format!("UNet at step {i}")))
    }

    /// One sample's guided prediction from its rows: diffusers' e_u + w (e_c - e_u), one
    /// term per condition.
    fn combine(&self, rows_j: &[f32]) -> Vec<f32> {
        let per = self.per();
        if !self.plan.guided {
            return rows_j[..per].to_vec();
        }
        let u = &rows_j[..per];
        let mut acc = u.to_vec();
        for (ci, &wgt) in self.plan.weights.iter().enumerate() {
            let e = &rows_j[(ci + 1) * per..(ci + 2) * per];
            let wgt = wgt as f32;
            acc.iter_mut()
                .zip(e.iter().zip(u))
                .for_each(|(a, (&e, &u))| *a += wgt * (e - u));
        }
        acc
    }

    /// The scheduler step of row `r` at step `i` (keeping x0 at the last step taken with
    /// --final x0), drawing noise from the row's stream or --step-noise.
    fn step_sample(&self, s: &mut Sample, r: usize, i: usize, eps: &[f32]) -> Result<()> {
        let g = self.plan.start + r;
        let per = self.per();
        let total = self.plan.total;
        let mut draw_err: Option<Error> = None;
        let seed = self.seeds[r];
        let dj = &mut s.draws;
        let mut noise_fn = || -> Vec<f32> {
            let k = *dj;
            *dj += 1;
            match &self.step_noise {
                Some(d) => {
                    if k >= d.shape[0] {
                        draw_err = Some(Error::input(format!(
                            "--step-noise: the scheduler drew noise {} times but the file has {}",
                            k + 1,
                            d.shape[0]
                        )));
                        return vec![0.0; per];
                    }
                    let base = (k * total + g) * per;
                    d.data[base..base + per].to_vec()
                }
                None => normals(seed.unwrap_or(0), 1 + k as u64, per),
            }
        };
        if self.final_x0 && i + 1 == self.run_steps {
            // the scheduler's pred_original_sample at the last step taken
            let (_, ca, cb) = s.sched.x0_coeffs(i)?;
            s.x0 = s
                .lat
                .iter()
                .zip(eps)
                .map(|(z, e)| ca * z + cb * e)
                .collect();
        }
        s.lat = s.sched.step(i, eps, &s.lat, &mut noise_fn)?;
        if let Some(e) = draw_err.take() {
            return Err(e);
        }
        if s.lat.iter().any(|v| !v.is_finite()) {
            bail!(
                "latents of sample {g} became non-finite at step {i} (t={}); \
                 check the model weights and config",
                self.ts[i]
            );
        }
        Ok(())
    }
}
