//! The strategies fed-aggregate implements, one file each, and what they
//! share: the raw strategy flags, the checked [`Strategy`] the numerical code
//! uses (it never sees clap), and how values are combined ([`Kind`],
//! [`ServerOpt`]).
//!
//! Each strategy file exports a [`Spec`]: its CLI name, its help text, the
//! flags it reads, and `build`, which applies Flower's defaults to those
//! flags and returns the [`Kind`]. `strategies!` below registers it; the
//! `--strategy` value list, the `--help` table and construction all come
//! from that list. Adding a strategy is one new file plus one line there.

use crate::flower_api::FlowerApi;
use clap::builder::{PossibleValue, TypedValueParser};
use ftk::{bail, Result};

/// The registry: one module name per line (it declares `<module>.rs` too).
/// The order is `--help`'s.
macro_rules! strategies {
    ($($module:ident),* $(,)?) => {
        $(mod $module;)*

        /// Every strategy, in `--help` order.
        pub static ALL: &[&Spec] = &[$(&$module::SPEC),*];
    };
}

strategies! {
    fedavg,
    fedprox,
    fedavgm,
    fedadam,
    fedyogi,
    fedadagrad,
    fedmedian,
    fedtrimmedavg,
    krum,
    multikrum,
    bulyan,
    fedra,
}

/// What a strategy's own file says about it.
#[derive(Debug)]
pub struct Spec {
    /// The CLI name (`--strategy`), recorded in partials and states.
    pub name: &'static str,
    /// One line for `--strategy`'s value list.
    pub about: &'static str,
    /// Its block in `--help`'s strategy table: Flower's defaults and the
    /// math (lines after the first are indented by [`DOC_INDENT`]).
    pub doc: &'static str,
    /// The strategy flags it reads; any other one given is refused.
    pub flags: &'static [Flag],
    /// Clients hold subsets of the layers, given by `--alloc` (FedRA):
    /// a layer's mean is over its holders, and a layer nobody held keeps
    /// its `--global` value.
    pub layer_alloc: bool,
    /// Flower's math for these flags (defaults applied, ranges checked).
    pub build: fn(&StrategyFlags) -> Result<Kind>,
}

/// Column where a strategy's [`Spec::doc`] starts in `--help`.
pub const DOC_INDENT: usize = 21;

/// A strategy by its CLI name.
pub fn by_name(name: &str) -> Option<&'static Spec> {
    ALL.iter().copied().find(|s| s.name == name)
}

/// The registered names, for messages.
pub fn names() -> String {
    ALL.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// `--help`'s strategy table, from the registry.
pub fn help_table() -> String {
    let indent = format!("\n{:DOC_INDENT$}", "");
    ALL.iter()
        .map(|s| {
            let doc = s.doc.replace('\n', &indent);
            format!("  {:w$}{doc}\n", s.name, w = DOC_INDENT - 2)
        })
        .collect()
}

/// clap's parser for `--strategy`: the registered names, each with its
/// [`Spec::about`] in the value list.
#[derive(Clone, Copy, Debug)]
pub struct NameParser;

impl TypedValueParser for NameParser {
    type Value = &'static Spec;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<&'static Spec, clap::Error> {
        // clap's own parser writes the usual "invalid value ... [possible
        // values: ...]" (with a did-you-mean) for a name not in the list.
        let name = clap::builder::PossibleValuesParser::new(self.possible_values_vec())
            .parse_ref(cmd, arg, value)?;
        by_name(&name)
            .ok_or_else(|| clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(self.possible_values_vec().into_iter()))
    }
}

impl NameParser {
    fn possible_values_vec(&self) -> Vec<PossibleValue> {
        ALL.iter()
            .map(|s| PossibleValue::new(s.name).help(s.about))
            .collect()
    }
}

/// Raw strategy flags (all optional so each strategy can apply Flower's own
/// defaults and reject flags that do not apply to it).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StrategyFlags {
    /// FedAvgM server learning rate [default 1.0].
    #[arg(long, value_name = "LR")]
    pub server_lr: Option<f64>,
    /// FedAvgM server momentum [default 0.0].
    #[arg(long, value_name = "M")]
    pub server_momentum: Option<f64>,
    /// FedOpt server learning rate [fedadam/fedadagrad 0.1, fedyogi 0.01].
    #[arg(long)]
    pub eta: Option<f64>,
    /// FedOpt client learning rate (sent to clients by Flower; recorded only).
    #[arg(long)]
    pub eta_l: Option<f64>,
    /// FedOpt first-moment decay [fedadam/fedyogi 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// FedOpt second-moment decay [fedadam/fedyogi 0.99].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// FedOpt adaptivity [fedadam/fedadagrad 1e-9 (message API 1e-3), fedyogi 1e-3].
    #[arg(long)]
    pub tau: Option<f64>,
    /// Which Flower strategy family to reproduce: legacy (flwr.server.strategy)
    /// or message (flwr.serverapp.strategy: FedAdam/FedAdagrad tau 1e-3,
    /// one-pass Bulyan selection).
    #[arg(long, value_enum, default_value_t = FlowerApi::Legacy)]
    pub flower_api: FlowerApi,
    /// FedTrimmedAvg fraction cut from each end, in [0, 0.5) [default 0.2].
    #[arg(long, value_name = "BETA")]
    pub trim_beta: Option<f64>,
    /// Krum/MultiKrum/Bulyan: assumed number of malicious clients [default 0].
    #[arg(long, value_name = "F")]
    pub num_malicious: Option<usize>,
    /// MultiKrum: clients kept and averaged (krum with this > 0 is MultiKrum).
    #[arg(long, value_name = "K")]
    pub to_keep: Option<usize>,
}

