//! Embeds the published measurements (testdata/mofa-predict/measurements.jsonl
//! and every testdata/mofa-predict/corpus/*.jsonl) so `mofa-predict calibrate`
//! works from any directory.
use std::path::Path;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let data = Path::new(&manifest).join("../../testdata/mofa-predict");
    let mut files = vec![];
    let legacy = data.join("measurements.jsonl");
    if legacy.is_file() {
        files.push(("measurements.jsonl".to_string(), legacy));
    }
    let corpus = data.join("corpus");
    println!("cargo:rerun-if-changed={}", data.display());
    println!("cargo:rerun-if-changed={}", corpus.display());
    if let Ok(rd) = std::fs::read_dir(&corpus) {
        let mut c: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        c.sort();
        for p in c {
            let name = format!("corpus/{}", p.file_name().unwrap().to_string_lossy());
            files.push((name, p));
        }
    }
    let mut out = String::from("&[\n");
    for (name, p) in &files {
        let abs = p.canonicalize().expect("corpus file readable");
        println!("cargo:rerun-if-changed={}", abs.display());
        out.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            abs.display().to_string()
        ));
    }
    out.push(']');
    let dest = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("corpus.rs");
    std::fs::write(dest, out).expect("OUT_DIR writable");
}
