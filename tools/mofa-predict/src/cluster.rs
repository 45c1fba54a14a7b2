//! GPU and cluster presets with their published figures.
//!
//! Units: `peak_tflops` is the dense (no 2:4 sparsity) 16-bit tensor-core
//! peak; `hbm_gbs` is memory bandwidth in GB/s; `intra_node_gbps` and
//! `inter_node_gbps` are **GB/s per GPU per direction** (gigabytes, not
//! gigabits): NVLink's aggregate bidirectional figure halved, and one NIC per
//! GPU (rail-optimised nodes) divided by 8 bits per byte.
//!
//! Sources (vendor data sheets):
//! - V100 SXM2 32GB: NVIDIA Tesla V100 data sheet: 125 TFLOPS tensor FP16,
//!   900 GB/s HBM2, NVLink 2.0 300 GB/s; DGX-1 with 4x100 Gb/s EDR IB per 8 GPUs
//!   (12.5 GB/s is one 100 Gb/s port per GPU, an upper bound).
//! - A100 SXM4 40GB / 80GB: NVIDIA A100 data sheet: 312 TFLOPS BF16 dense,
//!   1,555 GB/s (40GB) and 2,039 GB/s (80GB) HBM2e, NVLink 3 600 GB/s;
//!   DGX A100: 8 x 200 Gb/s HDR InfiniBand compute NICs (Selene, as used by
//!   Narayanan et al. 2021 §5).
//! - H100 SXM5 80GB: NVIDIA H100 data sheet: 989 TFLOPS BF16 dense, 3.35 TB/s
//!   HBM3, NVLink 4 900 GB/s; DGX H100: 8 x 400 Gb/s ConnectX-7 NICs.
//! - H200 SXM 141GB: NVIDIA H200 data sheet: same compute as H100 (989 dense
//!   BF16), 4.8 TB/s HBM3e, NVLink 900 GB/s; 400 Gb/s per GPU.
//! - B200 (HGX B200): 2.25 PFLOPS dense BF16 per GPU (4.5 PF with sparsity),
//!   180 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s; DGX B200: 8 x 400 Gb/s NICs.
//! - MI300X: AMD Instinct MI300X data sheet: 1,307.4 TFLOPS BF16 dense,
//!   192 GB HBM3 at 5.3 TB/s; 7 Infinity Fabric links x 64 GB/s per direction
//!   to the 7 peers (448 GB/s); 400 Gb/s NIC per GPU assumed.
//!
//! `gemm_eff` (the best fraction of peak a large BF16 GEMM reaches inside a
//! training step) is *calibrated* for A100 and H100 on published training
//! runs (`mofa-predict calibrate`, testdata/mofa-predict/measurements.jsonl);
//! H200 takes H100's value (same SM array); V100, B200 and MI300X have no
//! calibration rows here and use a stated guess (see README).
//!
//! `attn_tflops` is the achieved rate of the fused (flash) attention kernel,
//! forward and backward, in TFLOP/s of causal work. It is a kernel property,
//! not a fraction of the GEMM rate, and it is *not* fitted: H100/H200 take
//! FlashAttention-2's measured causal forward rate on H100 SXM5 at head dim
//! 128 and 8k-16k tokens, 333-335 TFLOP/s (Shah et al. 2024, FlashAttention-3,
//! arXiv 2407.08608, Fig. 5; FA-2 is what 2024 training runs such as Llama 3
//! used); the backward pass is assumed to run at the same rate. A100 takes 60%
//! of peak, inside the 50-73% FlashAttention-2 reports on A100 (Dao 2023,
//! arXiv 2307.08691, abstract); other GPUs take H100's fraction of peak
//! (0.34). FlashAttention-3 / cuDNN reach 600+ TFLOP/s on H100: set
//! `cluster.attn_tflops` for such runs.

use ftk::Result;

