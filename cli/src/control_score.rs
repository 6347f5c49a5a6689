//! The control metric of a pipeline run's validations: how well each sample follows its
//! condition, as a number per validation step (metrics.jsonl, TensorBoard, `lisa compare`).
//!
//! Edge conditions (Canny, HED, line art, Fill50K's circle outlines: images that are nearly
//! black and white) are measured the ControlNet++ way: the sample's Canny edges against the
//! condition's edge pixels, as the pixel F1 score, and the SSIM between the condition and
//! that edge map. Other condition types (depth, pose, segmentation) are not measured; the run
//! says so once.

use image::GrayImage;
use lisa_trainer::validation::ControlScore;

/// Canny's hysteresis thresholds (the `cv2.Canny(image, 100, 200)` of ControlNet's and
/// ControlNet++'s Canny conditions; imageproc blurs first with σ = 1.4 and uses the L2
/// gradient magnitude, so its edges differ from OpenCV's in detail).
pub const CANNY_THRESHOLDS: (f32, f32) = (100.0, 200.0);

/// A condition counts as an edge map when at least this share of its pixels is within
/// [`NEAR`] of black or white.
pub const EDGE_MAP_SHARE: f32 = 0.9;
/// How close to black or white (of 255) a pixel of an edge map is.
pub const NEAR: u8 = 32;

/// Which control metric the validations report (`--control-metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlMetric {
    /// Circles when every validation condition is one closed outline (Fill50K), edges when
    /// every one is an edge map, else none (said once).
    Auto,
    /// Edge F1 and SSIM.
    Edges,
    /// Circle IoU (Fill50K), edge F1 and SSIM.
    Circles,
    /// No control metric.
    None,
}

/// What the validation conditions are, for `--control-metric auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKind {
    /// Each one closed outline (Fill50K).
    Outlines,
    /// Edge maps.
    Edges,
    /// Anything else (depth, pose, segmentation, photos).
    Other,
}

/// The kind of every condition of `conditions` (`[n, c, h, w]` planar in [0, 1]).
pub fn condition_kind(conditions: &[f32], shape: [usize; 3]) -> ConditionKind {
    match edge_maps(conditions, shape) {
        true if single_outlines(conditions, shape) => ConditionKind::Outlines,
        true => ConditionKind::Edges,
        false => ConditionKind::Other,
    }
}

/// The pixel F1 and SSIM of a sample's Canny edges against an edge-map condition.
pub struct EdgeScore;

impl ControlScore for EdgeScore {
    fn columns(&self) -> &[&'static str] {
        &["control_f1", "control_ssim"]
    }

    fn score(&self, condition: &[u8], sample: &[u8], side: usize) -> Vec<f32> {
        let edges = canny(&luma(sample), side);
        let is_edge = edge_pixels(condition);
        let shown: Vec<u8> = is_edge.iter().map(|&e| if e { 255 } else { 0 }).collect();
        vec![f1(&is_edge, &edges.iter().map(|&v| v > 127).collect::<Vec<_>>()), ssim(&shown, &edges, side, side)]
    }
}

/// The edge pixels of an edge-map condition (8-bit RGB): the minority colour, white lines on
/// black (Canny, HED) or black on white.
fn edge_pixels(condition: &[u8]) -> Vec<bool> {
    let grey = luma(condition);
    let dark_edges = grey.iter().map(|&v| u64::from(v)).sum::<u64>() > 128 * grey.len() as u64;
    grey.iter().map(|&v| (v > 127) != dark_edges).collect()
}

/// Fill50K-style conditions (one closed outline): the IoU between the disc the outline
/// encloses and the sample's region of the disc's colour, then [`EdgeScore`]'s two numbers.
/// The sample's two regions are found by 2-means on its RGB values, started from its mean
/// colour inside and outside the disc, so no prompt colours are needed (the toy's IoU
/// compares with the prompt's colours instead).
pub struct CircleScore;

