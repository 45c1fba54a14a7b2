use clap::Parser;

fn main() {
    let args = fed_embed::Args::parse();
    ftk::cli::main_with("fed-embed", || fed_embed::run(args));
}