/// The strategy flags a [`Spec`] may read (`--flower-api` applies to all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    ServerLr,
    ServerMomentum,
    Eta,
    EtaL,
    Beta1,
    Beta2,
    Tau,
    TrimBeta,
    NumMalicious,
    ToKeep,
}

impl Flag {
    const ALL: [Flag; 10] = [
        Flag::ServerLr,
        Flag::ServerMomentum,
        Flag::Eta,
        Flag::EtaL,
        Flag::Beta1,
        Flag::Beta2,
        Flag::Tau,
        Flag::TrimBeta,
        Flag::NumMalicious,
        Flag::ToKeep,
    ];

    /// As on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Flag::ServerLr => "--server-lr",
            Flag::ServerMomentum => "--server-momentum",
            Flag::Eta => "--eta",
            Flag::EtaL => "--eta-l",
            Flag::Beta1 => "--beta1",
            Flag::Beta2 => "--beta2",
            Flag::Tau => "--tau",
            Flag::TrimBeta => "--trim-beta",
            Flag::NumMalicious => "--num-malicious",
            Flag::ToKeep => "--to-keep",
        }
    }

    fn given(self, f: &StrategyFlags) -> bool {
        match self {
            Flag::ServerLr => f.server_lr.is_some(),
            Flag::ServerMomentum => f.server_momentum.is_some(),
            Flag::Eta => f.eta.is_some(),
            Flag::EtaL => f.eta_l.is_some(),
            Flag::Beta1 => f.beta1.is_some(),
            Flag::Beta2 => f.beta2.is_some(),
            Flag::Tau => f.tau.is_some(),
            Flag::TrimBeta => f.trim_beta.is_some(),
            Flag::NumMalicious => f.num_malicious.is_some(),
            Flag::ToKeep => f.to_keep.is_some(),
        }
    }
}

/// The FedOpt flags.
pub const FEDOPT_FLAGS: &[Flag] = &[Flag::Eta, Flag::EtaL, Flag::Beta1, Flag::Beta2, Flag::Tau];

/// FedOpt's (eta, beta1, beta2, tau) from the flags, each defaulting to the
/// value given here, checked.
pub fn fedopt(
    f: &StrategyFlags,
    eta: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
) -> Result<(f64, f64, f64, f64)> {
    let v = (
        f.eta.unwrap_or(eta),
        f.beta1.unwrap_or(beta1),
        f.beta2.unwrap_or(beta2),
        f.tau.unwrap_or(tau),
    );
    if !(v.0.is_finite() && v.3.is_finite() && v.3 >= 0.0) {
        bail!("--eta must be finite and --tau finite and >= 0");
    }
    for (flag, b) in [("--beta1", v.1), ("--beta2", v.2)] {
        if !(0.0..1.0).contains(&b) {
            bail!("{flag} {b} is outside [0, 1)");
        }
    }
    Ok(v)
}

/// A server optimiser step applied to the weighted average.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServerOpt {
    /// The average is the result.
    None,
    /// FedAvgM: SGD with momentum on the pseudo-gradient `global - avg`.
    AvgM { lr: f64, momentum: f64 },
    /// FedAdam with Flower's bias-corrected step size.
    Adam {
        eta: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
    /// FedYogi (no bias correction in Flower).
    Yogi {
        eta: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
    /// FedAdagrad (beta1 = beta2 = 0 in Flower).
    Adagrad { eta: f64, tau: f64 },
}

impl ServerOpt {
    /// Whether the step reads `--global`.
    pub fn needs_global(self) -> bool {
        !matches!(self, ServerOpt::None)
    }
    /// State tensor prefixes this optimiser keeps between rounds.
    pub fn state_slots(self) -> &'static [&'static str] {
        match self {
            ServerOpt::None => &[],
            ServerOpt::AvgM { momentum, .. } if momentum > 0.0 => &["momentum"],
            ServerOpt::AvgM { .. } => &[],
            ServerOpt::Adam { .. } | ServerOpt::Yogi { .. } => &["m", "v"],
            ServerOpt::Adagrad { .. } => &["v"],
        }
    }
}

