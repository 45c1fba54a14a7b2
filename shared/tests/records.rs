//! Every record kind in `ftk::records` against a real line of it:
//! testdata/records/*.jsonl hold one line per kind as the tools wrote them,
//! with every optional field present (the chunk_run line, from a CPU run,
//! has the CUDA-only device_reserved_bytes added; fed_aggregate.jsonl's
//! aggregate line joins the fields of a DP run, a --skip-bad run, a
//! multikrum run and a merge, which no single run has at once). Decoding a line into its
//! struct and encoding it again must give the same fields in the same order
//! with the same values (floats to the last digit serde_json's default
//! parser keeps), and the line must
//! carry exactly the struct's fields, so a field added, renamed or
//! reordered in a struct shows up here before it changes any tool's output.

use ftk::records::{self, Record};
use std::collections::BTreeMap;

/// Every line of every `testdata/records/*.jsonl`, by kind.
fn examples() -> BTreeMap<String, String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/records");
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let kind = v["kind"].as_str().unwrap().to_string();
            let again = out.insert(kind.clone(), l.to_string());
            assert!(again.is_none(), "two examples of {kind}");
        }
    }
    out
}

/// Every `"name":` in a JSON line, in order (nested objects' keys too).
fn keys_in_order(line: &str) -> Vec<&str> {
    line.match_indices("\":")
        .map(|(end, _)| {
            let start = line[..end].rfind('"').unwrap();
            &line[start + 1..end]
        })
        .collect()
}

/// Numbers compared to 1e-15 relative (serde_json's default float parsing
/// may move the last digit), everything else exactly.
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Object(x), Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn check<R: Record>(ex: &BTreeMap<String, String>) -> &'static str {
    let line = ex
        .get(R::KIND)
        .unwrap_or_else(|| panic!("no example of {}", R::KIND));
    let r: R = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}", R::KIND));
    let again = serde_json::to_string(&r).unwrap();
    let kind = R::KIND;
    assert_eq!(
        keys_in_order(&again),
        keys_in_order(line),
        "{kind}: field order"
    );
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&again).unwrap(),
        serde_json::from_str(line).unwrap(),
    );
    assert!(same(&a, &b), "{kind} round trip:\n{again}\n{line}");
    let r2: R = serde_json::from_str(&again).unwrap();
    assert_eq!(
        serde_json::to_string(&r2).unwrap(),
        again,
        "{kind}: a second round trip"
    );
    let mut have: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = records::fields::<R>().to_vec();
    have.sort_unstable();
    want.sort_unstable();
    assert_eq!(have, want, "{kind}: the example lacks or adds fields");
    R::KIND
}

#[test]
fn every_kind_round_trips_with_all_its_fields_in_order() {
    use records::*;
    let ex = examples();
    let checked = [
        check::<Route>(&ex),
        check::<RouteHist>(&ex),
        check::<MemPlan>(&ex),
        check::<MemPlanSummary>(&ex),
        check::<ChunkRun>(&ex),
        check::<FedEmbedSubspace>(&ex),
        check::<FedEmbedD3aWeights>(&ex),
        check::<FedEmbedEnsemble>(&ex),
        check::<FedEmbedPrototypes>(&ex),
        check::<FedEmbedPseudoLabel>(&ex),
        check::<FedEmbedCluster>(&ex),
        check::<FedEmbedNoise>(&ex),
        check::<FedEmbedKeys>(&ex),
        check::<FedEmbedAdaptWeights>(&ex),
        check::<FedEmbedPromptSample>(&ex),
        check::<ClientUpdate>(&ex),
        check::<FedraAlloc>(&ex),
        check::<Aggregate>(&ex),
        check::<DiffuseSynthSample>(&ex),
        check::<DiffuseSynthDescription>(&ex),
        check::<MofaPredict>(&ex),
        check::<MofaTune>(&ex),
        check::<MofaTuneSummary>(&ex),
        check::<MofaCalibRow>(&ex),
        check::<MofaCalibrate>(&ex),
    ];
    let mut all = all_kinds();
    let mut seen = checked.to_vec();
    all.sort_unstable();
    seen.sort_unstable();
    assert_eq!(seen, all, "a kind without a check here");
    assert_eq!(
        ex.len(),
        all_kinds().len(),
        "examples of kinds ftk does not define"
    );
}

#[test]
fn a_line_of_another_kind_does_not_decode() {
    let ex = examples();
    assert!(serde_json::from_str::<records::MemPlan>(&ex["route_hist"]).is_err());
}

#[test]
fn a_client_update_names_the_client_and_the_field() {
    let bad = [
        (
            r#"{"kind":"client_update","path":"x","num_examples":1}"#,
            "\"cid\"",
        ),
        (
            r#"{"kind":"client_update","cid":7,"num_examples":1}"#,
            "client '7' has no \"path\"",
        ),
        (
            r#"{"kind":"client_update","cid":"a","path":"x","num_examples":-1}"#,
            "client 'a' needs \"num_examples\" as a non-negative number, got -1",
        ),
        (
            r#"{"kind":"client_update","cid":"a","path":"x"}"#,
            "got nothing",
        ),
    ];
    for (line, want) in bad {
        let e = serde_json::from_str::<records::ClientUpdate>(line)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
    let ok: records::ClientUpdate =
        serde_json::from_str(r#"{"kind":"client_update","cid":7,"path":"x","num_examples":2.5}"#)
            .unwrap();
    assert_eq!((ok.cid.as_str(), ok.num_examples), ("7", 2.5));
}
