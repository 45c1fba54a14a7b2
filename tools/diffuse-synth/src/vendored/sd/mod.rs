//! Stable Diffusion UNet and VAE, adapted from candle-transformers 0.11.1
//! (`models::stable_diffusion`, Apache-2.0 OR MIT, (c) the candle authors).
//!
//! Changes, each marked `ftk:` in place:
//! - GEGLU uses the exact erf GELU as diffusers does (candle: tanh approximation,
//!   a ~1e-3 difference in every transformer block);
//! - DownBlock2D / UpBlock2D pass `norm_num_groups` to their ResNets (candle: 32);
//! - attention softmax and transformer LayerNorms use candle ops that have a
//!   backward pass (`softmax`, `layer_norm_slow`), so gradients reach every
//!   parameter and the input (rust-stack.md: the fused ones silently drop them);
//! - the VAE attention block copies its transposed activations before the q/k/v
//!   projections: candle 0.11.1's batched matmul returns wrong values for that
//!   non-contiguous left operand (found by the VAE check against diffusers);
//! - flash attention is not built;
//! - the VAE's encoder is built on its first use (a sampling run never reads its weights);
//! - sliced attention (used off the CPU kernels) concatenates its slices (candle stacks
//!   them into a rank-4 tensor and fails);
//! - the timestep projection runs in f32 whatever the UNet's dtype (bf16 rounds timesteps
//!   above 256);
//! - conv, linear, group norm (+ SiLU), layer norm, attention and GEGLU go through
//!   `crate::cpu_kernels`: CPU kernels for f32 inputs, as candle custom ops with an
//!   input-gradient backward when a gradient is tracked (constant weights), and the candle
//!   ops above otherwise (e.g. a tracked weight); the VAE's attention block too;
//! - GEGLU reads its projection's two halves in place (no chunk copies; one node with a
//!   backward when tracked), and residual outputs skip the division by a scale factor
//!   of 1 (a full pass, and a node on the guided path).
#![allow(clippy::all)]

pub mod attention;
pub mod embeddings;
pub mod resnet;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

/// x / f, or x itself when f is 1 (the usual output scale factors).
fn div_unless_one(x: candle_core::Tensor, f: f64) -> candle_core::Result<candle_core::Tensor> {
    if f == 1.0 {
        Ok(x)
    } else {
        x / f
    }
}
