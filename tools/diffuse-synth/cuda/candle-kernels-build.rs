// build.rs of candle-kernels 0.11.1 as ftk builds it (tools/diffuse-synth/cuda/build.sh):
// only the PTX modules candle's CUDA backend loads at run time. Upstream's build.rs also
// compiles the GGUF MoE/MMQ kernels into a static library and links libcudart and
// libstdc++ for them; ftk runs no quantized model, and a binary that needs libcudart to
// start could not fall back to the CPU on a machine without CUDA.
use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let bindings = KernelBuilder::new()
        .source_dir("src")
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"])
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;
    bindings.write(out_dir.join("ptx.rs"))?;
    Ok(())
}
