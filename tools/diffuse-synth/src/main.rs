fn main() {
    // Attention and conv buffers are tens of MiB: reuse freed heap instead of
    // mapping fresh pages for each (it was ~40% of a step in system time).
    ftk::alloc::keep_freed_memory();
    // candle's own pool (elementwise ops) spins beside rayon's (GEMMs, conv, attention,
    // norms in `cpu_kernels`): on few cores the two fight for them, so unless asked otherwise
    // candle's elementwise ops run on this thread and everything heavy on rayon's pool.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args = ftk::cli::parse_args::<diffuse_synth::Args>("diffuse-synth");
    ftk::cli::main_with("diffuse-synth", || diffuse_synth::run(args));
}
