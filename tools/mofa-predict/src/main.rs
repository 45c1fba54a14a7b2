use clap::Parser;

fn main() {
    let args = mofa_predict::Args::parse();
    ftk::cli::main_with("mofa-predict", || mofa_predict::run(args));
}
