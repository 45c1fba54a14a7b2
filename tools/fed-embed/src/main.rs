fn main() {
    let args = ftk::cli::parse_args::<fed_embed::Args>("fed-embed");
    ftk::cli::main_with("fed-embed", || fed_embed::run(args));
}
