fn main() {
    let args = ftk::cli::parse_args::<route_hist::Args>("route-hist");
    ftk::cli::main_with("route-hist", || route_hist::run(args));
}
