//! route-hist's CUDA path: the expert-id histogram of a top-k tensor with
//! kernels/route_hist.cu (shared-memory privatised atomics). The CPU path
//! (count.rs) is the reference; tests check they agree exactly.

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use ftk::tensors::Dtype;

/// Kernel name for an integer dtype, if the CUDA path supports it.
pub fn kernel_for(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::I32 => Some("hist_i32"),
        Dtype::I64 => Some("hist_i64"),
        Dtype::U8 => Some("hist_u8"),
        Dtype::I16 => Some("hist_i16"),
        _ => None,
    }
}

/// Per-expert counts of `bytes` (little-endian ids of `dtype`) on device
/// `ordinal`. Err carries a message; `Ok(None)` means ids out of range (the
/// caller rescans on the CPU to name the first one).
pub fn count_topk(
    ordinal: usize,
    dtype: Dtype,
    bytes: &[u8],
    experts: usize,
) -> ftk::Result<Option<Vec<u64>>> {
    let kernel = kernel_for(dtype)
        .ok_or_else(|| ftk::Error::internal(format!("no CUDA histogram kernel for {dtype:?}")))?;
    let width = ftk::tensors::dtype_bytes(dtype).expect("integer dtypes are whole bytes");
    let n = (bytes.len() / width) as u64;
    let ptx = ftk::kernels::ptx("route_hist")?;
    let e = |x: cudarc::driver::DriverError| ftk::Error::device(format!("CUDA: {x}"));
    let ctx = CudaContext::new(ordinal).map_err(e)?;
    let stream = ctx.default_stream();
    let module = ctx.load_module((*ptx).clone()).map_err(e)?;
    let func = module.load_function(kernel).map_err(e)?;
    let ids = stream.clone_htod(bytes).map_err(e)?;
    let mut hist = stream.alloc_zeros::<u64>(experts).map_err(e)?;
    let mut bad = stream.alloc_zeros::<u64>(1).map_err(e)?;
    let threads = 256u32;
    let blocks = (n.div_ceil(u64::from(threads))).clamp(1, 4096) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 4 * experts as u32,
    };
    let experts_u32 = experts as u32;
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&ids)
        .arg(&n)
        .arg(&experts_u32)
        .arg(&mut hist)
        .arg(&mut bad);
    // SAFETY: the kernel reads n ids of `dtype` from `ids` (n·width bytes were
    // copied), writes `experts` counters and one flag; shared memory is sized
    // for `experts` u32 counters.
    unsafe { launch.launch(cfg) }.map_err(e)?;
    let bad = stream.clone_dtoh(&bad).map_err(e)?;
    if bad[0] > 0 {
        return Ok(None);
    }
    stream.clone_dtoh(&hist).map(Some).map_err(e)
}
