//! DDPMScheduler: ancestral sampling with the learned-free variances
//! (fixed_small, fixed_small_log, fixed_large).

use super::{
    map2, no_check, pyindex, spaced, Algorithm, Config, Prediction, Schedule, Spacing, Spec,
    Variance,
};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "ddpm",
    class_name: "DDPMScheduler",
    init_keys: &[
        "variance_type",
        "clip_sample",
        "prediction_type",
        "thresholding",
        "dynamic_thresholding_ratio",
        "clip_sample_range",
        "sample_max_value",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
    ],
    defaults: |c: &mut Config| {
        c.timestep_spacing = Spacing::Leading;
        c.clip_sample = true;
    },
    check: no_check,
    karras: false,
    steps_beyond_training: false,
    build,
};

fn build(s: &mut Schedule, _eta: f64) -> Result<Box<dyn Algorithm>> {
    s.ts_int = spaced(&s.cfg, s.n)
        .into_iter()
        .map(|x| x.round_ties_even() as i64)
        .collect();
    Ok(Box::new(Ddpm))
}

struct Ddpm;

impl Algorithm for Ddpm {
    fn uses_noise(&self, s: &Schedule, i: usize) -> bool {
        s.ts_int.get(i).is_some_and(|&t| t > 0)
    }

    fn step(
        &mut self,
        sch: &mut Schedule,
        i: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let name = sch.cfg.kind.name();
        let pred = sch.cfg.prediction_type;
        let clip = sch
            .cfg
            .clip_sample
            .then_some(sch.cfg.clip_sample_range as f32);
        let t = sch.ts_int[i];
        // previous_timestep: the entry after the first occurrence of t
        let pos = sch.ts_int.iter().position(|&x| x == t).unwrap_or(i);
        let prev_t = if pos + 1 == sch.ts_int.len() {
            -1
        } else {
            sch.ts_int[pos + 1]
        };
        let a_t = pyindex(&sch.acp, t, name)?;
        let a_prev = if prev_t >= 0 {
            pyindex(&sch.acp, prev_t, name)?
        } else {
            1.0
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let mut x0: Vec<f32> = match pred {
            Prediction::Epsilon => map2(sample, model_output, |s, m| (s - sb * m) / sa),
            Prediction::VPrediction => map2(sample, model_output, |s, m| sa * s - sb * m),
        };
        if let Some(r) = clip {
            x0.iter_mut().for_each(|x| *x = x.clamp(-r, r));
        }
        let c_x0 = (a_prev.sqrt() * cur_beta) / b_t;
        let c_s = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = map2(&x0, sample, |x, s| c_x0 * x + c_s * s);
        if t > 0 {
            let var = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match sch.cfg.variance_type {
                Variance::FixedSmall => var.sqrt(),
                Variance::FixedSmallLog => (0.5 * var.ln()).exp(),
                Variance::FixedLarge => cur_beta.sqrt(),
            };
            let z = noise();
            prev.iter_mut().zip(&z).for_each(|(p, &z)| *p += std * z);
        }
        Ok(prev)
    }
}
