//! What the ftk tools' integration tests share: running a tool's binary
//! quietly, reading its JSON lines, checking a one-line error, reading
//! tensors back, and checking a `--help` field list against its record
//! struct. A dev-dependency only; nothing here ships in a binary.

use assert_cmd::Command;
use ftk::records::Record;
use ftk::tensors::TensorFile;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// `testdata/<sub>` of the workspace.
pub fn testdata(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(sub)
}

/// The tool's binary with progress bars and backtraces off.
pub fn tool(name: &str) -> Command {
    let mut c = Command::cargo_bin(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    c.env("FTK_NO_PROGRESS", "1").env_remove("RUST_BACKTRACE");
    c
}

/// Every line of `stdout` as JSON.
pub fn json_lines(stdout: &[u8]) -> Vec<Value> {
    std::str::from_utf8(stdout)
        .expect("stdout is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect()
}

/// Run `c`; fail the test with its stderr unless it exits 0.
pub fn output_ok(c: &mut Command, what: &str) -> Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{what}: exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Run `c`, expect exit 0, return its JSON lines.
pub fn run_ok(c: &mut Command, what: &str) -> Vec<Value> {
    json_lines(&output_ok(c, what).stdout)
}

/// Run `c` whatever its exit: (code, JSON lines, stderr).
pub fn run_any(c: &mut Command) -> (Option<i32>, Vec<Value>, String) {
    let o = c.output().unwrap();
    (
        o.status.code(),
        json_lines(&o.stdout),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Expect `tool: error: ...` on one stderr line containing every needle,
/// exit `code`, no panic, nothing on stdout.
pub fn assert_error(tool: &str, o: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(o.stdout.is_empty(), "stdout not empty: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with(&format!("{tool}: error: ")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected '{n}' in: {err}");
    }
}

/// Every tensor of a safetensors file as f32, by name.
pub fn tensors_f32(p: &Path) -> BTreeMap<String, Vec<f32>> {
    let f = TensorFile::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    f.names()
        .into_iter()
        .map(|n| {
            let v = f.require(&n).unwrap().to_f32_vec().unwrap();
            (n, v)
        })
        .collect()
}

/// max |a − b| / max |b| over one tensor, the scale floored at `floor`.
pub fn rel_err(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let scale = b
        .iter()
        .map(|x| f64::from(x.abs()))
        .fold(0.0, f64::max)
        .max(floor);
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
        / scale
}

/// The field list `help` documents for `R` equals `R`'s fields in order,
/// or, when the list ends in `...`, is an in-order subset of them. `kind`
/// is left out of the comparison: the help writes it first, the struct has
/// it where the output has it.
pub fn assert_documented<R: Record>(help: &str) {
    let fields: Vec<&str> = ftk::records::fields::<R>()
        .iter()
        .copied()
        .filter(|&f| f != "kind")
        .collect();
    let Some((doc, elided)) = ftk::records::documented_fields(help, R::KIND) else {
        panic!("the help documents no {{\"kind\":\"{}\",...}}", R::KIND);
    };
    let doc: Vec<&str> = doc
        .iter()
        .map(String::as_str)
        .filter(|&f| f != "kind")
        .collect();
    if elided {
        let mut rest = fields.iter();
        for d in &doc {
            assert!(
                rest.any(|f| f == d),
                "{}: documented field '{d}' is not in {fields:?} (or out of order)",
                R::KIND
            );
        }
    } else {
        assert_eq!(doc, fields, "{}: documented fields vs the struct", R::KIND);
    }
}

/// `tool --help` (or `tool <sub> --help`) as text.
pub fn help(tool_name: &str, sub: &[&str]) -> String {
    let o = output_ok(tool(tool_name).args(sub).arg("--help"), "--help");
    String::from_utf8(o.stdout).unwrap()
}