impl ControlScore for CircleScore {
    fn columns(&self) -> &[&'static str] {
        &["circle_iou", "control_f1", "control_ssim"]
    }

    fn score(&self, condition: &[u8], sample: &[u8], side: usize) -> Vec<f32> {
        let disc = enclosed(&edge_pixels(condition), side);
        let iou = match disc.iter().filter(|&&d| d).count() {
            0 => f32::NAN,
            n if n == disc.len() => f32::NAN,
            _ => lisa_trainer::metrics::iou(&two_means(sample, &disc), &disc),
        };
        let mut out = vec![iou];
        out.extend(EdgeScore.score(condition, sample, side));
        out
    }
}

/// The 4-connected regions of a `side × side` image's non-edge pixels (imageproc's labelling;
/// 0 on edges), and the labels of those that touch the image's border.
fn regions(edges: &[bool], side: usize) -> (Vec<u32>, std::collections::BTreeSet<u32>) {
    use imageproc::region_labelling::{Connectivity, connected_components};
    let open: Vec<u8> = edges.iter().map(|&e| if e { 0 } else { 255 }).collect();
    let image = GrayImage::from_raw(side as u32, side as u32, open).expect("side × side pixels");
    let labels = connected_components(&image, Connectivity::Four, image::Luma([0u8])).into_raw();
    let border = (0..side)
        .flat_map(|i| [i, (side - 1) * side + i, i * side, i * side + side - 1])
        .map(|p| labels[p])
        .filter(|&l| l != 0)
        .collect();
    (labels, border)
}

/// The pixels an outline encloses (and the outline): all but the regions of non-edge pixels
/// that reach the image's border.
fn enclosed(edges: &[bool], side: usize) -> Vec<bool> {
    let (labels, border) = regions(edges, side);
    labels.iter().map(|l| !border.contains(l)).collect()
}

/// The pixels of `rgb` nearer the first of two colour means after a few 2-means rounds,
/// started from the mean colours inside and outside `region`.
fn two_means(rgb: &[u8], region: &[bool]) -> Vec<bool> {
    let pixels: Vec<[f32; 3]> = rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]].map(f32::from)).collect();
    let mut labels = region.to_vec();
    for _ in 0..5 {
        let mean = |inside: bool| {
            let (mut sum, mut n) = ([0f32; 3], 0f32);
            for (p, _) in pixels.iter().zip(&labels).filter(|(_, l)| **l == inside) {
                (0..3).for_each(|c| sum[c] += p[c]);
                n += 1.0;
            }
            sum.map(|v| v / n.max(1.0))
        };
        let (a, b) = (mean(true), mean(false));
        let d = |p: &[f32; 3], m: [f32; 3]| (0..3).map(|c| (p[c] - m[c]).powi(2)).sum::<f32>();
        labels = pixels.iter().map(|p| d(p, a) < d(p, b)).collect();
    }
    labels
}

/// Whether an edge map (8-bit RGB, `side × side`) is one closed outline: its enclosed pixels
/// form one 4-connected region of at least 1 % of the image, as Fill50K's circles do.
pub fn single_outline(condition: &[u8], side: usize) -> bool {
    let (labels, border) = regions(&edge_pixels(condition), side);
    let mut inside = labels.iter().filter(|&&l| l != 0 && !border.contains(&l));
    let Some(&first) = inside.next() else { return false };
    let mut count = 1;
    for &l in inside {
        if l != first {
            return false;
        }
        count += 1;
    }
    count * 100 >= labels.len()
}

/// Whether every condition (`[n, c, h, w]` planar values in [0, 1], square, c = 1 or 3) is
/// one closed outline ([`single_outline`]).
pub fn single_outlines(conditions: &[f32], [c, h, w]: [usize; 3]) -> bool {
    let plane = h * w;
    h == w
        && conditions.chunks((c * plane).max(1)).all(|image| {
            let rgb: Vec<u8> = (0..plane)
                .flat_map(|p| {
                    [0, 1, 2].map(|k| (image[k.min(c - 1) * plane + p].clamp(0.0, 1.0) * 255.0).round() as u8)
                })
                .collect();
            single_outline(&rgb, h)
        })
}

