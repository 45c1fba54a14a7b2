use clap::Parser;

fn main() {
    // Attention and conv buffers are tens of MiB: reuse freed heap instead of
    // mapping fresh pages for each (it was ~40% of a step in system time).
    ftk::alloc::keep_freed_memory();
    let args = diffuse_synth::Args::parse();
    ftk::cli::main_with("diffuse-synth", || diffuse_synth::run(args));
}
