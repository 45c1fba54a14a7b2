use clap::Parser;

fn main() {
    let args = mem_plan::Args::parse();
    ftk::cli::main_with("mem-plan", || mem_plan::run(args));
}
