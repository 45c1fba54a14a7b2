//! One module per subcommand: its flags (`Args`), their checks, and `run`,
//! which calls the library and returns the summary record (plus, for some,
//! the `--table` view).

pub mod adapt_weights;
pub mod cluster;
pub mod d3a_weights;
pub mod ensemble;
pub mod keys;
pub mod noise;
pub mod prompt_sample;
pub mod prototypes;
pub mod pseudo_label;
pub mod subspace;
