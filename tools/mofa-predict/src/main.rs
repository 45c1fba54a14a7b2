fn main() {
    let args = ftk::cli::parse_args::<mofa_predict::Args>("mofa-predict");
    ftk::cli::main_with("mofa-predict", || mofa_predict::run(args));
}
