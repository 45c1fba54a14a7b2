//! `ftk`: what every ftk tool shares — JSON lines and their record kinds,
//! safetensors, model configs, sizes, errors and exit codes, seeded
//! randomness, tables — and the concepts more than one tool computes with:
//! routing and skew, recompute modes, MACT's flags, the memory model's
//! sizes, parallel layouts and pipeline stages, DP accounting.

pub mod alloc;
pub mod cli;
pub mod device;
pub mod dp;
pub mod error;
pub mod io;
pub mod jsonl;
pub mod kernels;
pub mod layout;
pub mod linalg;
pub mod mact;
pub mod memory;
pub mod model;
pub mod output;
pub mod recompute;
pub mod records;
pub mod rng;
pub mod routing;
pub mod signals;
pub mod size;
pub mod suggest;
pub mod table;
pub mod tensor_writer;
pub mod tensors;

pub use error::{Context, Error, Result};
