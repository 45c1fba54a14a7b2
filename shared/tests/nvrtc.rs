//! Every kernel in kernels/ compiles with NVRTC through the loading code the
//! tools use. Needs only libnvrtc, no GPU: `make test` installs the
//! nvidia-cuda-nvrtc-cu12 wheel, points LD_LIBRARY_PATH at it and sets
//! FTK_REQUIRE_NVRTC=1 so the check cannot be skipped there.

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !ftk::kernels::nvrtc_available() {
        assert!(
            std::env::var_os("FTK_REQUIRE_NVRTC").is_none(),
            "FTK_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").ok()
        );
        eprintln!("skipped: libnvrtc is not loadable here (run through `make test` to install it)");
        return;
    }
    let names = ftk::kernels::compile_all().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names.len(), ftk::kernels::SOURCES.len());
    let entries = [
        (
            "route_hist",
            &["hist_i32", "hist_i64", "hist_u8", "hist_i16"][..],
        ),
        (
            "fed_aggregate",
            &["axpy_f32", "axpy_bf16", "axpy_f16", "mean_to_f32"][..],
        ),
        (
            "moe",
            &[
                "softmax_topk",
                "router_bwd",
                "gather_rows_f32",
                "combine_rows_f32",
                "swiglu_fwd_f32",
                "swiglu_bwd_f32",
                "row_dots_f32",
                "gather_rows_bf16",
                "combine_rows_bf16",
                "swiglu_fwd_bf16",
                "swiglu_bwd_bf16",
                "row_dots_bf16",
            ][..],
        ),
    ];
    for (module, fns) in entries {
        let src = ftk::kernels::ptx(module).unwrap().to_src();
        for f in fns {
            assert!(
                src.contains(&format!(".entry {f}(")),
                "{module}: no entry point {f} in the PTX"
            );
        }
    }
}

#[test]
fn a_broken_kernel_reports_the_nvrtc_log() {
    if !ftk::kernels::nvrtc_available() {
        eprintln!("skipped: libnvrtc is not loadable here");
        return;
    }
    let err =
        cudarc::nvrtc::compile_ptx("extern \"C\" __global__ void k() { undefined_name = 1; }")
            .unwrap_err();
    assert!(format!("{err:?}").contains("undefined_name"), "{err:?}");
}
