//! DPMSolverMultistepScheduler: DPM-Solver(++) of order 1 or 2 (DPM++ 2M
//! by default), midpoint or Heun second-order updates.

use super::{
    index_for_timestep, karras, map2, np_arange, np_interp, np_linspace, sigma_of, sigma_to_t,
    Algorithm, BetaSchedule, Config, Prediction, Schedule, Spacing, Spec,
};
use ftk::{bail, Result};

pub const SPEC: Spec = Spec {
    name: "dpmpp-2m",
    class_name: "DPMSolverMultistepScheduler",
    init_keys: &[
        "solver_order",
        "prediction_type",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "flow_shift",
        "final_sigmas_type",
        "lambda_min_clipped",
        "variance_type",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "use_dynamic_shifting",
        "time_shift_type",
    ],
    defaults: super::no_defaults,
    check,
    karras: true,
    steps_beyond_training: true,
    build,
};

fn check(c: &Config) -> super::ValueResult<()> {
    if !c.dpmsolver_pp && !c.final_sigma_min {
        return Err(
            "final_sigmas_type \"zero\" is not supported for algorithm_type \"dpmsolver\" \
             (diffusers refuses it too); use \"sigma_min\""
                .into(),
        );
    }
    Ok(())
}

fn build(s: &mut Schedule, _eta: f64) -> Result<Box<dyn Algorithm>> {
    let cfg = s.cfg.clone();
    let (nt, n) = (cfg.num_train_timesteps, s.n);
    let lambda: Vec<f32> = s
        .acp
        .iter()
        .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
        .collect();
    // torch.searchsorted(flip(lambda_t), lambda_min_clipped)
    let clipped = lambda
        .iter()
        .rev()
        .filter(|&&l| f64::from(l) < cfg.lambda_min_clipped)
        .count();
    let last = nt - clipped;
    let mut ts: Vec<f64> = match cfg.timestep_spacing {
        Spacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        Spacing::Leading => {
            let ratio = last / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio) as f64 + cfg.steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => np_arange(last as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    };
    let base: Vec<f32> = s.acp.iter().map(|&a| sigma_of(a)).collect();
    let mut sig: Vec<f64>;
    if cfg.use_karras_sigmas {
        let log_sigmas: Vec<f32> = base.iter().map(|x| x.ln()).collect();
        sig = karras(f64::from(base[0]), f64::from(base[nt - 1]), n);
        ts = sig.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
        if cfg.beta_schedule != BetaSchedule::SquaredCosCapV2 {
            ts = ts.into_iter().map(f64::round_ties_even).collect();
        }
    } else {
        let base64: Vec<f64> = base.iter().map(|&x| f64::from(x)).collect();
        sig = ts.iter().map(|&t| np_interp(t, &base64)).collect();
    }
    sig.push(if cfg.final_sigma_min {
        f64::from(sigma_of(s.acp[0]))
    } else {
        0.0
    });
    s.sigmas = sig.into_iter().map(|x| x as f32).collect();
    // quirk: float timesteps are truncated by .to(int64)
    s.ts_int = ts.iter().map(|&t| t as i64).collect();
    s.n = s.ts_int.len();
    Ok(Box::new(Dpm {
        model_outputs: vec![None; cfg.solver_order],
        lower_order_nums: 0,
    }))
}

struct Dpm {
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
}

impl Algorithm for Dpm {
    fn x0_coeffs(&mut self, sch: &mut Schedule, _i: usize) -> Result<(f32, f32, f32)> {
        let v = sch.cfg.prediction_type == Prediction::VPrediction;
        let si = sch
            .step_index
            .unwrap_or_else(|| index_for_timestep(&sch.timesteps, sch.timesteps[0]));
        let s = sch.sigma_at(si)?;
        let alpha = 1.0 / (s * s + 1.0).sqrt();
        let sig = s * alpha;
        Ok(if v {
            (1.0, alpha, -sig)
        } else {
            (1.0, 1.0 / alpha, -sig / alpha)
        })
    }

    // Over 100 lines on purpose: it follows diffusers' step and
    // multistep_dpm_solver_{first,second}_order_update in order.
    fn step(
        &mut self,
        sch: &mut Schedule,
        i: usize,
        model_output: &[f32],
        sample: &[f32],
        _noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let t = sch.timesteps[i];
        let name = sch.cfg.kind.name();
        let pred = sch.cfg.prediction_type;
        let Dpm {
            model_outputs,
            lower_order_nums,
        } = self;
        // step_index from the timestep, as index_for_timestep does
        let si = match sch.step_index {
            Some(s) => s,
            None => {
                let s = index_for_timestep(&sch.timesteps, t);
                sch.step_index = Some(s);
                s
            }
        };
        let len = sch.ts_int.len();
        let cfg = &sch.cfg;
        let lower_final = si == len - 1
            && (cfg.euler_at_final || (cfg.lower_order_final && len < 15) || !cfg.final_sigma_min);
        let lower_second = si + 2 == len && cfg.lower_order_final && len < 15;
        let alpha_sigma = |s: f32| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let (a_s0, s_s0) = alpha_sigma(sch.sigma_at(si)?);
        let converted: Vec<f32> = match (cfg.dpmsolver_pp, pred) {
            (true, Prediction::Epsilon) => map2(sample, model_output, |s, m| (s - s_s0 * m) / a_s0),
            (true, Prediction::VPrediction) => {
                map2(sample, model_output, |s, m| a_s0 * s - s_s0 * m)
            }
            (false, Prediction::Epsilon) => model_output.to_vec(),
            (false, Prediction::VPrediction) => {
                map2(sample, model_output, |s, m| a_s0 * m + s_s0 * s)
            }
        };
        model_outputs.rotate_left(1);
        let last = model_outputs.len() - 1;
        model_outputs[last] = Some(converted);
        let (a_t, s_t) = alpha_sigma(sch.sigma_at(si + 1)?);
        let lam = |a: f32, s: f32| a.ln() - s.ln();
        let lambda_t = lam(a_t, s_t);
        let lambda_s0 = lam(a_s0, s_s0);
        let h = lambda_t - lambda_s0;
        let m0 = model_outputs[last].as_ref().expect("just set");
        let prev: Vec<f32> = if cfg.solver_order == 1 || *lower_order_nums < 1 || lower_final {
            if cfg.dpmsolver_pp {
                let c_s = s_t / s_s0;
                let c_m = a_t * ((-h).exp() - 1.0);
                map2(sample, m0, |x, m| c_s * x - c_m * m)
            } else {
                let c_s = a_t / a_s0;
                let c_m = s_t * (h.exp() - 1.0);
                map2(sample, m0, |x, m| c_s * x - c_m * m)
            }
        } else if cfg.solver_order == 2 || *lower_order_nums < 2 || lower_second {
            let m1 = model_outputs[last - 1]
                .as_ref()
                .expect("set on the previous step");
            let (a_s1, s_s1) = alpha_sigma(sch.sigma_at(si - 1)?);
            let lambda_s1 = lam(a_s1, s_s1);
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            let inv_r0 = 1.0 / r0;
            let d1: Vec<f32> = map2(m0, m1, |a, b| inv_r0 * (a - b));
            let (c_s, c0, c1) = match (cfg.dpmsolver_pp, cfg.solver_heun) {
                (true, false) => {
                    let e = a_t * ((-h).exp() - 1.0);
                    (s_t / s_s0, -e, -(0.5 * e))
                }
                (true, true) => (
                    s_t / s_s0,
                    -(a_t * ((-h).exp() - 1.0)),
                    a_t * (((-h).exp() - 1.0) / h + 1.0),
                ),
                (false, false) => {
                    let e = s_t * (h.exp() - 1.0);
                    (a_t / a_s0, -e, -(0.5 * e))
                }
                (false, true) => (
                    a_t / a_s0,
                    -(s_t * (h.exp() - 1.0)),
                    -(s_t * ((h.exp() - 1.0) / h - 1.0)),
                ),
            };
            (0..sample.len())
                .map(|k| c_s * sample[k] + c0 * m0[k] + c1 * d1[k])
                .collect()
        } else {
            bail!("{name}: solver_order > 2 is not supported");
        };
        if *lower_order_nums < cfg.solver_order {
            *lower_order_nums += 1;
        }
        sch.step_index = Some(si + 1);
        Ok(prev)
    }
}
