//! Seeded, portable random streams. ChaCha8 gives the same bytes on every
//! platform and rand version pairing we pin, and independent numbered
//! streams let parallel work stay reproducible whatever the thread count.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The random stream number `stream` under `seed`.
pub fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// A stream number from several indices (e.g. layer, step, rank), so each
/// unit of work draws from its own stream.
pub fn stream_id(parts: &[u64]) -> u64 {
    // FNV-1a over the parts: cheap, stable, and spreads nearby indices.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
