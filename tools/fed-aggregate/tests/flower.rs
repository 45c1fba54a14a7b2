//! Every strategy against Flower's own `aggregate_fit` output (and FedRA
//! against a numpy port of the public code), from
//! testdata/gen/fed_aggregate_ref.py. Stateful strategies run their rounds
//! chained through ftk's own outputs and state file.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;

fn cases() -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("cases.json")).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn every_strategy_matches_flower() {
    let cases = cases();
    let names: BTreeSet<&str> = cases
        .iter()
        .map(|c| c["strategy"].as_str().unwrap())
        .collect();
    for s in [
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "fedra",
    ] {
        assert!(names.contains(s), "no Flower case for {s}");
    }
    let tmp = tempfile::tempdir().unwrap();
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let flags: Vec<String> = c["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        let state = tmp.path().join(format!("{name}.state.safetensors"));
        let mut prev: Option<std::path::PathBuf> = None;
        for (r, round) in c["rounds"].as_array().unwrap().iter().enumerate() {
            let out = tmp.path().join(format!("{name}_r{}.safetensors", r + 1));
            let mut cmd = cmd();
            cmd.args(["--strategy", c["strategy"].as_str().unwrap()])
                .args(&flags);
            match (&prev, c["global"].as_str()) {
                (Some(p), _) => {
                    cmd.arg("--global").arg(p);
                }
                (None, Some(g)) => {
                    cmd.args(["--global", g]);
                }
                _ => {}
            }
            if c["state"].as_bool().unwrap() {
                cmd.arg("--state").arg(&state);
                if r == 0 {
                    cmd.arg("--init-state");
                }
            }
            cmd.arg("-o")
                .arg(&out)
                .arg(round["manifest"].as_str().unwrap());
            let o = cmd.output().unwrap();
            assert!(
                o.status.success(),
                "{name} round {}: {}",
                r + 1,
                String::from_utf8_lossy(&o.stderr)
            );
            let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(summary["kind"], "aggregate");
            if c["state"].as_bool().unwrap() {
                assert_eq!(summary["round"], r as u64 + 1, "{name}: round counter");
            }
            let want = data().join(round["expected"].as_str().unwrap());
            let worst = assert_close(&format!("{name} r{}", r + 1), &out, &want, 1e-6);
            eprintln!("{name} round {}: worst rel {worst:.2e}", r + 1);
            prev = Some(out);
        }
    }
}

#[test]
fn output_keeps_client_dtypes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    cmd()
        .args(["--strategy", "fedavg", "-o"])
        .arg(&out)
        .arg("m_int.jsonl")
        .assert()
        .success();
    let d = dtypes(&out);
    assert_eq!(d["step"], "I64");
    assert_eq!(d["head.weight"], "F32");
}
