//! Refusing shapes the machine cannot hold, before anything is allocated
//! (an allocation failure aborts the process; a checked product does not).

use crate::moe::Shape;
use ftk::size::{check_memory, product};
use ftk::Result;

/// Bytes a CPU step needs at least: weights and gradients of every layer
/// (router E·h, three expert matrices E·h·f), x, dy, y and each layer's
/// output (T·h), and the routing (T·k ids and weights), all f32.
pub fn check(sh: &Shape, layers: usize) -> Result<()> {
    let (t, h, f, e, k) = (
        sh.tokens as u64,
        sh.hidden as u64,
        sh.ffn as u64,
        sh.experts as u64,
        sh.topk as u64,
    );
    let per_layer = product(&[e, h, f, 3])
        .and_then(|w| w.checked_add(product(&[e, h])?))
        .and_then(|w| w.checked_mul(2 * 4));
    let weights = per_layer.and_then(|b| b.checked_mul(layers as u64));
    let acts = product(&[t, h, 4])
        .and_then(|b| b.checked_mul(layers as u64 + 3))
        .and_then(|b| b.checked_add(product(&[t, k, 16])?));
    let total = weights.and_then(|w| w.checked_add(acts?));
    check_memory(
        &format!(
            "--hidden {h} --ffn {f} --experts {e} --topk {k} --tokens {t} --layers {layers} (weights, gradients and activations)"
        ),
        total,
    )
}
