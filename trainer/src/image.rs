//! PNG images in and out: grids of samples and conditions, condition images for sampling.

use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
}

impl Rgb8 {
    /// A black image.
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height, pixels: vec![0; width * height * 3] }
    }

    /// Pastes a planar image `[c, r, r]` (c = 1 or 3, values in `range = (lo, hi)`) with its
    /// top-left corner at `at = (x, y)`.
    pub fn paste_planar(
        &mut self,
        planar: &[f32],
        channels: usize,
        side: usize,
        at: (usize, usize),
        range: (f32, f32),
    ) {
        let ((x0, y0), (lo, hi)) = (at, range);
        let plane = side * side;
        for y in 0..side.min(self.height.saturating_sub(y0)) {
            for x in 0..side.min(self.width.saturating_sub(x0)) {
                for c in 0..3 {
                    let v = planar[(if channels == 1 { 0 } else { c }) * plane + y * side + x];
                    let byte = (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
                    self.pixels[((y0 + y) * self.width + x0 + x) * 3 + c] = byte;
                }
            }
        }
    }

    /// Each pixel as a `k × k` block (small model outputs made visible).
    pub fn upscaled(&self, k: usize) -> Rgb8 {
        let k = k.max(1);
        let mut out = Rgb8::new(self.width * k, self.height * k);
        for y in 0..out.height {
            for x in 0..out.width {
                let (i, o) = (3 * ((y / k) * self.width + x / k), 3 * (y * out.width + x));
                out.pixels[o..o + 3].copy_from_slice(&self.pixels[i..i + 3]);
            }
        }
        out
    }

    /// Writes a PNG atomically.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(|e| png_err(path, e))?;
            w.write_image_data(&self.pixels).map_err(|e| png_err(path, e))?;
        }
        write_atomic(path, &bytes)
    }
}

fn png_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Data { path: path.to_path_buf(), reason: format!("not a readable PNG: {e}") }
}

/// How [`read_png`] maps source pixels onto the model's grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// The mean of the source pixels under each output pixel (images).
    Area,
    /// Their maximum (thin outlines, which averaging would wash out).
    Max,
}

/// Reads a PNG (grey, grey+alpha, RGB or RGBA, 8 bit) as planar f32 in [0, 1], resized to
/// `side × side` (each output pixel covers the source pixels `[x·w/side, (x+1)·w/side)`,
/// at least one): returns `[channels, side, side]` with `channels` = 1 (`grey = true`,
/// luminance) or 3.
pub fn read_png(path: &Path, side: usize, grey: bool, resample: Resample) -> Result<Vec<f32>> {
    let file = std::fs::File::open(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| png_err(path, e))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or_else(|| png_err(path, "image too large"))?];
    let info = reader.next_frame(&mut buf).map_err(|e| png_err(path, e))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => return Err(png_err(path, format!("unsupported colour type {other:?}"))),
    };
    if w == 0 || h == 0 {
        return Err(png_err(path, "empty image"));
    }
    let channels = if grey { 1 } else { 3 };
    let pixel_bytes = (info.line_size / w).max(stride);
    let pixel = |sx: usize, sy: usize| -> [f32; 3] {
        let p = &buf[sy * info.line_size + sx * pixel_bytes..][..stride];
        let rgb = if stride < 3 { [p[0]; 3] } else { [p[0], p[1], p[2]] };
        let v = rgb.map(|c| c as f32 / 255.0);
        if grey { [0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2]; 3] } else { v }
    };
    let span = |i: usize, n: usize| (i * n / side, ((i + 1) * n / side).max(i * n / side + 1).min(n));
    let mut out = vec![0.0f32; channels * side * side];
    for y in 0..side {
        let (y0, y1) = span(y, h);
        for x in 0..side {
            let (x0, x1) = span(x, w);
            let mut acc = [0.0f32; 3];
            for sy in y0..y1 {
                for sx in x0..x1 {
                    let v = pixel(sx, sy);
                    for c in 0..3 {
                        acc[c] = match resample {
                            Resample::Area => acc[c] + v[c],
                            Resample::Max => acc[c].max(v[c]),
                        };
                    }
                }
            }
            let count = ((y1 - y0) * (x1 - x0)) as f32;
            for c in 0..channels {
                out[c * side * side + y * side + x] = if resample == Resample::Area { acc[c] / count } else { acc[c] };
            }
        }
    }
    Ok(out)
}
