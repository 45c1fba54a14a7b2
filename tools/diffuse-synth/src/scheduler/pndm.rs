//! PNDMScheduler: 12 Runge-Kutta warm-up steps (or, with skip_prk_steps,
//! a repeated second timestep), then linear multistep (PLMS).

use super::{
    map2, no_check, np_arange, np_linspace, pyindex, Algorithm, Config, Prediction, Schedule,
    Spacing, Spec,
};
use ftk::{bail, Result};

pub const SPEC: Spec = Spec {
    name: "pndm",
    class_name: "PNDMScheduler",
    init_keys: &[
        "skip_prk_steps",
        "set_alpha_to_one",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
    ],
    defaults: |c: &mut Config| c.timestep_spacing = Spacing::Leading,
    check: no_check,
    karras: false,
    steps_beyond_training: false,
    build,
};

fn build(s: &mut Schedule, _eta: f64) -> Result<Box<dyn Algorithm>> {
    let (nt, n) = (s.cfg.num_train_timesteps, s.n);
    // _timesteps ascending
    let base: Vec<i64> = match s.cfg.timestep_spacing {
        Spacing::Linspace => np_linspace(0.0, (nt - 1) as f64, n)
            .into_iter()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => (0..n)
            .map(|i| (i * (nt / n)) as i64 + s.cfg.steps_offset)
            .collect(),
        Spacing::Trailing => {
            let mut v: Vec<i64> = np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect();
            v.reverse();
            v
        }
    };
    let prk: Vec<i64>;
    let mut plms: Vec<i64>;
    if s.cfg.skip_prk_steps {
        prk = vec![];
        // quirk: the second timestep is repeated
        let l = base.len();
        plms = base[..l.saturating_sub(1)].to_vec();
        if l >= 2 {
            plms.push(base[l - 2]);
        }
        plms.push(base[l - 1]);
        plms.reverse();
    } else {
        if base.len() < 4 {
            bail!("pndm without skip_prk_steps needs --steps >= 4 (diffusers fails on {n})");
        }
        let half = (nt / n / 2) as i64;
        let last4 = &base[base.len() - 4..];
        let mut r: Vec<i64> = Vec::new();
        for &t in last4 {
            r.push(t);
            r.push(t + half);
        }
        r.pop(); // [:-1]
        let rep: Vec<i64> = r.iter().flat_map(|&t| [t, t]).collect();
        let mut p = rep[1..rep.len() - 1].to_vec();
        p.reverse();
        prk = p;
        plms = base[..base.len() - 3].to_vec();
        plms.reverse();
    }
    s.ts_int = prk.iter().chain(plms.iter()).copied().collect();
    Ok(Box::new(Pndm {
        final_acp: if s.cfg.set_alpha_to_one {
            1.0
        } else {
            s.acp[0]
        },
        prk,
        counter: 0,
        ets: vec![],
        cur_model_output: None,
        cur_sample: None,
    }))
}

struct Pndm {
    final_acp: f32,
    prk: Vec<i64>,
    counter: usize,
    ets: Vec<Vec<f32>>,
    cur_model_output: Option<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
}