/// One GPU type and the network around it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Cluster {
    pub gpu: String,
    pub peak_tflops: f64,
    pub gpus: u64,
    pub gpus_per_node: u64,
    pub hbm_gb: f64,
    pub hbm_gbs: f64,
    pub intra_node_gbps: f64,
    pub inter_node_gbps: f64,
    pub gemm_eff: f64,
    pub attn_tflops: f64,
    /// Sustained tensor-core clock over the one `peak_tflops` assumes: below
    /// 1 when the GPU runs under a power limit lower than its rating
    /// (`cluster.power_w`, see [`power_clock`]).
    pub clock: f64,
}

/// Calibrated best-GEMM efficiencies (fraction of peak), from
/// `mofa-predict calibrate --fit` on every source of the corpus (see the README).
pub const A100_GEMM_EFF: f64 = 0.677;
pub const H100_GEMM_EFF: f64 = 0.655;
/// Not calibrated (no published run with a complete configuration in the
/// data set): assumed equal to H100's for Blackwell, lower for MI300X whose
/// BF16 GEMM libraries reached about half of peak in public 2024 benchmarks,
/// and A100's for V100.
/// FlashAttention-2 causal rate on H100 SXM5 (see the module comment).
pub const H100_ATTN_TFLOPS: f64 = 335.0;
/// Fraction of peak the flash-attention kernel reaches where no benchmark is
/// cited: H100's FA-2 figure over its peak.
pub const ATTN_PEAK_FRACTION: f64 = H100_ATTN_TFLOPS / 989.0;
pub const UNCALIBRATED_NOTE: &str = "V100, B200 and MI300X gemm_eff are assumptions, not fitted";

/// Preset names accepted by `--cluster` and `cluster.gpu`.
pub const PRESETS: &[&str] = &[
    "V100",
    "A100-40GB",
    "A100-80GB",
    "A100-PCIe-40GB",
    "A100-PCIe-80GB",
    "H100",
    "H100-PCIe",
    "H200",
    "B200",
    "MI300X",
];

/// The preset a GPU name means, as vendors and `nvidia-smi` spell them:
/// "NVIDIA H100 80GB HBM3", "H100-SXM5-80GB", "A100-SXM4-80GB",
/// "A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "AMD Instinct MI300X".
/// Case, punctuation and the words NVIDIA/AMD/Tesla/Instinct and memory
/// types do not matter; PCIe cards are their own presets (lower clocks and
/// power, HBM2e, no NVSwitch), never the SXM figures.
pub fn resolve(name: &str) -> Option<&'static str> {
    let up = name.to_ascii_uppercase();
    let toks: Vec<&str> = up
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let has = |w: &str| toks.contains(&w);
    let pcie = toks.iter().any(|t| t.starts_with("PCIE"));
    let nvl = has("NVL");
    // Memory size: a token like "80GB" (or "80" followed by "GB").
    let mut gb = None;
    for (i, t) in toks.iter().enumerate() {
        if let Some(n) = t.strip_suffix("GB") {
            gb = n.parse::<u32>().ok().or(gb);
        } else if toks.get(i + 1) == Some(&"GB") {
            gb = t.parse::<u32>().ok().or(gb);
        }
    }
    // The family token, also when glued to a suffix ("H100SXM5", "A10080GB").
    let fam = ["V100", "A100", "H100", "H200", "B200", "MI300X"]
        .into_iter()
        .find(|f| toks.iter().any(|t| t.starts_with(f)))?;
    let glued: String = toks.concat();
    let gb = gb.or_else(|| {
        let rest = &glued[glued.find(fam)? + fam.len()..];
        let d: String = rest.chars().take_while(char::is_ascii_digit).collect();
        d.parse().ok().filter(|_| rest[d.len()..].starts_with("GB"))
    });
    // Anything else after the family must be a known word, or the name is
    // some other part (an "A100X", a "H100 CNX") and must not silently get
    // a preset.
    let known = [
        "NVIDIA", "AMD", "TESLA", "INSTINCT", "SXM", "SXM2", "SXM4", "SXM5", "PCIE", "HBM2",
        "HBM2E", "HBM3", "HBM3E", "GB", "NVL", "OAM",
    ];
    for t in &toks {
        let ok = known.contains(t)
            || t.starts_with(fam)
                && t[fam.len()..]
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .trim_start_matches("GB")
                    .trim_start_matches("SXM")
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .is_empty()
            || t.strip_suffix("GB")
                .is_some_and(|n| n.parse::<u32>().is_ok())
            || t.parse::<u32>().is_ok()
            // A power-limit variant ("H100-SXM5-96GB-HBM2e-500W") is the
            // part; figures that differ are given with it.
            || t.strip_suffix('W').is_some_and(|n| n.parse::<u32>().is_ok());
        if !ok {
            return None;
        }
    }
    Some(match fam {
        "V100" => "V100",
        "A100" => match (pcie, gb) {
            (true, Some(40)) => "A100-PCIe-40GB",
            (true, _) => "A100-PCIe-80GB",
            (false, Some(40)) => "A100-40GB",
            _ => "A100-80GB",
        },
        "H100" if pcie || nvl => "H100-PCIe",
        "H100" => "H100",
        "H200" => "H200",
        "B200" => "B200",
        _ => "MI300X",
    })
}

