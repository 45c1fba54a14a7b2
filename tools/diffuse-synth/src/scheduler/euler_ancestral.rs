//! EulerAncestralDiscreteScheduler: Euler steps to sigma_down plus fresh
//! noise of sigma_up.

use super::{
    euler_schedule, no_check, sigma_scale_input, sigma_x0, sigma_x0_coeffs, Algorithm, Schedule,
    Spec,
};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "euler-ancestral",
    class_name: "EulerAncestralDiscreteScheduler",
    init_keys: &[
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
    ],
    defaults: super::no_defaults,
    check: no_check,
    karras: false,
    steps_beyond_training: false,
    build,
};

fn build(s: &mut Schedule, _eta: f64) -> Result<Box<dyn Algorithm>> {
    // The class has no final_sigmas_type: its last sigma is always 0.
    euler_schedule(s, false);
    Ok(Box::new(EulerAncestral))
}

struct EulerAncestral;

impl Algorithm for EulerAncestral {
    fn uses_noise(&self, _s: &Schedule, _i: usize) -> bool {
        true
    }

    fn x0_coeffs(&mut self, s: &mut Schedule, _i: usize) -> Result<(f32, f32, f32)> {
        sigma_x0_coeffs(s)
    }

    fn scale_model_input(&mut self, s: &mut Schedule, sample: &[f32]) -> Result<Vec<f32>> {
        sigma_scale_input(s, sample)
    }

    fn step(
        &mut self,
        sch: &mut Schedule,
        _i: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let pred = sch.cfg.prediction_type;
        let si = sch.index();
        let sigma = sch.sigma_at(si)?;
        let sigma_to = sch.sigma_at(si + 1)?;
        let x0 = sigma_x0(pred, sigma, sample, model_output);
        let sf2 = sigma * sigma;
        let st2 = sigma_to * sigma_to;
        let sigma_up = (st2 * (sf2 - st2) / sf2).sqrt();
        let sigma_down = (st2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let z = noise();
        let prev = (0..sample.len())
            .map(|k| {
                let d = (sample[k] - x0[k]) / sigma;
                let p = sample[k] + d * dt;
                p + z[k] * sigma_up
            })
            .collect();
        sch.step_index = Some(si + 1);
        Ok(prev)
    }
}
