fn main() {
    let args = ftk::cli::parse_args::<fed_aggregate::Args>("fed-aggregate");
    ftk::cli::main_with("fed-aggregate", || fed_aggregate::run(args));
}
