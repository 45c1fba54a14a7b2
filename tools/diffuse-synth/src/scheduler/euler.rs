//! EulerDiscreteScheduler: first-order Euler steps in sigma.

use super::{
    euler_schedule, no_check, sigma_scale_input, sigma_x0, sigma_x0_coeffs, Algorithm, Schedule,
    Spec,
};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "euler",
    class_name: "EulerDiscreteScheduler",
    init_keys: &[
        "prediction_type",
        "interpolation_type",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "sigma_min",
        "sigma_max",
        "timestep_spacing",
        "timestep_type",
        "steps_offset",
        "rescale_betas_zero_snr",
        "final_sigmas_type",
    ],
    defaults: super::no_defaults,
    check: no_check,
    karras: true,
    steps_beyond_training: false,
    build,
};

fn build(s: &mut Schedule, _eta: f64) -> Result<Box<dyn Algorithm>> {
    let final_sigma_min = s.cfg.final_sigma_min;
    euler_schedule(s, final_sigma_min);
    Ok(Box::new(Euler))
}

struct Euler;

impl Algorithm for Euler {
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
        _noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let pred = sch.cfg.prediction_type;
        let si = sch.index();
        let sigma = sch.sigma_at(si)?;
        let next = sch.sigma_at(si + 1)?;
        // gamma = 0 (no s_churn): sigma_hat is sigma
        let sigma_hat = sigma * (0.0f32 + 1.0);
        let x0 = sigma_x0(pred, sigma_hat, sample, model_output);
        let dt = next - sigma_hat;
        let prev = (0..sample.len())
            .map(|k| {
                let d = (sample[k] - x0[k]) / sigma_hat;
                sample[k] + d * dt
            })
            .collect();
        sch.step_index = Some(si + 1);
        Ok(prev)
    }
}
