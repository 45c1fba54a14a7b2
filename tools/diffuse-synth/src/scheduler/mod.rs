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
//!
//! Layout: this file holds what every scheduler shares — the config as
//! diffusers reads it, the numpy/torch-exact schedule arithmetic, the
//! [`Algorithm`] trait and the [`Scheduler`] every caller uses. Each
//! scheduler is one file implementing [`Algorithm`] and exporting a [`Spec`]
//! (its names, its `__init__` keys, its defaults and how it sets its
//! timesteps); `schedulers!` below registers it. Adding a scheduler is one
//! new file plus one line in that list.

use ftk::{bail, Error, Result};
use serde_json::Value;

/// The registry: `Variant => module`, one line per scheduler (it declares
/// the module `<module>.rs` too). The order is `Kind::ALL`'s.
macro_rules! schedulers {
    ($($(#[$doc:meta])* $kind:ident => $module:ident),* $(,)?) => {
        $(mod $module;)*

        /// The schedulers diffuse-synth implements.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind {
            $($(#[$doc])* $kind,)*
        }

        impl Kind {
            pub const ALL: [Kind; [$(Kind::$kind),*].len()] = [$(Kind::$kind),*];

            /// What the scheduler's own file says about it.
            pub fn spec(self) -> &'static Spec {
                match self {
                    $(Kind::$kind => &$module::SPEC,)*
                }
            }
        }
    };
}

schedulers! {
    Ddpm => ddpm,
    Ddim => ddim,
    Pndm => pndm,
    Euler => euler,
    EulerAncestral => euler_ancestral,
    /// DPMSolverMultistepScheduler (solver_order 2 by default: DPM++ 2M).
    Dpmpp2m => dpmpp_2m,
}

impl Kind {
    /// The CLI name (`ddpm`, ..., `dpmpp-2m`).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The diffusers class name, as `_class_name` in scheduler_config.json.
    pub fn class_name(self) -> &'static str {
        self.spec().class_name
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn from_class_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.class_name() == s)
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
        COMMON.contains(&key) || self.spec().init_keys.contains(&key)
    }
}

/// One scheduler as its file describes it.
pub struct Spec {
    /// The CLI name.
    pub name: &'static str,
    /// The diffusers class name.
    pub class_name: &'static str,
    /// The keyword arguments of the class's `__init__` (diffusers 0.42)
    /// besides the beta keys every scheduler takes.
    pub init_keys: &'static [&'static str],
    /// The class's `__init__` defaults where they differ from [`Config`]'s
    /// common ones.
    pub defaults: fn(&mut Config),
    /// Cross-key checks the class makes at construction.
    pub check: fn(&Config) -> ValueResult<()>,
    /// Whether the class has Karras sigmas (use_karras_sigmas).
    pub karras: bool,
    /// Whether --steps may exceed num_train_timesteps.
    pub steps_beyond_training: bool,
    /// `set_timesteps(n)`: fill the schedule, return the stepping state.
    /// `eta` is DDIM's (the others ignore it).
    pub build: fn(&mut Schedule, eta: f64) -> Result<Box<dyn Algorithm>>,
}

/// A config value that diffusers (or diffuse-synth) refuses. It names the value, not
/// where it came from: the caller adds the file and key, or the flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError(String);

impl std::fmt::Display for ValueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}

impl From<String> for ValueError {
    fn from(m: String) -> Self {
        ValueError(m)
    }
}

impl From<&str> for ValueError {
    fn from(m: &str) -> Self {
        ValueError(m.to_owned())
    }
}

pub type ValueResult<T> = std::result::Result<T, ValueError>;

/// For [`Spec::defaults`] of a scheduler with none of its own.
fn no_defaults(_: &mut Config) {}

