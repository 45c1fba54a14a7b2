//! Unknown-key rejection with a "did you mean": a misspelt field (`vp=2`
//! for `vpp`, `recomp=full`) must not be dropped silently, because the
//! default it leaves in place changes the answer.

pub use ftk::suggest::suggest;

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
    fn unknown_key_messages() {
        let strat = ["tp", "pp", "vpp", "mbs", "gbs", "recompute", "zero"];
        assert_eq!(
            unknown("vp", &strat),
            "unknown key 'vp'; did you mean 'vpp'?"
        );
        assert!(unknown("banana", &strat).contains("known keys: tp, pp, vpp"));
    }
}
