use clap::Parser;

// Memory in chunk-run's records is measured, not estimated.
#[global_allocator]
static ALLOC: ftk::alloc::Counting = ftk::alloc::Counting;

fn main() {
    ftk::alloc::keep_freed_memory();
    let args = chunk_run::Args::parse();
    ftk::cli::main_with("chunk-run", || chunk_run::run(args));
}
