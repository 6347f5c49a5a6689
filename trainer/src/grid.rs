//! Validation grids as plain 8-bit RGB pixels: the library draws them, a program writes them
//! in the image format it likes (the `lisa` command: PNG).

/// An 8-bit RGB image, row-major, 3 bytes a pixel, black where nothing was drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbGrid {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `[height, width, 3]` bytes.
    pub pixels: Vec<u8>,
}

impl RgbGrid {
    /// A black `width × height` canvas.
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height, pixels: vec![0; width * height * 3] }
    }

    /// Pastes a planar image `[channels, side, side]` (1 channel: grey; 3: RGB) whose values
    /// span `range = (lo, hi)` (mapped to 0..=255, clamped) with its top-left corner at
    /// `at = (x, y)`; what falls outside the canvas is cut.
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
        let byte = |v: f32| (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
        for y in 0..side {
            for x in 0..side {
                let (px, py) = (x0 + x, y0 + y);
                if px < self.width && py < self.height {
                    let at = (py * self.width + px) * 3;
                    for k in 0..3 {
                        let c = if channels == 1 { 0 } else { k };
                        self.pixels[at + k] = byte(planar[c * plane + y * side + x]);
                    }
                }
            }
        }
    }

    /// The `w × h` rectangle whose top-left corner is `(x, y)`, as `[h, w, 3]` bytes (black
    /// where it leaves the canvas).
    pub fn crop(&self, (x, y): (usize, usize), w: usize, h: usize) -> Vec<u8> {
        let mut out = vec![0; w * h * 3];
        for row in 0..h.min(self.height.saturating_sub(y)) {
            let cols = w.min(self.width.saturating_sub(x));
            let from = ((y + row) * self.width + x) * 3;
            out[row * w * 3..(row * w + cols) * 3].copy_from_slice(&self.pixels[from..from + cols * 3]);
        }
        out
    }

    /// Each pixel as a `k × k` block (small model outputs made visible).
    pub fn upscaled(&self, k: usize) -> Self {
        let k = k.max(1);
        let (w, h) = (self.width * k, self.height * k);
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            let row = (y / k) * self.width;
            for x in 0..w {
                let at = (row + x / k) * 3;
                pixels.extend_from_slice(&self.pixels[at..at + 3]);
            }
        }
        Self { width: w, height: h, pixels }
    }
}

#[cfg(test)]
mod tests {
    use super::RgbGrid;

    #[test]
    fn paste_maps_the_range_and_clips_at_the_edge() {
        let mut g = RgbGrid::new(3, 2);
        // A 2×2 grey image at (2, 1): only its top-left pixel lands on the canvas.
        g.paste_planar(&[-1.0, 0.0, 1.0, 1.0], 1, 2, (2, 1), (-1.0, 1.0));
        assert_eq!(&g.pixels[(3 + 2) * 3..], &[0, 0, 0]);
        g.paste_planar(&[1.0, 1.0, 1.0, 1.0], 1, 2, (0, 0), (-1.0, 1.0));
        assert_eq!(&g.pixels[..3], &[255, 255, 255]);
        // RGB planes go to their own channels; values past the range are clamped.
        let mut c = RgbGrid::new(1, 1);
        c.paste_planar(&[0.0, 0.5, 2.0], 3, 1, (0, 0), (0.0, 1.0));
        assert_eq!(c.pixels, vec![0, 128, 255]);
        // A crop reads back what was pasted; past the canvas it is black.
        assert_eq!(g.crop((0, 0), 1, 1), vec![255, 255, 255]);
        assert_eq!(g.crop((2, 1), 2, 2), vec![0; 12]);
    }

    #[test]
    fn upscale_repeats_each_pixel_in_a_block() {
        let g = RgbGrid { width: 2, height: 1, pixels: vec![1, 2, 3, 4, 5, 6] };
        let u = g.upscaled(2);
        assert_eq!((u.width, u.height), (4, 2));
        assert_eq!(u.pixels, [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6].repeat(2));
    }
}