/// The preset for `name` (see [`resolve`] for the spellings accepted).
pub fn preset(name: &str) -> Option<Cluster> {
    let gpu = resolve(name)?;
    // (peak, hbm GB, hbm GB/s, intra GB/s, inter GB/s per GPU per direction, gemm_eff)
    let (peak, hbm_gb, hbm_gbs, intra, inter, eff) = match gpu {
        "V100" => (125.0, 32.0, 900.0, 150.0, 12.5, A100_GEMM_EFF),
        "A100-40GB" => (312.0, 40.0, 1555.0, 300.0, 25.0, A100_GEMM_EFF),
        "A100-80GB" => (312.0, 80.0, 2039.0, 300.0, 25.0, A100_GEMM_EFF),
        // A100 PCIe data sheet: same 312 TFLOPS peak at a 250-300 W limit
        // (sustained clocks fall under load), 1,555 / 1,935 GB/s HBM2e;
        // GPUs talk over PCIe Gen4 x16 (32 GB/s per direction; the NVLink
        // bridge joins pairs only). One 200 Gb/s NIC per two GPUs assumed.
        "A100-PCIe-40GB" => (312.0, 40.0, 1555.0, 32.0, 12.5, PCIE_CLOCK * A100_GEMM_EFF),
        "A100-PCIe-80GB" => (312.0, 80.0, 1935.0, 32.0, 12.5, PCIE_CLOCK * A100_GEMM_EFF),
        "H100" => (989.0, 80.0, 3350.0, 450.0, 50.0, H100_GEMM_EFF),
        // H100 PCIe data sheet: 756 TFLOPS BF16 dense, 80 GB HBM2e at
        // 2,000 GB/s, PCIe Gen5 (64 GB/s per direction); 400 Gb/s per two GPUs.
        "H100-PCIe" => (756.0, 80.0, 2000.0, 64.0, 25.0, H100_GEMM_EFF),
        "H200" => (989.0, 141.0, 4800.0, 450.0, 50.0, H100_GEMM_EFF),
        "B200" => (2250.0, 180.0, 8000.0, 900.0, 50.0, H100_GEMM_EFF),
        _ => (1307.4, 192.0, 5300.0, 448.0, 50.0, 0.5),
    };
    let attn_tflops = match gpu {
        "H100" | "H200" => H100_ATTN_TFLOPS,
        g if g.starts_with("A100") => 0.6 * peak,
        _ => ATTN_PEAK_FRACTION * peak,
    };
    Some(Cluster {
        gpu: gpu.into(),
        peak_tflops: peak,
        gpus: 0,
        gpus_per_node: 8,
        hbm_gb,
        hbm_gbs,
        intra_node_gbps: intra,
        inter_node_gbps: inter,
        gemm_eff: eff,
        attn_tflops,
        clock: 1.0,
    })
}

