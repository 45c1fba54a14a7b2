//! Noise schedulers exactly as diffusers 0.42 computes them: DDPM, DDIM, PNDM,
//! Euler, Euler-ancestral and DPM-Solver++ multistep (2M).
//!
//! Pure Rust, no tensor library: a step is elementwise over a flat `f32` slice
//! (a whole batch at once). diffusers' own quirks are the spec and are kept on
//! purpose, each marked `quirk:` where it happens:
//! - schedule arithmetic mirrors torch/numpy dtypes (float32 betas and
//!   cumulative products, float64 numpy interpolation, numpy's round-half-even,
//!   `np.arange`'s length `ceil((stop-start)/step)`), so timesteps and sigmas
//!   agree to float32 rounding;
//! - DDIM's previous timestep is `t - N // n` whatever the spacing;
//! - PNDM repeats its second timestep (skip_prk_steps) or runs 12 Runge-Kutta
//!   warm-up steps first; it needs at least 4 steps without skip_prk_steps;
//! - Euler's and Euler-ancestral's initial sigma is `sqrt(max sigma^2 + 1)` under
//!   "leading" spacing and `max sigma` otherwise; their first step index is the
//!   *second* occurrence of the first timestep when it repeats;
//! - DPM++ takes a first-order final step (always with final_sigmas_type "zero",
//!   and under 15 steps with lower_order_final), and with Karras sigmas its
//!   float timesteps are rounded except for squaredcos_cap_v2 (then truncated,
//!   which can repeat a timestep and run off the end: diffusers raises, so do we);
//! - config keys follow `Scheduler.from_config`: a key a scheduler's `__init__`
//!   accepts is taken from the file, any other key is ignored, and a missing key
//!   takes *that* scheduler's default (diffusers drops keys the file's own class
//!   defaulted, via `_use_default_values`).

use ftk::{bail, Error, Result};
use serde_json::Value;

