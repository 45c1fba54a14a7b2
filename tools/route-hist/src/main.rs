use clap::Parser;

fn main() {
    let args = route_hist::Args::parse();
    ftk::cli::main_with("route-hist", || route_hist::run(args));
}
