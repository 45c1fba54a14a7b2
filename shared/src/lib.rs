//! `ftk`: what every ftk tool shares — JSON lines, safetensors, model
//! configs, sizes, errors and exit codes, seeded randomness, tables.

pub mod alloc;
pub mod cli;
pub mod device;
pub mod error;
pub mod io;
pub mod jsonl;
pub mod kernels;
pub mod linalg;
pub mod model;
pub mod output;
pub mod rng;
pub mod signals;
pub mod size;
pub mod table;
pub mod tensor_writer;
pub mod tensors;

pub use error::{Context, Error, Result};