/// The schedulers diffuse-synth implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ddpm,
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    /// DPMSolverMultistepScheduler (solver_order 2 by default: DPM++ 2M).
    Dpmpp2m,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Ddpm,
        Kind::Ddim,
        Kind::Pndm,
        Kind::Euler,
        Kind::EulerAncestral,
        Kind::Dpmpp2m,
    ];

    /// The CLI name (`ddpm`, ..., `dpmpp-2m`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ddpm => "ddpm",
            Kind::Ddim => "ddim",
            Kind::Pndm => "pndm",
            Kind::Euler => "euler",
            Kind::EulerAncestral => "euler-ancestral",
            Kind::Dpmpp2m => "dpmpp-2m",
        }
    }

    /// The diffusers class name, as `_class_name` in scheduler_config.json.
    pub fn class_name(self) -> &'static str {
        match self {
            Kind::Ddpm => "DDPMScheduler",
            Kind::Ddim => "DDIMScheduler",
            Kind::Pndm => "PNDMScheduler",
            Kind::Euler => "EulerDiscreteScheduler",
            Kind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Kind::Dpmpp2m => "DPMSolverMultistepScheduler",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn from_class_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.class_name() == s)
    }

    /// The keyword arguments of the class's `__init__` (diffusers 0.42) besides
    /// the beta keys every scheduler takes.
    fn init_keys(self) -> &'static [&'static str] {
        match self {
            Kind::Ddpm => &[
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
            Kind::Ddim => &[
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
            Kind::Pndm => &[
                "skip_prk_steps",
                "set_alpha_to_one",
                "prediction_type",
                "timestep_spacing",
                "steps_offset",
            ],
            Kind::Euler => &[
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
            Kind::EulerAncestral => &[
                "prediction_type",
                "timestep_spacing",
                "steps_offset",
                "rescale_betas_zero_snr",
            ],
            Kind::Dpmpp2m => &[
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
        }
    }

    /// Whether the class's `__init__` takes `key`.
    pub fn accepts(self, key: &str) -> bool {
        const COMMON: [&str; 5] = [
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
        ];
        COMMON.contains(&key) || self.init_keys().contains(&key)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variance {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
}

/// A scheduler configuration: every key diffusers reads, resolved to a value.
#[derive(Clone, Debug)]
pub struct Config {
    pub kind: Kind,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Prediction,
    pub timestep_spacing: Spacing,
    pub steps_offset: i64,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub skip_prk_steps: bool,
    pub variance_type: Variance,
    pub use_karras_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// final_sigmas_type "sigma_min" (true) or "zero" (false).
    pub final_sigma_min: bool,
    pub solver_order: usize,
    pub solver_heun: bool,
    /// algorithm_type "dpmsolver++" (true) or "dpmsolver" (false).
    pub dpmsolver_pp: bool,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
}

impl Config {
    /// The class's own `__init__` defaults.
    pub fn defaults(kind: Kind) -> Config {
        let discrete = matches!(kind, Kind::Ddpm | Kind::Ddim | Kind::Pndm);
        Config {
            kind,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: Prediction::Epsilon,
            timestep_spacing: if discrete {
                Spacing::Leading
            } else {
                Spacing::Linspace
            },
            steps_offset: 0,
            set_alpha_to_one: kind == Kind::Ddim,
            clip_sample: matches!(kind, Kind::Ddpm | Kind::Ddim),
            clip_sample_range: 1.0,
            skip_prk_steps: false,
            variance_type: Variance::FixedSmall,
            use_karras_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigma_min: false,
            solver_order: 2,
            solver_heun: false,
            dpmsolver_pp: true,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }

    /// A scheduler_config.json object read as `<Kind's class>.from_config(obj)`.
    /// `src` names the file in error messages.
    pub fn from_json(kind: Kind, obj: &Value, src: &str) -> Result<Config> {
        let map = obj
            .as_object()
            .ok_or_else(|| Error::input(format!("{src}: scheduler config is not a JSON object")))?;
        let mut c = Config::defaults(kind);
        for (key, v) in map {
            if key.starts_with('_') || !kind.accepts(key) {
                continue; // diffusers drops private keys and keys the class does not take
            }
            c.set(key, v)
                .map_err(|m| Error::input(format!("{src}: field `{key}`: {m}")))?;
        }
        c.check().map_err(|m| Error::input(format!("{src}: {m}")))?;
        Ok(c)
    }

    /// Set one config key from its JSON value, refusing what diffusers refuses and
    /// what this implementation does not support.
    pub fn set(&mut self, key: &str, v: &Value) -> std::result::Result<(), String> {
        fn num(v: &Value) -> std::result::Result<f64, String> {
            v.as_f64()
                .ok_or_else(|| format!("expected a number, got {v}"))
        }
        fn boolean(v: &Value) -> std::result::Result<bool, String> {
            v.as_bool()
                .ok_or_else(|| format!("expected true or false, got {v}"))
        }
        fn string(v: &Value) -> std::result::Result<&str, String> {
            v.as_str()
                .ok_or_else(|| format!("expected a string, got {v}"))
        }
        fn unsupported(what: &str) -> std::result::Result<(), String> {
            Err(format!("{what} is not supported by diffuse-synth"))
        }
        match key {
            "num_train_timesteps" => {
                let n = v
                    .as_u64()
                    .filter(|&n| n >= 2)
                    .ok_or_else(|| format!("expected an integer >= 2, got {v}"))?;
                self.num_train_timesteps = n as usize;
            }
            "beta_start" => self.beta_start = num(v)?,
            "beta_end" => self.beta_end = num(v)?,
            "beta_schedule" => {
                self.beta_schedule = parse_beta_schedule(string(v)?)?;
            }
            "trained_betas" => {
                self.trained_betas = match v {
                    Value::Null => None,
                    Value::Array(a) => {
                        Some(a.iter().map(num).collect::<std::result::Result<_, _>>()?)
                    }
                    _ => return Err(format!("expected null or a list of numbers, got {v}")),
                }
            }
            "prediction_type" => self.prediction_type = parse_prediction(string(v)?)?,
            "timestep_spacing" => self.timestep_spacing = parse_spacing(string(v)?)?,
            "steps_offset" => {
                self.steps_offset = v
                    .as_i64()
                    .ok_or_else(|| format!("expected an integer, got {v}"))?
            }
            "set_alpha_to_one" => self.set_alpha_to_one = boolean(v)?,
            "clip_sample" => self.clip_sample = boolean(v)?,
            "clip_sample_range" => self.clip_sample_range = num(v)?,
            "skip_prk_steps" => self.skip_prk_steps = boolean(v)?,
            "variance_type" => {
                self.variance_type = match (self.kind, v) {
                    (Kind::Dpmpp2m, Value::Null) => Variance::FixedSmall,
                    (Kind::Dpmpp2m, _) => return unsupported(&format!("variance_type {v}")),
                    (_, _) => match string(v)? {
                        "fixed_small" => Variance::FixedSmall,
                        "fixed_small_log" => Variance::FixedSmallLog,
                        "fixed_large" => Variance::FixedLarge,
                        other => return unsupported(&format!("variance_type {other:?}")),
                    },
                }
            }
            "use_karras_sigmas" => self.use_karras_sigmas = !v.is_null() && boolean(v)?,
            "sigma_min" => self.sigma_min = if v.is_null() { None } else { Some(num(v)?) },
            "sigma_max" => self.sigma_max = if v.is_null() { None } else { Some(num(v)?) },
            "final_sigmas_type" => {
                self.final_sigma_min = match string(v)? {
                    "zero" => false,
                    "sigma_min" => true,
                    other => {
                        return Err(format!("expected \"zero\" or \"sigma_min\", got {other:?}"))
                    }
                }
            }
            "solver_order" => {
                self.solver_order = match v.as_u64() {
                    Some(1) => 1,
                    Some(2) => 2,
                    _ => return unsupported(&format!("solver_order {v} (1 or 2 are)")),
                }
            }
            "solver_type" => {
                self.solver_heun = match string(v)? {
                    // quirk: diffusers maps the DEIS/UniPC names onto midpoint
                    "midpoint" | "logrho" | "bh1" | "bh2" => false,
                    "heun" => true,
                    other => return Err(format!("unknown solver_type {other:?}")),
                }
            }
            "algorithm_type" => {
                self.dpmsolver_pp = match string(v)? {
                    "dpmsolver++" | "deis" => true,
                    "dpmsolver" => false,
                    other => return unsupported(&format!("algorithm_type {other:?}")),
                }
            }
            "lower_order_final" => self.lower_order_final = boolean(v)?,
            "euler_at_final" => self.euler_at_final = boolean(v)?,
            "lambda_min_clipped" => self.lambda_min_clipped = num(v)?,
            "interpolation_type" if string(v)? != "linear" => {
                return unsupported(&format!("interpolation_type {v}"));
            }
            "timestep_type" if string(v)? != "discrete" => {
                return unsupported(&format!("timestep_type {v}"));
            }
            "thresholding"
            | "use_exponential_sigmas"
            | "use_beta_sigmas"
            | "use_lu_lambdas"
            | "use_flow_sigmas"
            | "use_dynamic_shifting"
            | "rescale_betas_zero_snr" => {
                let on = !v.is_null() && boolean(v)?;
                if on {
                    return unsupported(&format!("{key}=true"));
                }
            }
            // Read only by features refused above.
            "dynamic_thresholding_ratio"
            | "sample_max_value"
            | "flow_shift"
            | "time_shift_type" => {}
            _ => {}
        }
        Ok(())
    }

    /// Cross-key checks diffusers makes at construction.
    fn check(&self) -> std::result::Result<(), String> {
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(format!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    b.len(),
                    self.num_train_timesteps
                ));
            }
        }
        if self.kind == Kind::Dpmpp2m && !self.dpmsolver_pp && !self.final_sigma_min {
            return Err(
                "final_sigmas_type \"zero\" is not supported for algorithm_type \"dpmsolver\" \
                 (diffusers refuses it too); use \"sigma_min\""
                    .into(),
            );
        }
        Ok(())
    }

    /// What StableDiffusionPipeline's constructor does to its scheduler's config:
    /// steps_offset becomes 1 and clip_sample becomes false.
    pub fn apply_pipeline_fixes(&mut self) {
        self.steps_offset = 1;
        if self.kind.accepts("clip_sample") {
            self.clip_sample = false;
        }
    }
}

pub fn parse_beta_schedule(s: &str) -> std::result::Result<BetaSchedule, String> {
    match s {
        "linear" => Ok(BetaSchedule::Linear),
        "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
        "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
        o => Err(format!(
            "beta_schedule {o:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        )),
    }
}

pub fn parse_spacing(s: &str) -> std::result::Result<Spacing, String> {
    match s {
        "leading" => Ok(Spacing::Leading),
        "trailing" => Ok(Spacing::Trailing),
        "linspace" => Ok(Spacing::Linspace),
        o => Err(format!(
            "timestep_spacing {o:?} is not one of leading, trailing, linspace"
        )),
    }
}

pub fn parse_prediction(s: &str) -> std::result::Result<Prediction, String> {
    match s {
        "epsilon" => Ok(Prediction::Epsilon),
        "v_prediction" => Ok(Prediction::VPrediction),
        o => Err(format!(
            "prediction_type {o:?} is not supported (epsilon, v_prediction)"
        )),
    }
}

// ---------------------------------------------------------------- numpy/torch arithmetic

/// torch.linspace(start, end, n, dtype=float32) (scalar path: the two halves are
/// computed from each end).
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// np.linspace(start, stop, n) in float64.
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return vec![];
    }
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// np.arange(start, stop, step) in float64, with numpy's length and fill rule.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    // quirk: numpy fills from the first two values, so the stride is (start+step)-start
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// np.interp(x, arange(len(fp)), fp).
fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    let r = slope * (x - j as f64) + fp[j];
    if r.is_nan() {
        slope * (x - (j + 1) as f64) + fp[j + 1]
    } else {
        r
    }
}

/// diffusers' betas_for_alpha_bar (cosine), float64 then float32.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let f = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - f(t2) / f(t1)).min(0.999) as f32
        })
        .collect()
}

