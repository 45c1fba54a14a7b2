//! Helpers shared by the fed-aggregate integration tests.
#![allow(dead_code)]

use assert_cmd::Command;
use ftk::tensors::TensorFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fed-aggregate")
}

/// fed-aggregate, run in testdata/fed-aggregate (the manifests' paths are
/// relative to it).
pub fn cmd() -> Command {
    let mut c = ftk_test::tool("fed-aggregate");
    c.current_dir(data());
    c
}

/// Run with `args`, expect exit 0, return the summary line.
pub fn run_ok(args: &[&str]) -> serde_json::Value {
    let mut lines = ftk_test::run_ok(cmd().args(args), &format!("{args:?}"));
    assert_eq!(lines.len(), 1, "{args:?}: one summary line");
    lines.remove(0)
}

/// Run with `args`, expect exit 2 with a one-line error containing every
/// needle; return the message.
pub fn run_bad(args: &[&str], needles: &[&str]) -> String {
    let o = cmd().args(args).output().unwrap();
    ftk_test::assert_error("fed-aggregate", &o, 2, needles);
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every tensor of a file, decoded to f64, by name.
pub fn load(p: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let f = TensorFile::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut out = BTreeMap::new();
    for n in f.names() {
        let t = f.get(&n).unwrap();
        let mut v = vec![0.0; t.numel()];
        fed_aggregate::cpu::decode(t.dtype, t.data, 0, &mut v);
        out.insert(n.clone(), (t.shape.to_vec(), v));
    }
    out
}

pub fn dtypes(p: &Path) -> BTreeMap<String, String> {
    let f = TensorFile::open(p).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let d = format!("{:?}", f.get(&n).unwrap().dtype);
            (n, d)
        })
        .collect()
}

/// |got - want| <= rel * max(|want|, floor), floor = the tensor's mean |want|
/// (so elements that cancel to near zero are judged on the tensor's scale).
/// Returns the worst relative error seen.
pub fn assert_close(case: &str, got: &Path, want: &Path, rel: f64) -> f64 {
    let (g, w) = (load(got), load(want));
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{case}: tensor names differ"
    );
    let mut worst = 0.0f64;
    for (name, (ws, wv)) in &w {
        let (gs, gv) = &g[name];
        assert_eq!(gs, ws, "{case}: shape of '{name}'");
        let floor = if wv.is_empty() {
            0.0
        } else {
            wv.iter().map(|x| x.abs()).sum::<f64>() / wv.len() as f64
        };
        for (k, (a, b)) in gv.iter().zip(wv).enumerate() {
            let scale = b.abs().max(floor).max(f64::MIN_POSITIVE);
            let e = (a - b).abs() / scale;
            worst = worst.max(e);
            assert!(
                e <= rel,
                "{case}: '{name}'[{k}] = {a}, Flower {b} (rel {e:.3e} > {rel:e})"
            );
        }
    }
    worst
}

pub fn write_manifest(dir: &Path, name: &str, rows: &[(&str, &Path, u64)]) -> PathBuf {
    let p = dir.join(name);
    let s: String = rows
        .iter()
        .map(|(cid, path, n)| {
            format!(
                "{{\"kind\":\"client_update\",\"cid\":\"{cid}\",\"path\":\"{}\",\"num_examples\":{n}}}\n",
                path.display()
            )
        })
        .collect();
    std::fs::write(&p, s).unwrap();
    p
}
