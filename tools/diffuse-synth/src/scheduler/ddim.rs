//! DDIMScheduler: the deterministic (eta = 0) or stochastic DDIM update.

use super::{
    map2, no_check, pyindex, spaced, Algorithm, Config, Prediction, Schedule, Spacing, Spec,
};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "ddim",
    class_name: "DDIMScheduler",
    init_keys: &[
        "clip_sample",
        "set_alpha_to_one",
        "steps_offset",
        "prediction_type",
        "thresholding",
        "dynamic_thresholding_ratio",
        "clip_sample_range",
        "sample_max_value",
        "timestep_spacing",
        "rescale_betas_zero_snr",
    ],
    defaults: |c: &mut Config| {
        c.timestep_spacing = Spacing::Leading;
        c.set_alpha_to_one = true;
        c.clip_sample = true;
    },
    check: no_check,
    karras: false,
    steps_beyond_training: false,
    build,
};

fn build(s: &mut Schedule, eta: f64) -> Result<Box<dyn Algorithm>> {
    s.ts_int = spaced(&s.cfg, s.n)
        .into_iter()
        .map(|x| x.round_ties_even() as i64)
        .collect();
    Ok(Box::new(Ddim {
        eta: eta as f32,
        final_acp: if s.cfg.set_alpha_to_one {
            1.0
        } else {
            s.acp[0]
        },
    }))
}

struct Ddim {
    eta: f32,
    final_acp: f32,
}

impl Algorithm for Ddim {
    fn uses_noise(&self, _s: &Schedule, _i: usize) -> bool {
        self.eta > 0.0
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
        let (nt, n) = (sch.cfg.num_train_timesteps, sch.n);
        let t = sch.ts_int[i];
        // quirk: t - N // n whatever the spacing
        let prev_t = t - (nt / n) as i64;
        let a_t = pyindex(&sch.acp, t, name)?;
        let a_prev = if prev_t >= 0 {
            pyindex(&sch.acp, prev_t, name)?
        } else {
            self.final_acp
        };
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let (mut x0, eps): (Vec<f32>, Vec<f32>) = match pred {
            Prediction::Epsilon => (
                map2(sample, model_output, |s, m| (s - sb * m) / sa),
                model_output.to_vec(),
            ),
            Prediction::VPrediction => (
                map2(sample, model_output, |s, m| sa * s - sb * m),
                map2(sample, model_output, |s, m| sa * m + sb * s),
            ),
        };
        if let Some(r) = clip {
            x0.iter_mut().for_each(|x| *x = x.clamp(-r, r));
        }
        let b_prev = 1.0 - a_prev;
        let variance = b_prev / b_t * (1.0 - a_t / a_prev);
        let std = self.eta * variance.sqrt();
        let c_dir = (1.0 - a_prev - std * std).sqrt();
        let sap = a_prev.sqrt();
        let mut prev = map2(&x0, &eps, |x, e| sap * x + c_dir * e);
        if self.eta > 0.0 {
            let z = noise();
            prev.iter_mut().zip(&z).for_each(|(p, &z)| *p += std * z);
        }
        Ok(prev)
    }
}
