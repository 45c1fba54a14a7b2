//! Strategy names, their flags and Flower's defaults, checked once into a
//! [`Strategy`] the numerical code uses (it never sees clap).

use crate::flower_api::FlowerApi;
use clap::ValueEnum;
use ftk::{bail, Result};

/// Strategy names as on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Name {
    Fedavg,
    Fedprox,
    Fedavgm,
    Fedadam,
    Fedyogi,
    Fedadagrad,
    Fedmedian,
    Fedtrimmedavg,
    Krum,
    Multikrum,
    Bulyan,
    Fedra,
}

impl Name {
    pub fn as_str(self) -> &'static str {
        match self {
            Name::Fedavg => "fedavg",
            Name::Fedprox => "fedprox",
            Name::Fedavgm => "fedavgm",
            Name::Fedadam => "fedadam",
            Name::Fedyogi => "fedyogi",
            Name::Fedadagrad => "fedadagrad",
            Name::Fedmedian => "fedmedian",
            Name::Fedtrimmedavg => "fedtrimmedavg",
            Name::Krum => "krum",
            Name::Multikrum => "multikrum",
            Name::Bulyan => "bulyan",
            Name::Fedra => "fedra",
        }
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
    pub name: Name,
    pub kind: Kind,
    pub eta_l: Option<f64>,
    pub api: FlowerApi,
}

impl Strategy {
    pub fn new(name: Name, f: &StrategyFlags) -> Result<Strategy> {
        let mut used: Vec<&str> = Vec::new();
        let given = [
            ("--server-lr", f.server_lr.is_some()),
            ("--server-momentum", f.server_momentum.is_some()),
            ("--eta", f.eta.is_some()),
            ("--eta-l", f.eta_l.is_some()),
            ("--beta1", f.beta1.is_some()),
            ("--beta2", f.beta2.is_some()),
            ("--tau", f.tau.is_some()),
            ("--trim-beta", f.trim_beta.is_some()),
            ("--num-malicious", f.num_malicious.is_some()),
            ("--to-keep", f.to_keep.is_some()),
        ];
        let fedopt = |eta: f64, b1: f64, b2: f64, tau: f64| -> Result<(f64, f64, f64, f64)> {
            let v = (
                f.eta.unwrap_or(eta),
                f.beta1.unwrap_or(b1),
                f.beta2.unwrap_or(b2),
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
        };
        let kind = match name {
            Name::Fedavg | Name::Fedprox => Kind::Linear {
                opt: ServerOpt::None,
                uniform: false,
            },
            Name::Fedra => Kind::Linear {
                opt: ServerOpt::None,
                uniform: true,
            },
            Name::Fedavgm => {
                used.extend(["--server-lr", "--server-momentum"]);
                let lr = f.server_lr.unwrap_or(1.0);
                let momentum = f.server_momentum.unwrap_or(0.0);
                if !(lr.is_finite() && momentum.is_finite() && momentum >= 0.0) {
                    bail!("--server-lr must be finite and --server-momentum finite and >= 0");
                }
                // Flower only steps when momentum != 0 or lr != 1.
                let opt = if momentum != 0.0 || lr != 1.0 {
                    ServerOpt::AvgM { lr, momentum }
                } else {
                    ServerOpt::None
                };
                Kind::Linear {
                    opt,
                    uniform: false,
                }
            }
            Name::Fedadam | Name::Fedyogi => {
                used.extend(["--eta", "--eta-l", "--beta1", "--beta2", "--tau"]);
                let opt = if name == Name::Fedadam {
                    let (eta, beta1, beta2, tau) =
                        fedopt(0.1, 0.9, 0.99, f.flower_api.default_tau(name))?;
                    ServerOpt::Adam {
                        eta,
                        beta1,
                        beta2,
                        tau,
                    }
                } else {
                    let (eta, beta1, beta2, tau) =
                        fedopt(1e-2, 0.9, 0.99, f.flower_api.default_tau(name))?;
                    ServerOpt::Yogi {
                        eta,
                        beta1,
                        beta2,
                        tau,
                    }
                };
                Kind::Linear {
                    opt,
                    uniform: false,
                }
            }
            Name::Fedadagrad => {
                used.extend(["--eta", "--eta-l", "--tau"]);
                let (eta, _, _, tau) = fedopt(0.1, 0.0, 0.0, f.flower_api.default_tau(name))?;
                Kind::Linear {
                    opt: ServerOpt::Adagrad { eta, tau },
                    uniform: false,
                }
            }
            Name::Fedmedian => Kind::Median,
            Name::Fedtrimmedavg => {
                used.push("--trim-beta");
                let beta = f.trim_beta.unwrap_or(0.2);
                if !(0.0..0.5).contains(&beta) {
                    bail!(
                        "--trim-beta {beta} is outside [0, 0.5) (Flower's proportiontocut range)"
                    );
                }
                Kind::TrimmedMean { beta }
            }
            Name::Krum | Name::Multikrum => {
                used.extend(["--num-malicious", "--to-keep"]);
                let to_keep = f.to_keep.unwrap_or(0);
                if name == Name::Multikrum && to_keep == 0 {
                    bail!("multikrum needs --to-keep K >= 1 (the number of clients averaged)");
                }
                Kind::Krum {
                    f: f.num_malicious.unwrap_or(0),
                    to_keep,
                }
            }
            Name::Bulyan => {
                used.push("--num-malicious");
                Kind::Bulyan {
                    f: f.num_malicious.unwrap_or(0),
                }
            }
        };
        for (flag, is) in given {
            if is && !used.contains(&flag) {
                bail!(
                    "{flag} does not apply to --strategy {}; see --help for each strategy's flags",
                    name.as_str()
                );
            }
        }
        Ok(Strategy {
            name,
            kind,
            eta_l: f.eta_l,
            api: f.flower_api,
        })
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

    #[test]
    fn flower_defaults_and_flag_checks() {
        let s = Strategy::new(Name::Fedyogi, &StrategyFlags::default()).unwrap();
        assert_eq!(
            s.opt(),
            ServerOpt::Yogi {
                eta: 1e-2,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            }
        );
        let s = Strategy::new(Name::Fedavgm, &StrategyFlags::default()).unwrap();
        assert_eq!(s.opt(), ServerOpt::None);
        let bad = StrategyFlags {
            beta1: Some(0.5),
            ..Default::default()
        };
        let e = Strategy::new(Name::Fedadagrad, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--beta1 does not apply"), "{e}");
        let e = Strategy::new(Name::Multikrum, &StrategyFlags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--to-keep"), "{e}");
        let tb = StrategyFlags {
            trim_beta: Some(0.5),
            ..Default::default()
        };
        assert!(Strategy::new(Name::Fedtrimmedavg, &tb).is_err());
    }
}