/// ITU-R BT.601 luma of `[n, 3]` RGB bytes (OpenCV's RGB → grey).
fn luma(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| (0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2])).round() as u8)
        .collect()
}

/// imageproc's Canny edges (255 on an edge) of a `side × side` grey image.
fn canny(grey: &[u8], side: usize) -> Vec<u8> {
    let image = GrayImage::from_raw(side as u32, side as u32, grey.to_vec()).expect("side × side grey bytes");
    imageproc::edges::canny(&image, CANNY_THRESHOLDS.0, CANNY_THRESHOLDS.1).into_raw()
}

/// `2·TP / (2·TP + FP + FN)` of the predicted edge pixels against the true ones (1 when
/// neither has any).
fn f1(truth: &[bool], predicted: &[bool]) -> f32 {
    let (mut tp, mut wrong) = (0u64, 0u64);
    for (&t, &p) in truth.iter().zip(predicted) {
        match (t, p) {
            (true, true) => tp += 1,
            (false, false) => {}
            _ => wrong += 1,
        }
    }
    if tp + wrong == 0 { 1.0 } else { (2 * tp) as f32 / (2 * tp + wrong) as f32 }
}

/// Mean structural similarity of two `w × h` grey images (Wang et al. 2004): Gaussian
/// window σ = 1.5 (11 taps), `C1 = (0.01·255)²`, `C2 = (0.03·255)²`, population
/// covariances, images extended by reflection and the mean taken away from a 5-pixel border:
/// scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False, data_range=255)`, to which a golden test pins it. NaN for an
/// image narrower than the window.
pub fn ssim(a: &[u8], b: &[u8], w: usize, h: usize) -> f32 {
    const RADIUS: usize = 5;
    if w <= 2 * RADIUS || h <= 2 * RADIUS {
        return f32::NAN;
    }
    let kernel: Vec<f64> = {
        let k: Vec<f64> = (0..=2 * RADIUS)
            .map(|i| {
                let d = i as f64 - RADIUS as f64;
                (-d * d / (2.0 * 1.5 * 1.5)).exp()
            })
            .collect();
        let sum: f64 = k.iter().sum();
        k.iter().map(|v| v / sum).collect()
    };
    // scipy's "reflect": d c b a | a b c d | d c b a.
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let i = i.rem_euclid(2 * n);
        (if i < n { i } else { 2 * n - 1 - i }) as usize
    };
    let blur = |img: &[f64]| -> Vec<f64> {
        let mut rows = vec![0.0; w * h];
        for y in 0..h {
            for x in 0..w {
                rows[y * w + x] = (0..kernel.len())
                    .map(|k| kernel[k] * img[y * w + reflect(x as isize + k as isize - RADIUS as isize, w)])
                    .sum();
            }
        }
        let mut out = vec![0.0; w * h];
        for y in 0..h {
            for x in 0..w {
                out[y * w + x] = (0..kernel.len())
                    .map(|k| kernel[k] * rows[reflect(y as isize + k as isize - RADIUS as isize, h) * w + x])
                    .sum();
            }
        }
        out
    };
    let (a, b): (Vec<f64>, Vec<f64>) =
        (a.iter().map(|&v| f64::from(v)).collect(), b.iter().map(|&v| f64::from(v)).collect());
    let product = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).collect::<Vec<f64>>();
    let (ma, mb) = (blur(&a), blur(&b));
    let (aa, bb, ab) = (blur(&product(&a, &a)), blur(&product(&b, &b)), blur(&product(&a, &b)));
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let (mut sum, mut count) = (0.0, 0usize);
    for y in RADIUS..h - RADIUS {
        for x in RADIUS..w - RADIUS {
            let i = y * w + x;
            let (va, vb, cov) = (aa[i] - ma[i] * ma[i], bb[i] - mb[i] * mb[i], ab[i] - ma[i] * mb[i]);
            sum += ((2.0 * ma[i] * mb[i] + c1) * (2.0 * cov + c2))
                / ((ma[i] * ma[i] + mb[i] * mb[i] + c1) * (va + vb + c2));
            count += 1;
        }
    }
    (sum / count as f64) as f32
}

