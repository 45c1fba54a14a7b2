use clap::Parser;

fn main() {
    let args = fed_aggregate::Args::parse();
    ftk::cli::main_with("fed-aggregate", || fed_aggregate::run(args));
}
