//! Support for the cross-tool checks in `tests/`: where the tool binaries
//! and the test data are, and how to run a tool and see what it left.
//!
//! The binaries are the workspace's own (`cargo test --workspace` builds
//! them; for `cargo test -p ftk-checks` run `cargo build --workspace` first,
//! with `--release` for the release tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every ftk tool.
pub const TOOLS: [&str; 7] = [
    "route-hist",
    "mem-plan",
    "chunk-run",
    "mofa-predict",
    "fed-aggregate",
    "fed-embed",
    "diffuse-synth",
];

/// The directory holding the tool binaries of the running profile
/// (target/debug or target/release): the test executable lives in its deps/.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    for t in TOOLS {
        assert!(
            dir.join(t).exists(),
            "{} is missing: build the tools first (cargo build --workspace, same profile)",
            dir.join(t).display()
        );
    }
    dir
}

/// The repository's testdata/ (absolute).
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .canonicalize()
        .expect("testdata/")
}

/// Every file under `dir` (recursively, symlinks not followed) with its
/// length, mode and content digest: what a run may not change.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, u32, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_path_buf();
            if m.is_dir() {
                out.insert(rel, (0, m.permissions().mode(), "dir".into()));
                stack.push(p);
            } else if m.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_default();
                out.insert(
                    rel,
                    (
                        m.len(),
                        m.permissions().mode(),
                        ftk::tensors::digest(&bytes),
                    ),
                );
            } else {
                out.insert(rel, (0, m.permissions().mode(), "other".into()));
            }
        }
    }
    out
}

/// Names of `.ftk-tmp*` files left in `dir`.
pub fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".ftk-tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// PATH with the tool binaries first.
pub fn path_env() -> String {
    format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}
