use clap::Parser;

fn main() {
    let args = diffuse_synth::Args::parse();
    ftk::cli::main_with("diffuse-synth", || diffuse_synth::run(args));
}