/// The board power a preset's `peak_tflops` is rated at, watts (vendor data
/// sheets: V100 SXM2 300, A100 SXM4 400, A100 PCIe 250 (40GB) / 300 (80GB),
/// H100 SXM5 700, H100 PCIe 350, H200 SXM 700, B200 1000, MI300X 750).
pub fn rated_power_w(gpu: &str) -> Option<f64> {
    Some(match gpu {
        "V100" => 300.0,
        "A100-40GB" | "A100-80GB" => 400.0,
        "A100-PCIe-40GB" => 250.0,
        "A100-PCIe-80GB" => 300.0,
        "H100" | "H200" => 700.0,
        "H100-PCIe" => 350.0,
        "B200" => 1000.0,
        "MI300X" => 750.0,
        _ => return None,
    })
}

/// Sustained clock under a power limit, as a fraction of the rated clock:
/// dynamic power goes as f·V² and the voltage follows the clock along the
/// DVFS curve, so power goes as f³ and the clock as (limit/rating)^(1/3).
/// An assumption, not fitted; it gives 0.88 for an A100 PCIe's 275 W
/// against the SXM's 400 W, the [`PCIE_CLOCK`] figure. Memory bandwidth
/// keeps its clock.
pub fn power_clock(limit_w: f64, rated_w: f64) -> f64 {
    (limit_w / rated_w).min(1.0).cbrt()
}

/// A PCIe A100 holds its boost clock less under a 250-300 W cap than the
/// 400 W SXM part: NVIDIA's data sheet gives the same peak, and MLPerf
/// training results of PCIe systems run about 10% behind SXM per GPU on
/// GEMM-bound work. An assumption (no calibration rows).
pub const PCIE_CLOCK: f64 = 0.9;

/// The preset or an error listing the names.
pub fn preset_or_err(name: &str, what: &str) -> Result<Cluster> {
    preset(name).ok_or_else(|| {
        ftk::Error::input(format!(
            "{what}: unknown GPU '{name}'; presets are {} (or give peak_tflops, hbm_gb, hbm_gbs, intra_node_gbps, inter_node_gbps)",
            PRESETS.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_with_aliases() {
        for p in PRESETS {
            assert_eq!(preset(p).unwrap().gpu, *p);
        }
        assert_eq!(preset("H100 SXM").unwrap().peak_tflops, 989.0);
        assert_eq!(preset("a100").unwrap().hbm_gb, 80.0);
        assert!(preset("TPUv4").is_none());
        // What nvidia-smi, vendors and cloud consoles print.
        for (name, want) in [
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("H100-SXM5-80GB", "H100"),
            ("h100_sxm", "H100"),
            ("NVIDIA H100 PCIe", "H100-PCIe"),
            ("H100 NVL", "H100-PCIe"),
            ("A100-SXM4-80GB", "A100-80GB"),
            ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
            ("A100 40GB", "A100-40GB"),
            ("A100-PCIE-40GB", "A100-PCIe-40GB"),
            ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
            ("A100-80GB", "A100-80GB"),
            ("H200", "H200"),
            ("NVIDIA H200 141GB HBM3e", "H200"),
            ("MI300X", "MI300X"),
            ("AMD Instinct MI300X", "MI300X"),
            ("Tesla V100-SXM2-32GB", "V100"),
            ("B200", "B200"),
            ("H100-SXM5-96GB-HBM2e-500W", "H100"),
        ] {
            assert_eq!(resolve(name), Some(want), "{name}");
        }
        for other in ["A100X", "H100 CNX", "MI250X", "RTX 4090", "A10", "H20"] {
            assert_eq!(resolve(other), None, "{other}");
        }
        // PCIe parts are not the SXM figures.
        let (sxm, pcie) = (
            preset("A100-SXM4-80GB").unwrap(),
            preset("A100 80GB PCIe").unwrap(),
        );
        assert!(pcie.hbm_gbs < sxm.hbm_gbs && pcie.intra_node_gbps < sxm.intra_node_gbps);
        assert!(preset_or_err("TPUv4", "cluster.gpu")
            .unwrap_err()
            .to_string()
            .contains("cluster.gpu"));
    }
}
