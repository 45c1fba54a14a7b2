//! "Did you mean": the closest known word to a mistyped one (a strategy
//! key, a subcommand), so that a typo is an error that names the fix rather
//! than a silently dropped setting or a file "not found".

/// Edit distance (insertions, deletions, substitutions, adjacent swaps).
pub fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, x) in d[0].iter_mut().enumerate() {
        *x = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let sub = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + sub);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The closest candidate, if it is plausibly what was meant: within a third
/// of the word's length (at least 1, at most 3 edits), or a prefix of it
/// (`recomp` → `recompute`).
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    let limit = (w.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (distance(&w, c), *c))
        .filter(|(d, c)| *d <= limit || (w.len() >= 2 && c.starts_with(w.as_str())))
        // Ties go to a candidate the word begins (`vp` → `vpp`, not `tp`).
        .min_by_key(|(d, c)| (*d, !c.starts_with(w.as_str())))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let strat = ["tp", "pp", "vpp", "mbs", "gbs", "recompute", "zero"];
        assert_eq!(suggest("vp", &strat), Some("vpp"));
        assert_eq!(suggest("recomp", &strat), Some("recompute"));
        assert_eq!(suggest("recompte", &strat), Some("recompute"));
        assert_eq!(suggest("zreo", &strat), Some("zero"));
        assert_eq!(suggest("banana", &strat), None);
        assert_eq!(suggest("merg", &["merge", "fedra-alloc"]), Some("merge"));
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
    }
}