/// How the final values are computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Weighted mean (num_examples, or uniform for FedRA) then `opt`.
    Linear {
        opt: ServerOpt,
        uniform: bool,
    },
    Median,
    TrimmedMean {
        beta: f64,
    },
    /// Krum (to_keep = 0) or MultiKrum.
    Krum {
        f: usize,
        to_keep: usize,
    },
    Bulyan {
        f: usize,
    },
}

/// A checked strategy.
#[derive(Clone, Copy, Debug)]
pub struct Strategy {
    pub spec: &'static Spec,
    pub kind: Kind,
    pub eta_l: Option<f64>,
    pub api: FlowerApi,
}

impl Strategy {
    pub fn new(spec: &'static Spec, f: &StrategyFlags) -> Result<Strategy> {
        if let Some(flag) = Flag::ALL
            .into_iter()
            .find(|&g| g.given(f) && !spec.flags.contains(&g))
        {
            bail!(
                "{} does not apply to --strategy {}; see --help for each strategy's flags",
                flag.name(),
                spec.name
            );
        }
        Ok(Strategy {
            spec,
            kind: (spec.build)(f)?,
            eta_l: f.eta_l,
            api: f.flower_api,
        })
    }

    /// The CLI name.
    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    /// The server optimiser, for linear strategies.
    pub fn opt(&self) -> ServerOpt {
        match self.kind {
            Kind::Linear { opt, .. } => opt,
            _ => ServerOpt::None,
        }
    }

    /// Whether partial sums can represent this strategy.
    pub fn mergeable(&self) -> bool {
        matches!(self.kind, Kind::Linear { .. })
    }

    /// The strategies partial sums can represent, for messages.
    pub fn mergeable_names() -> String {
        let f = StrategyFlags::default();
        ALL.iter()
            .filter(|s| matches!((s.build)(&f), Ok(Kind::Linear { .. })))
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Weighting recorded in partial files: "num_examples" or "uniform".
    pub fn weighting(&self) -> &'static str {
        match self.kind {
            Kind::Linear { uniform: true, .. } => "uniform",
            _ => "num_examples",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(name: &str, f: &StrategyFlags) -> Result<Strategy> {
        Strategy::new(by_name(name).unwrap(), f)
    }

    #[test]
    fn flower_defaults_and_flag_checks() {
        let s = build("fedyogi", &StrategyFlags::default()).unwrap();
        assert_eq!(
            s.opt(),
            ServerOpt::Yogi {
                eta: 1e-2,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            }
        );
        let s = build("fedavgm", &StrategyFlags::default()).unwrap();
        assert_eq!(s.opt(), ServerOpt::None);
        let bad = StrategyFlags {
            beta1: Some(0.5),
            ..Default::default()
        };
        let e = build("fedadagrad", &bad).unwrap_err().to_string();
        assert!(e.contains("--beta1 does not apply"), "{e}");
        let e = build("multikrum", &StrategyFlags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--to-keep"), "{e}");
        let tb = StrategyFlags {
            trim_beta: Some(0.5),
            ..Default::default()
        };
        assert!(build("fedtrimmedavg", &tb).is_err());
    }

    #[test]
    fn registry_names_are_unique_and_every_flag_is_read_by_someone() {
        let mut names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for flag in Flag::ALL {
            assert!(
                ALL.iter().any(|s| s.flags.contains(&flag)),
                "{} is read by no strategy",
                flag.name()
            );
        }
        // The help table keeps every doc in its column.
        for line in help_table().lines() {
            assert!(line.len() <= 100, "{line}");
        }
        assert_eq!(
            Strategy::mergeable_names(),
            "fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, fedra"
        );
    }

    #[test]
    fn tau_defaults_follow_the_api() {
        let tau = |name: &str, api: FlowerApi| {
            let f = StrategyFlags {
                flower_api: api,
                ..Default::default()
            };
            match build(name, &f).unwrap().opt() {
                ServerOpt::Adam { tau, .. }
                | ServerOpt::Yogi { tau, .. }
                | ServerOpt::Adagrad { tau, .. } => tau,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(tau("fedadam", FlowerApi::Legacy), 1e-9);
        assert_eq!(tau("fedadam", FlowerApi::Message), 1e-3);
        assert_eq!(tau("fedadagrad", FlowerApi::Message), 1e-3);
        assert_eq!(tau("fedadagrad", FlowerApi::Legacy), 1e-9);
        assert_eq!(tau("fedyogi", FlowerApi::Legacy), 1e-3);
    }
}
