//! Controllability metrics of the fill-circles task (docs/method.md §6).

use crate::data::{Circle, PALETTE};

/// `|A ∩ B| / |A ∪ B|` of two equal-length masks (1 when both are empty).
pub fn iou(a: &[bool], b: &[bool]) -> f32 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        inter += usize::from(x && y);
        union += usize::from(x || y);
    }
    if union == 0 { 1.0 } else { inter as f32 / union as f32 }
}

/// The disc the condition outlines: pixel centres within the radius (same rule as the data).
pub fn disc_mask(circle: &Circle, resolution: usize) -> Vec<bool> {
    (0..resolution * resolution).map(|i| circle.covers(i % resolution, i / resolution)).collect()
}

/// Pixels of a generated image `[3, r, r]` (values in [−1, 1]) nearer (in RGB) to the
/// prompt's circle colour than to its background colour.
pub fn circle_mask(image: &[f32], resolution: usize, fill: usize, background: usize) -> Vec<bool> {
    let plane = resolution * resolution;
    let (f, b) = (PALETTE[fill % PALETTE.len()].1, PALETTE[background % PALETTE.len()].1);
    (0..plane)
        .map(|i| {
            let px = [0, 1, 2].map(|c| (image[c * plane + i] + 1.0) * 0.5);
            let d = |col: [f32; 3]| (0..3).map(|c| (px[c] - col[c]).powi(2)).sum::<f32>();
            d(f) < d(b)
        })
        .collect()
}

/// Colour fidelity: the mean RGB distance (in [0, 1] units) of each region of a generated
/// image to the colour its prompt asks for, circle pixels vs fill and the rest vs background,
/// using the condition's disc as the regions. 0 is perfect.
pub fn colour_error(image: &[f32], resolution: usize, circle: &Circle) -> f32 {
    let plane = resolution * resolution;
    let disc = disc_mask(circle, resolution);
    let (f, b) = (PALETTE[circle.fill].1, PALETTE[circle.background].1);
    let total: f32 = (0..plane)
        .map(|i| {
            let want = if disc[i] { f } else { b };
            (0..3).map(|c| ((image[c * plane + i] + 1.0) * 0.5 - want[c]).powi(2)).sum::<f32>().sqrt()
        })
        .sum();
    total / plane as f32
}

/// IoU between the generated circle (by colour) and the condition's disc.
pub fn controllability_iou(image: &[f32], resolution: usize, circle: &Circle) -> f32 {
    iou(&circle_mask(image, resolution, circle.fill, circle.background), &disc_mask(circle, resolution))
}