/// For [`Spec::check`] of a scheduler with no cross-key rule.
fn no_check(_: &Config) -> ValueResult<()> {
    Ok(())
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
    /// The class's own `__init__` defaults: the ones every scheduler shares,
    /// then the scheduler's own ([`Spec::defaults`]).
    pub fn defaults(kind: Kind) -> Config {
        let mut c = Config {
            kind,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: Prediction::Epsilon,
            timestep_spacing: Spacing::Linspace,
            steps_offset: 0,
            set_alpha_to_one: false,
            clip_sample: false,
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
        };
        (kind.spec().defaults)(&mut c);
        c
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
    /// (One arm per diffusers config key, hence over 100 lines.)
    pub fn set(&mut self, key: &str, v: &Value) -> ValueResult<()> {
        fn num(v: &Value) -> ValueResult<f64> {
            v.as_f64()
                .ok_or_else(|| format!("expected a number, got {v}").into())
        }
        fn boolean(v: &Value) -> ValueResult<bool> {
            v.as_bool()
                .ok_or_else(|| format!("expected true or false, got {v}").into())
        }
        fn string(v: &Value) -> ValueResult<&str> {
            v.as_str()
                .ok_or_else(|| format!("expected a string, got {v}").into())
        }
        fn unsupported(what: &str) -> ValueResult<()> {
            Err(format!("{what} is not supported by diffuse-synth").into())
        }
        match key {
            "num_train_timesteps" => {
                let n = v
                    .as_u64()
                    // Published schedulers train on 1000; the ceiling keeps a corrupt
                    // value from sizing the beta/alpha tables (found by the fuzzer).
                    .filter(|&n| (2..=1 << 20).contains(&n))
                    .ok_or_else(|| format!("expected an integer from 2 to 1048576, got {v}"))?;
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
                    _ => return Err(format!("expected null or a list of numbers, got {v}").into()),
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
                        return Err(
                            format!("expected \"zero\" or \"sigma_min\", got {other:?}").into()
                        )
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
                    other => return Err(format!("unknown solver_type {other:?}").into()),
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
    fn check(&self) -> ValueResult<()> {
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(format!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    b.len(),
                    self.num_train_timesteps
                )
                .into());
            }
        }
        (self.kind.spec().check)(self)?;
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

pub fn parse_beta_schedule(s: &str) -> ValueResult<BetaSchedule> {
    match s {
        "linear" => Ok(BetaSchedule::Linear),
        "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
        "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
        o => Err(format!(
            "beta_schedule {o:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        )
        .into()),
    }
}

pub fn parse_spacing(s: &str) -> ValueResult<Spacing> {
    match s {
        "leading" => Ok(Spacing::Leading),
        "trailing" => Ok(Spacing::Trailing),
        "linspace" => Ok(Spacing::Linspace),
        o => {
            Err(format!("timestep_spacing {o:?} is not one of leading, trailing, linspace").into())
        }
    }
}

pub fn parse_prediction(s: &str) -> ValueResult<Prediction> {
    match s {
        "epsilon" => Ok(Prediction::Epsilon),
        "v_prediction" => Ok(Prediction::VPrediction),
        o => Err(format!("prediction_type {o:?} is not supported (epsilon, v_prediction)").into()),
    }
}

// ---------------------------------------------------------------- numpy/torch arithmetic

/// torch.linspace(start, end, n, dtype=float32) (scalar path: the two halves are
/// computed from each end).
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
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
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
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
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
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
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
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
pub(crate) fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
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
pub(crate) fn alphas_cumprod(c: &Config) -> Vec<f32> {
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
pub(crate) fn pyindex(v: &[f32], i: i64, what: &str) -> Result<f32> {
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
pub(crate) fn sigma_of(acp: f32) -> f32 {
    ((1.0 - acp) / acp).sqrt()
}

/// diffusers' _sigma_to_t: a fractional timestep from a sigma by linear
/// interpolation in log-sigma (log_sigmas are float32, the rest float64).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
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
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Timesteps of the discrete schedulers (DDPM, DDIM) and Euler's float variant.
pub(crate) fn spaced(c: &Config, n: usize) -> Vec<f64> {
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

/// diffusers' index_for_timestep: the position of `t` in `timesteps`; a
/// repeated timestep starts at its second occurrence (quirk), one not in the
/// schedule at the last step.
pub(crate) fn index_for_timestep(timesteps: &[f64], t: f64) -> usize {
    let mut hits = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == t)
        .map(|(i, _)| i);
    match (hits.next(), hits.next()) {
        (None, _) => timesteps.len().saturating_sub(1),
        (Some(i), None) => i,
        (Some(_), Some(j)) => j,
    }
}

pub(crate) fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

// ---------------------------------------------------------------- the scheduler

/// The schedule set by `set_timesteps`, which every step reads.
pub struct Schedule {
    pub cfg: Config,
    /// The training schedule's cumulative alpha products (float32).
    pub acp: Vec<f32>,
    /// Integer timesteps (DDPM, DDIM, PNDM, DPM++), or empty.
    pub ts_int: Vec<i64>,
    /// Timesteps as given to the UNet.
    pub timesteps: Vec<f64>,
    /// Sigmas (Euler, Euler-ancestral, DPM++), with the final one appended.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
    /// diffusers' num_inference_steps (the requested n).
    pub n: usize,
    /// The sigma schedulers' step index, from the first timestep on.
    pub step_index: Option<usize>,
}

impl Schedule {
    /// The step index, found on the first call as diffusers'
    /// `_init_step_index` does (sigma schedulers).
    pub fn index(&mut self) -> usize {
        *self
            .step_index
            .get_or_insert_with(|| index_for_timestep(&self.timesteps, self.timesteps[0]))
    }

    pub fn sigma_at(&self, i: usize) -> Result<f32> {
        self.sigmas.get(i).copied().ok_or_else(|| {
            Error::input(format!(
                "{}: step index {i} runs past the {} sigmas (repeated timesteps; \
                 diffusers raises IndexError here too); choose other --steps",
                self.cfg.kind.name(),
                self.sigmas.len()
            ))
        })
    }

    /// x0 coefficients from alpha_cumprod at the integer timestep of step
    /// `i` (the discrete schedulers).
    fn alpha_x0_coeffs(&self, i: usize) -> Result<(f32, f32, f32)> {
        let v = self.cfg.prediction_type == Prediction::VPrediction;
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

/// What one scheduler does per step; the schedule itself is in [`Schedule`].
pub trait Algorithm: Send + Sync {
    /// One step from the loop's `i`-th timestep: the previous sample.
    fn step(
        &mut self,
        s: &mut Schedule,
        i: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn FnMut() -> Vec<f32>,
    ) -> Result<Vec<f32>>;

    /// Whether step `i` draws Gaussian noise.
    fn uses_noise(&self, _s: &Schedule, _i: usize) -> bool {
        false
    }

    /// Euler-type: the UNet input is scaled by the current sigma, and x0
    /// comes from it too.
    fn sigma_scaled(&self) -> bool {
        false
    }

    /// See [`Scheduler::x0_coeffs`]: from the current sigma (Euler-type) or
    /// from alpha_cumprod at the step's timestep.
    fn x0_coeffs(&mut self, s: &mut Schedule, i: usize) -> Result<(f32, f32, f32)> {
        if self.sigma_scaled() {
            sigma_x0_coeffs(s)
        } else {
            s.alpha_x0_coeffs(i)
        }
    }

    /// scale_model_input: sample / sqrt(sigma² + 1) (Euler-type), else the identity.
    fn scale_model_input(&mut self, s: &mut Schedule, sample: &[f32]) -> Result<Vec<f32>> {
        if self.sigma_scaled() {
            sigma_scale_input(s, sample)
        } else {
            Ok(sample.to_vec())
        }
    }
}

/// A scheduler set to `n` inference steps.
pub struct Scheduler {
    s: Schedule,
    alg: Box<dyn Algorithm>,
}

impl Scheduler {
    /// `Scheduler(config).set_timesteps(n)`; `eta` is DDIM's (ignored by the others).
    pub fn new(cfg: &Config, n: usize, eta: f64) -> Result<Scheduler> {
        let spec = cfg.kind.spec();
        let name = spec.name;
        if n == 0 {
            bail!("--steps must be at least 1");
        }
        if n > cfg.num_train_timesteps && !spec.steps_beyond_training {
            bail!(
                "--steps {n} is larger than the scheduler's num_train_timesteps {} ({name})",
                cfg.num_train_timesteps
            );
        }
        if cfg.use_karras_sigmas && !spec.karras {
            bail!("{name} has no Karras sigmas in diffusers (euler and dpmpp-2m do)");
        }
        let mut s = Schedule {
            cfg: cfg.clone(),
            acp: alphas_cumprod(cfg),
            ts_int: vec![],
            timesteps: vec![],
            sigmas: vec![],
            init_noise_sigma: 1.0,
            n,
            step_index: None,
        };
        let alg = (spec.build)(&mut s, eta)?;
        if !s.ts_int.is_empty() {
            s.timesteps = s.ts_int.iter().map(|&t| t as f64).collect();
        }
        Ok(Scheduler { s, alg })
    }

    /// The training schedule's cumulative alpha products (float32, as torch).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.s.acp
    }

    pub fn config(&self) -> &Config {
        &self.s.cfg
    }

    /// The timesteps the UNet sees, one per step (the loop runs over these).
    pub fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }

    /// The sigmas (sigma schedulers only; empty otherwise).
    pub fn sigmas(&self) -> &[f32] {
        &self.s.sigmas
    }

    /// What initial Gaussian latents are multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.s.init_noise_sigma
    }

    /// Whether step `i` draws Gaussian noise.
    pub fn step_uses_noise(&self, i: usize) -> bool {
        self.alg.uses_noise(&self.s, i)
    }

    /// Linear coefficients of step `i`: the UNet input is `c_in * z` and the
    /// predicted clean latents (diffusers' pred_original_sample, unclipped) are
    /// `a * z + b * model_output`. Used to differentiate through x0 (FedCADO).
    pub fn x0_coeffs(&mut self, i: usize) -> Result<(f32, f32, f32)> {
        self.alg.x0_coeffs(&mut self.s, i)
    }

    /// scale_model_input for step `i` (the loop's i-th timestep).
    pub fn scale_model_input(&mut self, _i: usize, sample: &[f32]) -> Result<Vec<f32>> {
        self.alg.scale_model_input(&mut self.s, sample)
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
        self.alg.step(&mut self.s, i, model_output, sample, noise)
    }
}

// ---------------------------------------------------------------- shared by the sigma schedulers

/// x0 coefficients of Euler-type schedulers at the current sigma.
fn sigma_x0_coeffs(s: &mut Schedule) -> Result<(f32, f32, f32)> {
    let v = s.cfg.prediction_type == Prediction::VPrediction;
    let si = s.index();
    let sg = s.sigma_at(si)?;
    let c_in = 1.0 / (sg * sg + 1.0).sqrt();
    Ok(if v {
        (c_in, 1.0 / (sg * sg + 1.0), -sg / (sg * sg + 1.0).sqrt())
    } else {
        (c_in, 1.0, -sg)
    })
}

/// Euler-type scale_model_input: sample / sqrt(sigma² + 1).
fn sigma_scale_input(s: &mut Schedule, sample: &[f32]) -> Result<Vec<f32>> {
    let si = s.index();
    let sigma = s.sigma_at(si)?;
    let d = (sigma * sigma + 1.0).sqrt();
    Ok(sample.iter().map(|&x| x / d).collect())
}

/// Euler-type predicted x0 at `sigma`.
pub(crate) fn sigma_x0(
    pred: Prediction,
    sigma: f32,
    sample: &[f32],
    model_output: &[f32],
) -> Vec<f32> {
    match pred {
        Prediction::Epsilon => map2(sample, model_output, |s, m| s - sigma * m),
        Prediction::VPrediction => {
            let c_m = -sigma / (sigma * sigma + 1.0).sqrt();
            let c_s = sigma * sigma + 1.0;
            map2(sample, model_output, |s, m| m * c_m + s / c_s)
        }
    }
}

/// Euler-type set_timesteps: timesteps by spacing, sigmas interpolated
/// from the training schedule (or Karras'), the final sigma appended (the
/// smallest training sigma when `final_sigma_min`, else 0).
pub(crate) fn euler_schedule(s: &mut Schedule, final_sigma_min: bool) {
    let (nt, n) = (s.cfg.num_train_timesteps, s.n);
    let ts32: Vec<f32> = match s.cfg.timestep_spacing {
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
            .map(|i| (i * (nt / n)) as f32 + s.cfg.steps_offset as f32)
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
    if s.cfg.use_karras_sigmas {
        let log_sigmas: Vec<f32> = base.iter().map(|x| x.ln()).collect();
        let smin = s.cfg.sigma_min.unwrap_or(sig[sig.len() - 1]);
        let smax = s.cfg.sigma_max.unwrap_or(sig[0]);
        sig = karras(smin, smax, n);
        ts = sig
            .iter()
            .map(|&x| sigma_to_t(x, &log_sigmas) as f32)
            .collect();
    }
    let last = if final_sigma_min {
        f64::from(sigma_of(s.acp[0]))
    } else {
        0.0
    };
    sig.push(last);
    s.sigmas = sig.into_iter().map(|x| x as f32).collect();
    s.timesteps = ts.iter().map(|&t| f64::from(t)).collect();
    let max = s.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    s.init_noise_sigma = match s.cfg.timestep_spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    };
}
