//! PNG in and out through the `png` crate: samples are written as 8-bit RGB
//! or grey (atomically, like every ftk output), and client images for
//! `describe` are read from a directory of PNGs as CHW floats in [0,1].

use ftk::io::write_atomic;
use ftk::{bail, Error, Result};
use std::io::Write;
use std::path::Path;

/// Encode a CHW image in [0,1] (1 or 3 channels) as an 8-bit PNG.
pub fn encode_chw(px: &[f32], ch: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    if ch != 1 && ch != 3 {
        bail!("PNG output needs 1 or 3 image channels, got {ch}");
    }
    if px.len() != ch * h * w {
        bail!("PNG output: {} values for a {ch}x{h}x{w} image", px.len());
    }
    let mut raw = Vec::with_capacity(h * w * ch);
    for y in 0..h {
        for x in 0..w {
            for c in 0..ch {
                let v = px[c * h * w + y * w + x];
                // as torchvision / diffusers' numpy_to_pil: round(v * 255)
                raw.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    let mut out = Vec::new();
    let fail = |e: png::EncodingError| Error::input(format!("PNG encoding: {e}"));
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(if ch == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().map_err(fail)?;
    wr.write_image_data(&raw).map_err(fail)?;
    wr.finish().map_err(fail)?;
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

/// As [`write_png_chw`], but written and synced without being put in place:
/// the caller commits a run's PNGs together, so a failure on one leaves none.
pub fn stage_png_chw(
    path: &Path,
    px: &[f32],
    ch: usize,
    h: usize,
    w: usize,
) -> Result<ftk::output::Ready> {
    let bytes = encode_chw(px, ch, h, w)?;
    ftk::output::Output::create(path)?.fill(|f: &mut dyn Write| {
        f.write_all(&bytes)
            .map_err(|e| ftk::Error::io("writing", path, e))
    })
}

/// Decode one PNG (any bit depth and colour type) to RGB CHW floats k/255:
/// grey is replicated, alpha dropped, palettes expanded, 16-bit cut to 8.
pub fn read_rgb_chw(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let bad = |e: png::DecodingError| {
        Error::input(format!("{}: not a readable PNG: {e}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut rd = dec.read_info().map_err(bad)?;
    let size = rd
        .output_buffer_size()
        .ok_or_else(|| Error::input(format!("{}: PNG too large", path.display())))?;
    let mut buf = vec![0u8; size];
    let info = rd.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let per = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{}: palette was not expanded", path.display()),
    };
    let mut out = vec![0f32; 3 * h * w];
    for y in 0..h {
        let row = &buf[y * info.line_size..y * info.line_size + w * per];
        for x in 0..w {
            let p = &row[x * per..(x + 1) * per];
            for c in 0..3 {
                let v = if per < 3 { p[0] } else { p[c] };
                out[c * h * w + y * w + x] = f32::from(v) / 255.0;
            }
        }
    }
    Ok((h, w, out))
}

/// Every `*.png` in `dir` (sorted by name) as [N,3,H,W] in [0,1]; all the
/// same size.
pub fn read_dir_rgb(dir: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("reading", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("{}: no .png images in the directory", dir.display());
    }
    let mut all = Vec::new();
    let mut size = None;
    for p in &paths {
        let (h, w, px) = read_rgb_chw(p)?;
        match size {
            None => size = Some((h, w)),
            Some(s) if s != (h, w) => bail!(
                "{}: {h}x{w}, but {} is {}x{}; give images of one size (the model's resolution)",
                p.display(),
                paths[0].display(),
                s.0,
                s.1
            ),
            _ => {}
        }
        all.extend(px);
    }
    let (h, w) = size.expect("at least one image");
    Ok((vec![paths.len(), 3, h, w], all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_rgb_and_replicates_grey() {
        let dir = tempfile::tempdir().unwrap();
        let (h, w) = (3, 5);
        let rgb: Vec<f32> = (0..3 * h * w)
            .map(|i| (i * 17 % 256) as f32 / 255.0)
            .collect();
        let p = dir.path().join("a.png");
        write_png_chw(&p, &rgb, 3, h, w).unwrap();
        let (hh, ww, back) = read_rgb_chw(&p).unwrap();
        assert_eq!((hh, ww), (h, w));
        assert!(back.iter().zip(&rgb).all(|(a, b)| (a - b).abs() < 1e-6));
        let grey: Vec<f32> = (0..h * w).map(|i| i as f32 / 20.0).collect();
        let q = dir.path().join("b.png");
        write_png_chw(&q, &grey, 1, h, w).unwrap();
        let (_, _, back) = read_rgb_chw(&q).unwrap();
        for c in 0..3 {
            for (i, g) in grey.iter().enumerate() {
                assert_eq!(back[c * h * w + i], (g * 255.0).round() / 255.0);
            }
        }
        assert!(encode_chw(&rgb, 2, h, w).is_err());
        std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
        let e = read_dir_rgb(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("c.png") && e.contains("not a readable PNG"),
            "{e}"
        );
    }
}
