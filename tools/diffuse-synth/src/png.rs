//! A minimal PNG writer (8-bit RGB or grey, zlib "stored" blocks): no extra
//! dependency for a few small images. Written atomically like every ftk output.

use ftk::io::write_atomic;
use ftk::{bail, Result};
use std::io::Write;
use std::path::Path;

fn crc32(chunks: &[&[u8]]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for data in chunks {
        for &b in *data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// PNG bytes of an image given channel-first floats in [0, 1] (1 or 3 channels).
pub fn encode_chw(px: &[f32], ch: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    if ch != 1 && ch != 3 {
        bail!("PNG output needs 1 or 3 image channels, got {ch}");
    }
    if px.len() != ch * h * w {
        bail!("PNG output: {} values for a {ch}x{h}x{w} image", px.len());
    }
    let mut raw = Vec::with_capacity(h * (1 + w * ch));
    for y in 0..h {
        raw.push(0u8); // filter: none
        for x in 0..w {
            for c in 0..ch {
                let v = px[c * h * w + y * w + x];
                // as torchvision / diffusers' numpy_to_pil: round(v * 255)
                raw.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, if ch == 3 { 2 } else { 0 }, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// Write a PNG atomically.
pub fn write_png_chw(path: &Path, px: &[f32], ch: usize, h: usize, w: usize) -> Result<()> {
    let bytes = encode_chw(px, ch, h, w)?;
    write_atomic(path, |f: &mut dyn Write| {
        f.write_all(&bytes)
            .map_err(|e| ftk::Error::io("writing", path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_adler_known_values() {
        assert_eq!(crc32(&[b"IEND"]), 0xae42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn encodes_header_and_size() {
        let px = vec![0.5f32; 3 * 2 * 5];
        let b = encode_chw(&px, 3, 2, 5).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&b[16..24], &[0, 0, 0, 5, 0, 0, 0, 2]);
        assert!(encode_chw(&px, 2, 3, 5).is_err());
    }
}
