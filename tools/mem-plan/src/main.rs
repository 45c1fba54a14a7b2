fn main() {
    let args = ftk::cli::parse_args::<mem_plan::Args>("mem-plan");
    ftk::cli::main_with("mem-plan", || mem_plan::run(args));
}