impl Algorithm for Pndm {
    // Over 100 lines on purpose: it follows diffusers' step_prk and
    // step_plms branch by branch, so the two can be compared side by side.
    fn step(
        &mut self,
        sch: &mut Schedule,
        i: usize,
        model_output: &[f32],
        sample: &[f32],
        _noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let name = sch.cfg.kind.name();
        let pred = sch.cfg.prediction_type;
        let (nt, n) = (sch.cfg.num_train_timesteps, sch.n);
        let Pndm {
            final_acp,
            prk,
            counter,
            ets,
            cur_model_output,
            cur_sample,
        } = self;
        let final_acp = *final_acp;
        let acp = &sch.acp;
        let get_prev = |sample: &[f32], t: i64, prev_t: i64, mo: &[f32]| -> Result<Vec<f32>> {
            let a_t = pyindex(acp, t, name)?;
            let a_prev = if prev_t >= 0 {
                pyindex(acp, prev_t, name)?
            } else {
                final_acp
            };
            let b_t = 1.0 - a_t;
            let b_prev = 1.0 - a_prev;
            let mo: Vec<f32> = match pred {
                Prediction::VPrediction => {
                    let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
                    map2(mo, sample, |m, s| sa * m + sb * s)
                }
                Prediction::Epsilon => mo.to_vec(),
            };
            let c_s = (a_prev / a_t).sqrt();
            let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
            let d = a_prev - a_t;
            Ok(map2(sample, &mo, |s, m| c_s * s - d * m / denom))
        };
        let t = sch.ts_int[i];
        let ratio = (nt / n) as i64;
        if *counter < prk.len() && !sch.cfg.skip_prk_steps {
            let diff = if *counter % 2 == 1 { 0 } else { ratio / 2 };
            let prev_t = t - diff;
            let t = prk[*counter / 4 * 4];
            let sixth = (1.0f64 / 6.0) as f32;
            let third = (1.0f64 / 3.0) as f32;
            let add = |acc: &mut Option<Vec<f32>>, w: f32| match acc {
                Some(a) => a
                    .iter_mut()
                    .zip(model_output)
                    .for_each(|(a, &m)| *a += w * m),
                None => *acc = Some(model_output.iter().map(|&m| w * m).collect()),
            };
            let mut mo = model_output.to_vec();
            match *counter % 4 {
                0 => {
                    add(cur_model_output, sixth);
                    ets.push(model_output.to_vec());
                    *cur_sample = Some(sample.to_vec());
                }
                1 | 2 => add(cur_model_output, third),
                _ => {
                    let acc = cur_model_output
                        .take()
                        .unwrap_or_else(|| vec![0.0; mo.len()]);
                    mo = map2(&acc, model_output, |a, m| a + sixth * m);
                }
            }
            let cs = cur_sample.clone().unwrap_or_else(|| sample.to_vec());
            let prev = get_prev(&cs, t, prev_t, &mo)?;
            *counter += 1;
            return Ok(prev);
        }
        // PLMS
        if !sch.cfg.skip_prk_steps && ets.len() < 3 {
            bail!("pndm: too few Runge-Kutta warm-up steps");
        }
        let mut prev_t = t - ratio;
        let mut t = t;
        if *counter != 1 {
            let keep = ets.len().saturating_sub(3);
            ets.drain(..keep);
            ets.push(model_output.to_vec());
        } else {
            prev_t = t;
            t += ratio;
        }
        let l = ets.len();
        let mut smp = sample.to_vec();
        let mo: Vec<f32> = if l == 1 && *counter == 0 {
            *cur_sample = Some(sample.to_vec());
            model_output.to_vec()
        } else if l == 1 && *counter == 1 {
            smp = cur_sample.take().unwrap_or_else(|| sample.to_vec());
            map2(model_output, &ets[l - 1], |m, e| (m + e) / 2.0)
        } else if l == 2 {
            map2(&ets[1], &ets[0], |a, b| (3.0 * a - b) / 2.0)
        } else if l == 3 {
            (0..model_output.len())
                .map(|k| (23.0 * ets[2][k] - 16.0 * ets[1][k] + 5.0 * ets[0][k]) / 12.0)
                .collect()
        } else {
            let w = (1.0f64 / 24.0) as f32;
            (0..model_output.len())
                .map(|k| {
                    w * (55.0 * ets[l - 1][k] - 59.0 * ets[l - 2][k] + 37.0 * ets[l - 3][k]
                        - 9.0 * ets[l - 4][k])
                })
                .collect()
        };
        let prev = get_prev(&smp, t, prev_t, &mo)?;
        *counter += 1;
        Ok(prev)
    }
}
