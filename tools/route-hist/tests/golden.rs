//! route-hist against the independent numpy reference in
//! testdata/gen/route_hist_ref.py (outputs checked in under testdata/route-hist).

use assert_cmd::Command;
use serde_json::Value;
use std::path::PathBuf;

fn data() -> PathBuf {
    ftk_test::testdata("route-hist")
}

fn cmd() -> Command {
    let mut c = ftk_test::tool("route-hist");
    c.current_dir(data());
    c
}

fn lines(s: &[u8]) -> Vec<Value> {
    ftk_test::json_lines(s)
}

fn assert_same(case: &str, got: &Value, want: &Value) {
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    let gk: Vec<_> = g.keys().collect();
    let wk: Vec<_> = w.keys().collect();
    assert_eq!(gk, wk, "{case}: fields differ");
    for (k, wv) in w {
        let gv = &g[k];
        if k == "max_vio" {
            let (a, b) = (gv.as_f64().unwrap(), wv.as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "{case}: max_vio {a} vs {b}"
            );
        } else {
            assert_eq!(
                gv, wv,
                "{case}: field {k} of layer {} step {}",
                w["layer"], w["step"]
            );
        }
    }
}

#[test]
fn matches_numpy_reference_on_every_case() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "expected the full case list");
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let flags: Vec<&str> = c["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let out = cmd()
            .args(&flags)
            .arg(c["input"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = lines(&std::fs::read(data().join(c["expected"].as_str().unwrap())).unwrap());
        let got = lines(&out.stdout);
        assert_eq!(got.len(), want.len(), "{name}: record count");
        for (g, w) in got.iter().zip(&want) {
            assert_same(name, g, w);
        }
    }
}

#[test]
fn jsonl_from_stdin_equals_file() {
    let file = cmd()
        .args(["--experts", "16", "--ep", "4", "trace.jsonl"])
        .output()
        .unwrap();
    let stdin = cmd()
        .args(["--experts", "16", "--ep", "4"])
        .pipe_stdin(data().join("trace.jsonl"))
        .unwrap()
        .output()
        .unwrap();
    assert!(file.status.success());
    assert_eq!(file.stdout, stdin.stdout);
}

#[test]
fn bad_inputs_exit_2_with_one_line_naming_the_file() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("bad/cases.json")).unwrap())
            .unwrap();
    for c in cases["cases"].as_array().unwrap() {
        let file = c["file"].as_str().unwrap();
        let flags: Vec<&str> = c["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let out = cmd().args(&flags).arg(file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert_eq!(err.lines().count(), 1, "{file}: {err}");
        assert!(err.starts_with("route-hist: error: "), "{file}: {err}");
        assert!(err.contains(file), "{file} not named: {err}");
        assert!(!err.contains("panicked"), "{file}: {err}");
    }
}

#[test]
fn model_config_supplies_experts_and_topk() {
    let cfg = data().join("../configs/mixtral-8x7b/config.json");
    let a = cmd()
        .args(["--ep", "2"])
        .arg("--model")
        .arg(&cfg)
        .arg("logits_f32_e8_k2.safetensors")
        .output()
        .unwrap();
    let b = cmd()
        .args(["--ep", "2", "--topk", "2", "logits_f32_e8_k2.safetensors"])
        .output()
        .unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    // A dense model has nothing to route.
    let gpt2 = data().join("../configs/gpt2/config.json");
    cmd()
        .arg("--model")
        .arg(gpt2)
        .arg("trace.jsonl")
        .assert()
        .code(2);
}

#[test]
fn out_of_order_steps_need_unordered() {
    let text = std::fs::read_to_string(data().join("trace.jsonl")).unwrap();
    let mut ls: Vec<&str> = text.lines().collect();
    ls.reverse(); // step 1 records now come first
    let rev = ls.join("\n");
    let out = cmd()
        .args(["--experts", "16"])
        .write_stdin(rev.clone())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--unordered"));
    let fixed = cmd()
        .args(["--experts", "16", "--unordered"])
        .write_stdin(rev)
        .output()
        .unwrap();
    let sorted = cmd()
        .args(["--experts", "16", "trace.jsonl"])
        .output()
        .unwrap();
    assert!(fixed.status.success());
    assert_eq!(fixed.stdout, sorted.stdout);
}

#[test]
fn ordered_mode_streams_each_step_before_reading_the_next() {
    // Feed step 0, read its records back, and only then send step 1: if the
    // tool buffered the whole input, the read would block forever.
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command as P, Stdio};
    let mut child = P::new(assert_cmd::cargo::cargo_bin("route-hist"))
        .args(["--experts", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    writeln!(
        stdin,
        r#"{{"kind":"route","layer":0,"step":0,"rank":0,"topk":[[0,1]]}}"#
    )
    .unwrap();
    writeln!(
        stdin,
        r#"{{"kind":"route","layer":0,"step":1,"rank":0,"topk":[[2,3]]}}"#
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains("\"step\":0") && line.contains("\"counts\":[1,1,0,0]"),
        "{line}"
    );
    drop(stdin);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("\"step\":1"), "{line}");
    assert!(child.wait().unwrap().success());
}

#[test]
fn broken_pipe_is_quiet_success() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command as P, Stdio};
    let mut child = P::new(assert_cmd::cargo::cargo_bin("route-hist"))
        .args([
            "--synthetic",
            "uniform",
            "--tokens",
            "64",
            "--experts",
            "8",
            "--topk",
            "2",
            "--layers",
            "50",
            "--steps",
            "400",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    drop(out);
    let res = child.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(0));
    assert!(
        res.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn help_shows_examples_and_fields() {
    let h = ftk_test::help("route-hist", &[]);
    assert!(h.contains("Examples:") && h.contains("--synthetic zipf"));
    // The field lists it prints are the record structs' own.
    ftk_test::assert_documented::<ftk::records::RouteHist>(&h);
    ftk_test::assert_documented::<ftk::records::Route>(&h);
}

#[test]
fn jsonl_field_order_unknown_fields_and_other_kinds() {
    let input = r#"{"kind":"note","topk":"not a trace","extra":{"a":[1,2]}}
{"topk":[[0,1],[1,2]],"rank":0,"step":0,"layer":0,"kind":"route","meta":{"x":[null]}}
{"kind":null}

{"kind":"route","layer":0,"step":0,"rank":1,"topk":[[3,2]],"tokens_dropped":0}
"#;
    let out = ftk_test::output_ok(
        cmd()
            .args(["--experts", "4", "--ep", "2"])
            .write_stdin(input),
        "route-hist",
    );
    let recs = lines(&out.stdout);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["counts"], serde_json::json!([1, 2, 2, 1]));
    assert_eq!(recs[0]["tokens"], 3);
    assert_eq!(recs[0]["a2a"], serde_json::json!([[3, 1], [0, 2]]));
    // A bad id names the line, row and value.
    let bad = "{\"kind\":\"route\",\"layer\":0,\"step\":0,\"rank\":0,\"topk\":[[0,1]]}\n{\"kind\":\"route\",\"layer\":0,\"step\":0,\"rank\":0,\"topk\":[[0,1],[4,0]]}\n";
    let out = cmd()
        .args(["--experts", "4"])
        .write_stdin(bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("<stdin>: line 2") && err.contains("row 1 names expert 4"),
        "{err}"
    );
}
