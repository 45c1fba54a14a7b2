//! Byte sizes as people write them: `24GiB`, `80GB`, `1.5T`, `4096`.

use crate::error::{Error, Result};

/// Parse a size. Decimal units (KB, MB, GB, TB) are powers of 1000, binary
/// units (KiB, MiB, GiB, TiB) powers of 1024; a bare K/M/G/T is binary, as
/// in Slurm's `--mem`. Units are case-insensitive; a plain number is bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: String = num.chars().filter(|c| *c != '_').collect();
    let bad = || {
        Error::input(format!(
            "invalid size {s:?}: expected a number with an optional unit \
             (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; K/M/G/T mean KiB..TiB), e.g. 24GiB or 80GB"
        ))
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        _ => return Err(bad()),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// The machine's memory in bytes (`MemTotal` from /proc/meminfo), read once;
/// `None` where it cannot be read.
pub fn machine_memory() -> Option<u64> {
    static MEM: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MEM.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// The product of `factors` (element counts and the element size), or `None`
/// when it overflows 64 bits.
pub fn product(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |a, &b| a.checked_mul(b))
}

/// Refuse before allocating: `bytes` (`None`: beyond 64 bits) must fit in
/// the machine's memory. `what` names the allocation and the flags behind it.
pub fn check_memory(what: &str, bytes: Option<u64>) -> Result<()> {
    let have = machine_memory();
    let fits = match (bytes, have) {
        (Some(b), Some(h)) => b <= h,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if fits {
        return Ok(());
    }
    let need = match bytes {
        Some(b) => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        None => "more than 16 EiB".to_string(),
    };
    let has = have.map_or("less".to_string(), |h| {
        format!("{:.1} GiB", h as f64 / (1u64 << 30) as f64)
    });
    Err(Error::input(format!(
        "{what} needs {need}, the machine has {has}; lower the sizes"
    )))
}

/// Human form with a binary unit, e.g. `23.40 GiB`.
pub fn format_bytes(b: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_checks_refuse_overflow_and_oversize() {
        assert!(machine_memory().unwrap() > 1 << 20);
        assert!(check_memory("x", Some(1024)).is_ok());
        let e = check_memory("--layers 1000000000", product(&[1 << 40, 1 << 30]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs more than 16 EiB, the machine has"), "{e}");
        let e = check_memory("t", Some(u64::MAX)).unwrap_err().to_string();
        assert!(e.contains("GiB, the machine has"), "{e}");
    }

    #[test]
    fn units() {
        assert_eq!(parse_size("24GiB").unwrap(), 24 * (1 << 30));
        assert_eq!(parse_size("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("80gb").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 TiB ").unwrap(), 2 << 40);
        for bad in ["", "GB", "12XB", "-1GB", "1.2.3GB", "nan"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0 * 1024.0 * 1024.0), "1.50 GiB");
    }
}