/// Whether every condition (`[n, c, h, w]` planar values in [0, 1], `shape = [c, h, w]`,
/// c = 1 or 3) is an edge map: at least [`EDGE_MAP_SHARE`] of its pixels near black or
/// white in every channel (saturated colours are neither), and of the pixels that are not the
/// dominant one, most ([`MINORITY_SHARE`]) the other: thin white lines on black or black on
/// white, not a pose skeleton's coloured limbs on black.
pub fn edge_maps(conditions: &[f32], [c, h, w]: [usize; 3]) -> bool {
    let (plane, near) = (h * w, f32::from(NEAR) / 255.0);
    let per = (c * plane).max(1);
    conditions.chunks(per).all(|image| {
        let (mut black, mut white) = (0usize, 0usize);
        for p in 0..plane {
            let channels = (0..c).map(|ch| image[ch * plane + p]);
            let (lo, hi) = channels.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
            black += usize::from(hi <= near);
            white += usize::from(lo >= 1.0 - near);
        }
        let other = plane - black - white;
        let minority = black.min(white);
        (black + white) as f32 >= EDGE_MAP_SHARE * plane as f32
            && minority as f32 >= MINORITY_SHARE * (minority + other) as f32
    })
}

/// Of an edge map's pixels that are not its background, the share that must be the other
/// extreme (its lines).
pub const MINORITY_SHARE: f32 = 0.7;

#[cfg(test)]
mod tests {
    use super::*;

    /// A `side × side` RGB image, white where `on(x, y)`.
    fn drawn(side: usize, on: impl Fn(usize, usize) -> bool) -> Vec<u8> {
        (0..side * side).flat_map(|i| [if on(i % side, i / side) { 255 } else { 0 }; 3]).collect()
    }

    #[test]
    fn a_sample_with_the_conditions_edges_scores_higher_than_one_without() {
        let side = 64;
        // The condition: a circle's outline. A sample with a filled circle has its edges there.
        let ring = |x: usize, y: usize| {
            let d = (x as f32 - 32.0).hypot(y as f32 - 32.0);
            (15.0..17.0).contains(&d)
        };
        let disc = |x: usize, y: usize| (x as f32 - 32.0).hypot(y as f32 - 32.0) < 16.0;
        let square = |x: usize, y: usize| (8..20).contains(&x) && (40..56).contains(&y);
        let condition = drawn(side, ring);
        let good = EdgeScore.score(&condition, &drawn(side, disc), side);
        let bad = EdgeScore.score(&condition, &drawn(side, square), side);
        let blank = EdgeScore.score(&condition, &drawn(side, |_, _| false), side);
        assert!(good[0] > 0.3 && good[0] > 3.0 * bad[0], "F1: {good:?} vs {bad:?}");
        assert!(good[1] > bad[1], "SSIM: {good:?} vs {bad:?}");
        assert_eq!(blank[0], 0.0, "no edges, no true positives");
        // Black edges on white are read the same way.
        let inverted: Vec<u8> = condition.iter().map(|v| 255 - v).collect();
        assert_eq!(EdgeScore.score(&inverted, &drawn(side, disc), side)[0], good[0]);
    }

