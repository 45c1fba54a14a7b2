//! MACT's flags (MemFine's memory-aware chunk tuning), shared by mem-plan
//! and chunk-run: one declaration, flattened into both CLIs.

use crate::size::parse_size;
use crate::Result;

/// Device budget and chunk bins for MACT.
#[derive(clap::Args, Debug, Clone)]
pub struct MactArgs {
    /// Device memory, e.g. 24GiB or 80GB; MACT sizes chunks to α times it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub device_mem: Option<u64>,
    /// Usable fraction α of device memory, in (0, 1].
    #[arg(long, value_name = "α", default_value_t = 0.9)]
    pub alpha: f64,
    /// MACT's chunk bins, ascending: C is rounded up to one of them.
    #[arg(
        long,
        value_name = "C,..",
        value_delimiter = ',',
        default_value = "1,2,4,8"
    )]
    pub chunk_bins: Vec<u64>,
}

impl MactArgs {
    /// `--alpha` in (0, 1] and ascending positive `--chunk-bins`.
    pub fn check(&self) -> Result<()> {
        let alpha = self.alpha;
        if !(alpha > 0.0 && alpha <= 1.0) {
            crate::bail!("--alpha must be in (0, 1], got {alpha}");
        }
        let bins = &self.chunk_bins;
        if bins.is_empty() || bins.contains(&0) || bins.windows(2).any(|w| w[0] >= w[1]) {
            crate::bail!("--chunk-bins must be ascending positive integers, e.g. 1,2,4,8");
        }
        Ok(())
    }

    /// α × device memory in bytes, when a device memory is given.
    pub fn budget(&self) -> Option<f64> {
        self.device_mem.map(|d| d as f64 * self.alpha)
    }
}

/// Eq. (9) plus MACT's bins: c = ceil(s'' / s'_max), then the smallest bin
/// >= c ("the large bin closest to c"). `None` when no bin is large enough.
pub fn chunks(s_recv: f64, s_max: f64, bins: &[u64]) -> Option<u64> {
    if s_recv <= 0.0 {
        return bins.first().copied();
    }
    if s_max <= 0.0 {
        return None;
    }
    let c = (s_recv / s_max).ceil().max(1.0);
    bins.iter().copied().find(|&b| b as f64 >= c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mact: MactArgs,
    }

    #[test]
    fn rounds_up_to_a_bin() {
        let bins = [1, 2, 4, 8];
        assert_eq!(chunks(100.0, 100.0, &bins), Some(1));
        assert_eq!(chunks(101.0, 100.0, &bins), Some(2));
        assert_eq!(chunks(301.0, 100.0, &bins), Some(4));
        assert_eq!(chunks(801.0, 100.0, &bins), None);
        assert_eq!(chunks(1.0, -5.0, &bins), None);
    }

    #[test]
    fn parses_and_checks() {
        let c = Cli::parse_from(["x", "--device-mem", "1KiB", "--alpha", "0.5"]);
        assert_eq!(c.mact.budget(), Some(512.0));
        assert_eq!(c.mact.chunk_bins, vec![1, 2, 4, 8]);
        c.mact.check().unwrap();
        for bad in [
            ["--alpha", "0"],
            ["--alpha", "1.5"],
            ["--chunk-bins", "2,1"],
            ["--chunk-bins", "0,1"],
        ] {
            let c = Cli::parse_from(["x", bad[0], bad[1]]);
            assert!(c.mact.check().is_err(), "{bad:?}");
        }
    }
}