/// alphas_cumprod as torch computes it: float32 betas, float32 alphas, a cumulative
/// product accumulated in double (ATen's CPU accumulate type) stored as float32.
fn alphas_cumprod(c: &Config) -> Vec<f32> {
    let n = c.num_train_timesteps;
    let betas: Vec<f32> = if let Some(b) = &c.trained_betas {
        b.iter().map(|&x| x as f32).collect()
    } else {
        match c.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(c.beta_start.sqrt() as f32, c.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|x| x * x)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar(n),
        }
    };
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            acc as f32
        })
        .collect()
}

/// Python indexing of a 1-D tensor by an integer (negative counts from the end).
fn pyindex(v: &[f32], i: i64, what: &str) -> Result<f32> {
    let n = v.len() as i64;
    let j = if i < 0 { i + n } else { i };
    if j < 0 || j >= n {
        bail!(
            "{what}: timestep {i} is out of range for {n} training timesteps \
             (diffusers raises IndexError here too); choose other --steps or spacing"
        );
    }
    Ok(v[j as usize])
}

/// `(1 - acp) / acp) ** 0.5` in float32.
fn sigma_of(acp: f32) -> f32 {
    ((1.0 - acp) / acp).sqrt()
}

/// diffusers' _sigma_to_t: a fractional timestep from a sigma by linear
/// interpolation in log-sigma (log_sigmas are float32, the rest float64).
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // cumsum(dists >= 0).argmax(): the last index with log_sigma >= log_sigmas[i]
    // (the first index reaching the running maximum), 0 when there is none.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_count = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
        }
        if count > best_count {
            best_count = count;
            best = i;
        }
    }
    let low_idx = best.min(n - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) sigmas, rho = 7, float64.
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Timesteps of the discrete schedulers (DDPM, DDIM) and Euler's float variant.
fn spaced(c: &Config, n: usize) -> Vec<f64> {
    let nt = c.num_train_timesteps;
    match c.timestep_spacing {
        Spacing::Linspace => {
            let mut v = np_linspace(0.0, (nt - 1) as f64, n);
            v.reverse();
            v
        }
        Spacing::Leading => {
            let ratio = (nt / n) as f64;
            (0..n)
                .rev()
                .map(|i| i as f64 * ratio + c.steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    }
}

// ---------------------------------------------------------------- the scheduler

/// Per-scheduler state that changes from step to step.
enum State {
    Ddpm,
    Ddim {
        eta: f32,
        final_acp: f32,
    },
    Pndm {
        final_acp: f32,
        prk: Vec<i64>,
        counter: usize,
        ets: Vec<Vec<f32>>,
        cur_model_output: Option<Vec<f32>>,
        cur_sample: Option<Vec<f32>>,
    },
    Euler,
    EulerAncestral,
    Dpm {
        model_outputs: Vec<Option<Vec<f32>>>,
        lower_order_nums: usize,
    },
}

/// A scheduler set to `n` inference steps.
pub struct Scheduler {
    cfg: Config,
    acp: Vec<f32>,
    /// Integer timesteps (DDPM, DDIM, PNDM, DPM++), or empty.
    ts_int: Vec<i64>,
    /// Timesteps as given to the UNet.
    timesteps: Vec<f64>,
    /// Sigmas (Euler, Euler-ancestral, DPM++), with the final one appended.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    /// diffusers' num_inference_steps (the requested n).
    n: usize,
    step_index: Option<usize>,
    state: State,
}

fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

impl Scheduler {
    /// `Scheduler(config).set_timesteps(n)`; `eta` is DDIM's (ignored by the others).
    pub fn new(cfg: &Config, n: usize, eta: f64) -> Result<Scheduler> {
        let name = cfg.kind.name();
        if n == 0 {
            bail!("--steps must be at least 1");
        }
        if n > cfg.num_train_timesteps && cfg.kind != Kind::Dpmpp2m {
            bail!(
                "--steps {n} is larger than the scheduler's num_train_timesteps {} ({name})",
                cfg.num_train_timesteps
            );
        }
        if cfg.use_karras_sigmas && !matches!(cfg.kind, Kind::Euler | Kind::Dpmpp2m) {
            bail!("{name} has no Karras sigmas in diffusers (euler and dpmpp-2m do)");
        }
        let acp = alphas_cumprod(cfg);
        let nt = cfg.num_train_timesteps;
        let mut s = Scheduler {
            cfg: cfg.clone(),
            acp,
            ts_int: vec![],
            timesteps: vec![],
            sigmas: vec![],
            init_noise_sigma: 1.0,
            n,
            step_index: None,
            state: State::Ddpm,
        };
        match cfg.kind {
            Kind::Ddpm | Kind::Ddim => {
                s.ts_int = spaced(cfg, n)
                    .into_iter()
                    .map(|x| x.round_ties_even() as i64)
                    .collect();
                if cfg.kind == Kind::Ddim {
                    s.state = State::Ddim {
                        eta: eta as f32,
                        final_acp: if cfg.set_alpha_to_one { 1.0 } else { s.acp[0] },
                    };
                }
            }
            Kind::Pndm => {
                // _timesteps ascending
                let base: Vec<i64> = match cfg.timestep_spacing {
                    Spacing::Linspace => np_linspace(0.0, (nt - 1) as f64, n)
                        .into_iter()
                        .map(|x| x.round_ties_even() as i64)
                        .collect(),
                    Spacing::Leading => (0..n)
                        .map(|i| (i * (nt / n)) as i64 + cfg.steps_offset)
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
                if cfg.skip_prk_steps {
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
                        bail!(
                            "pndm without skip_prk_steps needs --steps >= 4 (diffusers fails on {n})"
                        );
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
                s.state = State::Pndm {
                    final_acp: if cfg.set_alpha_to_one { 1.0 } else { s.acp[0] },
                    prk,
                    counter: 0,
                    ets: vec![],
                    cur_model_output: None,
                    cur_sample: None,
                };
            }
            Kind::Euler | Kind::EulerAncestral => {
                let ts32: Vec<f32> = match cfg.timestep_spacing {
                    Spacing::Linspace => {
                        let mut v: Vec<f32> = np_linspace(0.0, (nt - 1) as f64, n)
                            .into_iter()
                            .map(|x| x as f32)
                            .collect();
                        v.reverse();
                        v
                    }
                    Spacing::Leading => (0..n)
                        .rev()
                        .map(|i| (i * (nt / n)) as f32 + cfg.steps_offset as f32)
                        .collect(),
                    Spacing::Trailing => np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
                        .into_iter()
                        .map(|x| x.round_ties_even() as f32 - 1.0)
                        .collect(),
                };
                let base: Vec<f32> = s.acp.iter().map(|&a| sigma_of(a)).collect();
                let base64: Vec<f64> = base.iter().map(|&x| f64::from(x)).collect();
                let mut sig: Vec<f64> = ts32
                    .iter()
                    .map(|&t| np_interp(f64::from(t), &base64))
                    .collect();
                let mut ts: Vec<f32> = ts32;
                if cfg.use_karras_sigmas {
                    let log_sigmas: Vec<f32> = base.iter().map(|x| x.ln()).collect();
                    let smin = cfg.sigma_min.unwrap_or(sig[sig.len() - 1]);
                    let smax = cfg.sigma_max.unwrap_or(sig[0]);
                    sig = karras(smin, smax, n);
                    ts = sig
                        .iter()
                        .map(|&x| sigma_to_t(x, &log_sigmas) as f32)
                        .collect();
                }
                let last = if cfg.kind == Kind::Euler && cfg.final_sigma_min {
                    f64::from(sigma_of(s.acp[0]))
                } else {
                    0.0
                };
                sig.push(last);
                s.sigmas = sig.into_iter().map(|x| x as f32).collect();
                s.timesteps = ts.iter().map(|&t| f64::from(t)).collect();
                let max = s.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                s.init_noise_sigma = match cfg.timestep_spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
                s.state = if cfg.kind == Kind::Euler {
                    State::Euler
                } else {
                    State::EulerAncestral
                };
            }
            Kind::Dpmpp2m => {
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
                s.state = State::Dpm {
                    model_outputs: vec![None; cfg.solver_order],
                    lower_order_nums: 0,
                };
            }
        }
        if !s.ts_int.is_empty() {
            s.timesteps = s.ts_int.iter().map(|&t| t as f64).collect();
        }
        Ok(s)
    }

    /// The training schedule's cumulative alpha products (float32, as torch).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.acp
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The timesteps the UNet sees, one per step (the loop runs over these).
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigmas (sigma schedulers only; empty otherwise).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// What initial Gaussian latents are multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// Whether step `i` draws Gaussian noise.
    pub fn step_uses_noise(&self, i: usize) -> bool {
        match &self.state {
            State::Ddpm => self.ts_int.get(i).is_some_and(|&t| t > 0),
            State::Ddim { eta, .. } => *eta > 0.0,
            State::EulerAncestral => true,
            _ => false,
        }
    }

    /// diffusers' index_for_timestep on the first call (sigma schedulers).
    fn index(&mut self) -> usize {
        if let Some(i) = self.step_index {
            return i;
        }
        let t0 = self.timesteps[0];
        let hits: Vec<usize> = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == t0)
            .map(|(i, _)| i)
            .collect();
        // quirk: a repeated first timestep starts at its second occurrence
        let i = if hits.len() > 1 { hits[1] } else { hits[0] };
        self.step_index = Some(i);
        i
    }

    fn sigma_at(&self, i: usize) -> Result<f32> {
        self.sigmas.get(i).copied().ok_or_else(|| {
            Error::input(format!(
                "{}: step index {i} runs past the {} sigmas (repeated timesteps; \
                 diffusers raises IndexError here too); choose other --steps",
                self.cfg.kind.name(),
                self.sigmas.len()
            ))
        })
    }

    /// Linear coefficients of step `i`: the UNet input is `c_in * z` and the
    /// predicted clean latents (diffusers' pred_original_sample, unclipped) are
    /// `a * z + b * model_output`. Used to differentiate through x0 (FedCADO).
    pub fn x0_coeffs(&mut self, i: usize) -> Result<(f32, f32, f32)> {
        let v = self.cfg.prediction_type == Prediction::VPrediction;
        match self.state {
            State::Euler | State::EulerAncestral => {
                let si = self.index();
                let s = self.sigma_at(si)?;
                let c_in = 1.0 / (s * s + 1.0).sqrt();
                Ok(if v {
                    (c_in, 1.0 / (s * s + 1.0), -s / (s * s + 1.0).sqrt())
                } else {
                    (c_in, 1.0, -s)
                })
            }
            State::Dpm { .. } => {
                let si = self.step_index.unwrap_or_else(|| {
                    let t0 = self.ts_int[0];
                    let hits = self.ts_int.iter().filter(|&&x| x == t0).count();
                    usize::from(hits > 1)
                });
                let s = self.sigma_at(si)?;
                let alpha = 1.0 / (s * s + 1.0).sqrt();
                let sig = s * alpha;
                Ok(if v {
                    (1.0, alpha, -sig)
                } else {
                    (1.0, 1.0 / alpha, -sig / alpha)
                })
            }
            _ => {
                let t = self.ts_int[i];
                let a_t = pyindex(&self.acp, t, self.cfg.kind.name())?;
                let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
                Ok(if v {
                    (1.0, sa, -sb)
                } else {
                    (1.0, 1.0 / sa, -sb / sa)
                })
            }
        }
    }

    /// scale_model_input for step `i` (the loop's i-th timestep).
    pub fn scale_model_input(&mut self, _i: usize, sample: &[f32]) -> Result<Vec<f32>> {
        match self.state {
            State::Euler | State::EulerAncestral => {
                let si = self.index();
                let sigma = self.sigma_at(si)?;
                let d = (sigma * sigma + 1.0).sqrt();
                Ok(sample.iter().map(|&x| x / d).collect())
            }
            _ => Ok(sample.to_vec()),
        }
    }

    /// One step from the loop's `i`-th timestep: the previous sample.
    /// `noise` is called when the step draws Gaussian noise (see step_uses_noise).
    pub fn step(
        &mut self,
        i: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        if model_output.len() != sample.len() {
            bail!("scheduler step: model output and sample differ in size");
        }
        let t = self.timesteps[i];
        let name = self.cfg.kind.name();
        let pred = self.cfg.prediction_type;
        let clip = if self.cfg.clip_sample {
            Some(self.cfg.clip_sample_range as f32)
        } else {
            None
        };
        let nt = self.cfg.num_train_timesteps;
        let n = self.n;
        match &mut self.state {
            State::Ddpm => {
                let t = self.ts_int[i];
                // previous_timestep: the entry after the first occurrence of t
                let pos = self.ts_int.iter().position(|&x| x == t).unwrap_or(i);
                let prev_t = if pos + 1 == self.ts_int.len() {
                    -1
                } else {
                    self.ts_int[pos + 1]
                };
                let a_t = pyindex(&self.acp, t, name)?;
                let a_prev = if prev_t >= 0 {
                    pyindex(&self.acp, prev_t, name)?
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
                    let std = match self.cfg.variance_type {
                        Variance::FixedSmall => var.sqrt(),
                        Variance::FixedSmallLog => (0.5 * var.ln()).exp(),
                        Variance::FixedLarge => cur_beta.sqrt(),
                    };
                    let z = noise();
                    prev.iter_mut().zip(&z).for_each(|(p, &z)| *p += std * z);
                }
                Ok(prev)
            }
            State::Ddim { eta, final_acp } => {
                let t = self.ts_int[i];
                // quirk: t - N // n whatever the spacing
                let prev_t = t - (nt / n) as i64;
                let a_t = pyindex(&self.acp, t, name)?;
                let a_prev = if prev_t >= 0 {
                    pyindex(&self.acp, prev_t, name)?
                } else {
                    *final_acp
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
                let std = *eta * variance.sqrt();
                let c_dir = (1.0 - a_prev - std * std).sqrt();
                let sap = a_prev.sqrt();
                let mut prev = map2(&x0, &eps, |x, e| sap * x + c_dir * e);
                if *eta > 0.0 {
                    let z = noise();
                    prev.iter_mut().zip(&z).for_each(|(p, &z)| *p += std * z);
                }
                Ok(prev)
            }
            State::Pndm {
                final_acp,
                prk,
                counter,
                ets,
                cur_model_output,
                cur_sample,
            } => {
                let final_acp = *final_acp;
                let acp = &self.acp;
                let get_prev =
                    |sample: &[f32], t: i64, prev_t: i64, mo: &[f32]| -> Result<Vec<f32>> {
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
                let t = self.ts_int[i];
                let ratio = (nt / n) as i64;
                if *counter < prk.len() && !self.cfg.skip_prk_steps {
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
                if !self.cfg.skip_prk_steps && ets.len() < 3 {
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
            State::Euler => {
                let si = self.index();
                let sigma = self.sigma_at(si)?;
                let next = self.sigma_at(si + 1)?;
                let sigma_hat = sigma * (0.0f32 + 1.0);
                let x0: Vec<f32> = match pred {
                    Prediction::Epsilon => map2(sample, model_output, |s, m| s - sigma_hat * m),
                    Prediction::VPrediction => {
                        let c_m = -sigma / (sigma * sigma + 1.0).sqrt();
                        let c_s = sigma * sigma + 1.0;
                        map2(sample, model_output, |s, m| m * c_m + s / c_s)
                    }
                };
                let dt = next - sigma_hat;
                let prev = (0..sample.len())
                    .map(|k| {
                        let d = (sample[k] - x0[k]) / sigma_hat;
                        sample[k] + d * dt
                    })
                    .collect();
                self.step_index = Some(si + 1);
                Ok(prev)
            }
            State::EulerAncestral => {
                let si = self.index();
                let sigma = self.sigma_at(si)?;
                let sigma_to = self.sigma_at(si + 1)?;
                let x0: Vec<f32> = match pred {
                    Prediction::Epsilon => map2(sample, model_output, |s, m| s - sigma * m),
                    Prediction::VPrediction => {
                        let c_m = -sigma / (sigma * sigma + 1.0).sqrt();
                        let c_s = sigma * sigma + 1.0;
                        map2(sample, model_output, |s, m| m * c_m + s / c_s)
                    }
                };
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
                self.step_index = Some(si + 1);
                Ok(prev)
            }
            State::Dpm {
                model_outputs,
                lower_order_nums,
            } => {
                // step_index from the timestep, as index_for_timestep does
                let si = match self.step_index {
                    Some(s) => s,
                    None => {
                        let t0 = t as i64;
                        let hits: Vec<usize> = self
                            .ts_int
                            .iter()
                            .enumerate()
                            .filter(|(_, &x)| x == t0)
                            .map(|(k, _)| k)
                            .collect();
                        let s = match hits.len() {
                            0 => self.ts_int.len() - 1,
                            1 => hits[0],
                            _ => hits[1],
                        };
                        self.step_index = Some(s);
                        s
                    }
                };
                let len = self.ts_int.len();
                let cfg = &self.cfg;
                let lower_final = si == len - 1
                    && (cfg.euler_at_final
                        || (cfg.lower_order_final && len < 15)
                        || !cfg.final_sigma_min);
                let lower_second = si + 2 == len && cfg.lower_order_final && len < 15;
                let sig = |k: usize| -> Result<f32> {
                    self.sigmas.get(k).copied().ok_or_else(|| {
                        Error::input(format!(
                            "{name}: step index {k} runs past the {} sigmas (repeated timesteps; \
                             diffusers raises IndexError here too); choose other --steps",
                            self.sigmas.len()
                        ))
                    })
                };
                let alpha_sigma = |s: f32| {
                    let a = 1.0 / (s * s + 1.0).sqrt();
                    (a, s * a)
                };
                let (a_s0, s_s0) = alpha_sigma(sig(si)?);
                let converted: Vec<f32> = match (cfg.dpmsolver_pp, pred) {
                    (true, Prediction::Epsilon) => {
                        map2(sample, model_output, |s, m| (s - s_s0 * m) / a_s0)
                    }
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
                let (a_t, s_t) = alpha_sigma(sig(si + 1)?);
                let lam = |a: f32, s: f32| a.ln() - s.ln();
                let lambda_t = lam(a_t, s_t);
                let lambda_s0 = lam(a_s0, s_s0);
                let h = lambda_t - lambda_s0;
                let m0 = model_outputs[last].as_ref().expect("just set");
                let prev: Vec<f32> =
                    if cfg.solver_order == 1 || *lower_order_nums < 1 || lower_final {
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
                        let (a_s1, s_s1) = alpha_sigma(sig(si - 1)?);
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
                self.step_index = Some(si + 1);
                Ok(prev)
            }
        }
    }
}