    #[test]
    fn circle_iou_finds_the_disc_the_outline_encloses() {
        let side = 64;
        let ring = |x: usize, y: usize| (15.0..17.0).contains(&(x as f32 - 32.0).hypot(y as f32 - 32.0));
        let condition = drawn(side, ring);
        assert!(single_outline(&condition, side));
        assert!(!single_outline(&drawn(side, |x, _| x == 20), side), "a line encloses nothing");
        // A red disc on blue, where the outline is: IoU near 1; elsewhere: low.
        let painted = |cx: f32| -> Vec<u8> {
            (0..side * side)
                .flat_map(|i| {
                    let inside = ((i % side) as f32 - cx).hypot((i / side) as f32 - 32.0) < 16.0;
                    if inside { [220, 30, 20] } else { [30, 40, 200] }
                })
                .collect()
        };
        let here = CircleScore.score(&condition, &painted(32.0), side);
        let there = CircleScore.score(&condition, &painted(12.0), side);
        // The outline (radius 15 to 17) counts as disc: (16/17)² of it is painted.
        assert!(here[0] > 0.85, "{here:?}");
        assert!(there[0] < 0.5, "{there:?}");
        assert_eq!(CircleScore.columns().len(), here.len());
    }

    #[test]
    fn f1_counts_pixels() {
        assert_eq!(f1(&[true, true, false, false], &[true, false, true, false]), 0.5);
        assert_eq!(f1(&[false, false], &[false, false]), 1.0);
    }

    /// scikit-image 0.26's `structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    /// use_sample_covariance=False, data_range=255)` of the two images below
    /// (`scripts/goldens/skimage_ssim.py`).
    #[test]
    fn ssim_matches_scikit_image() {
        let (w, h) = (40, 32);
        let a: Vec<u8> = (0..w * h).map(|i| ((i % w * 7 + i / w * 13) % 256) as u8).collect();
        let b: Vec<u8> = (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as i64 - 20, (i / w) as i64 - 16);
                if (64..=100).contains(&(x * x + y * y)) { 255 } else { ((i % w * 5) % 256) as u8 }
            })
            .collect();
        assert!((ssim(&a, &a, w, h) - 1.0).abs() < 1e-6, "an image is its own match");
        let ours = ssim(&a, &b, w, h);
        let theirs = SKIMAGE_SSIM;
        assert!((ours - theirs).abs() < 1e-5, "ours {ours}, scikit-image {theirs}");
        assert!(ssim(&a[..100], &b[..100], 10, 10).is_nan(), "narrower than the window");
    }

    /// The value `scripts/goldens/skimage_ssim.py` prints.
    const SKIMAGE_SSIM: f32 = 0.139_619_49;

    #[test]
    fn edge_maps_are_told_from_photos() {
        // Two grey 5×10 edge maps, then one beside a ramp.
        let edges: Vec<f32> = (0..100).map(|i| if i % 7 == 0 { 1.0 } else { 0.0 }).collect();
        let photo: Vec<f32> = (0..50).map(|i| i as f32 / 50.0).collect();
        assert!(edge_maps(&edges, [1, 5, 10]));
        assert!(!edge_maps(&[&edges[..50], &photo[..]].concat(), [1, 5, 10]), "one photo among the conditions");
        // Saturated colours (red on blue) are extreme per channel but not in luma.
        let red_on_blue: Vec<f32> = [[1.0; 25], [0.0; 25], [0.0; 25], [0.0; 25], [0.0; 25], [1.0; 25]].concat();
        assert!(!edge_maps(&red_on_blue, [3, 5, 10]));
        assert!(edge_maps(&[[1.0; 50], [1.0; 50], [1.0; 50]].concat(), [3, 5, 10]), "white is extreme");
        // A pose skeleton: coloured limbs (5 of 50 pixels) on black is no edge map.
        let limb = |ch: usize| (0..50).map(move |i| if i % 10 == 0 && ch == 0 { 1.0 } else { 0.0 });
        let pose: Vec<f32> = (0..3).flat_map(limb).collect();
        assert!(!edge_maps(&pose, [3, 5, 10]));
        // The same limbs in white are edges.
        let lines: Vec<f32> = (0..3).flat_map(|_| limb(0)).collect();
        assert!(edge_maps(&lines, [3, 5, 10]));
    }
}
