//! The CUDA kernels in `kernels/*.cu`, embedded in the binary and compiled
//! once per process with NVRTC (cached), as candle does with its PTX.
//! NVRTC needs no GPU: CI compiles every kernel with the
//! `nvidia-cuda-nvrtc-cu12` wheel's libnvrtc to catch broken sources.

use crate::error::{Error, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// (module name, CUDA C source) for every file in kernels/.
pub const SOURCES: &[(&str, &str)] = &[
    ("route_hist", include_str!("../../kernels/route_hist.cu")),
    (
        "fed_aggregate",
        include_str!("../../kernels/fed_aggregate.cu"),
    ),
    ("moe", include_str!("../../kernels/moe.cu")),
];

/// Whether libnvrtc can be loaded (set LD_LIBRARY_PATH to its directory).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn describe(name: &str, e: CompileError) -> Error {
    match e {
        CompileError::CompileError { log, .. } => Error::internal(format!(
            "kernel {name}.cu does not compile:\n{}",
            log.to_string_lossy()
        )),
        other => Error::device(format!("kernel {name}.cu: NVRTC failed: {other:?}")),
    }
}

/// PTX of module `name`, compiled on first use and cached for the process.
pub fn ptx(name: &str) -> Result<Arc<Ptx>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Ptx>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().expect("kernel cache lock").get(name) {
        return Ok(p.clone());
    }
    let src = SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::internal(format!("no kernel module named '{name}'")))?;
    if !nvrtc_available() {
        return Err(Error::device(format!(
            "kernel {name}: libnvrtc is not loadable (install the CUDA runtime or the nvidia-cuda-nvrtc-cu12 wheel and add its lib directory to LD_LIBRARY_PATH)"
        )));
    }
    let opts = CompileOptions {
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx =
        Arc::new(cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| describe(name, e))?);
    cache
        .lock()
        .expect("kernel cache lock")
        .insert(name.to_string(), ptx.clone());
    Ok(ptx)
}

/// Compile every kernel module; the names of those compiled.
pub fn compile_all() -> Result<Vec<&'static str>> {
    SOURCES.iter().map(|(n, _)| ptx(n).map(|_| *n)).collect()
}
