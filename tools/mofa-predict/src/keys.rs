//! Unknown-key rejection with a "did you mean": a misspelt field (`vp=2`
//! for `vpp`, `recomp=full`) must not be dropped silently, because the
//! default it leaves in place changes the answer.

pub use ftk::suggest::{distance, suggest};

/// "unknown key 'vp'; did you mean 'vpp'?" or the list of known keys.
pub fn unknown(word: &str, candidates: &[&str]) -> String {
    match suggest(word, candidates) {
        Some(s) => format!("unknown key '{word}'; did you mean '{s}'?"),
        None => format!(
            "unknown key '{word}'; known keys: {}",
            candidates.join(", ")
        ),
    }
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
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert!(unknown("banana", &strat).contains("known keys: tp"));
    }
}
