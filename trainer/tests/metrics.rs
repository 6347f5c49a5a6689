//! The controllability metrics on synthetic masks and images with known answers.

use lisa_trainer::data::{Circle, Dataset, FillCircles};
use lisa_trainer::metrics::{circle_mask, colour_error, controllability_iou, disc_mask, iou};

#[test]
fn iou_of_known_masks() {
    // Two 4×4 squares on an 8×8 grid overlapping in a 2×4 band: 8 / (16 + 16 − 8) = 1/3.
    let square = |x0: usize| (0..64).map(|i| (i % 8) >= x0 && (i % 8) < x0 + 4 && (i / 8) < 4).collect::<Vec<_>>();
    assert!((iou(&square(0), &square(2)) - 1.0 / 3.0).abs() < 1e-6);
    assert_eq!(iou(&square(0), &square(0)), 1.0);
    assert_eq!(iou(&square(0), &square(4)), 0.0);
    assert_eq!(iou(&[false; 4], &[false; 4]), 1.0);
}

#[test]
fn the_data_itself_scores_perfectly() {
    let data = FillCircles { resolution: 32, len: 16, seed: 5 };
    for i in 0..16 {
        let e = data.get(i).unwrap();
        let c = data.circle(i);
        assert_eq!(controllability_iou(&e.image, 32, &c), 1.0, "example {i}");
        assert!(colour_error(&e.image, 32, &c) < 1e-6);
        // The outline lies on the disc's edge.
        let disc = disc_mask(&c, 32);
        let ring_in_disc = e.hint.iter().zip(&disc).filter(|(h, _)| **h > 0.5).filter(|(_, d)| **d).count();
        assert!(ring_in_disc > 0);
    }
}

#[test]
fn a_misplaced_circle_scores_its_overlap() {
    let data = FillCircles { resolution: 32, len: 1, seed: 9 };
    let c = data.circle(0);
    let e = data.get(0).unwrap();
    // Same colours, the circle moved by its radius: IoU strictly between 0 and 1 and equal
    // to the overlap of the two discs.
    let moved = Circle { cx: c.cx + c.radius, ..c };
    let got = controllability_iou(&e.image, 32, &moved);
    let want = iou(&disc_mask(&c, 32), &disc_mask(&moved, 32));
    assert!((got - want).abs() < 1e-6 && got > 0.1 && got < 0.9, "{got} vs {want}");
    // Swapped colours: the mask inverts.
    let inverted = circle_mask(&e.image, 32, c.background, c.fill);
    assert!(inverted.iter().zip(disc_mask(&c, 32)).all(|(a, b)| *a != b));
}
