// Memory in chunk-run's records is measured, not estimated.
#[global_allocator]
static ALLOC: ftk::alloc::Counting = ftk::alloc::Counting;

fn main() {
    ftk::alloc::keep_freed_memory();
    let args = ftk::cli::parse_args::<chunk_run::Args>("chunk-run");
    ftk::cli::main_with("chunk-run", || chunk_run::run(args));
}
