//! The conformance checks, one generic function each (instantiated by
//! [`conformance_tests!`](crate::conformance_tests)).

use lisa_core::backend::prelude::*;
use lisa_core::backend::{
    AdamWParams, Backend, BinaryOp, Conv2dParams, DType, GroupNormGrads, GroupNormOutput, GroupNormParams, Shape,
    Transpose, UnaryOp,
};
use lisa_core::lisa::{LisaConfig, SampleTerms};
use lisa_core::reference::{RefBackend as R, RefTensor};
use lisa_core::tolerance::{Tolerance, backend_vs_reference};
use lisa_core::{Distance, Error, Weighting};

use crate::harness::{Case, Harness, assert_matches, assert_values, finite_difference, ok};
pub use crate::sequence::{attention, gelu_family, layer_norm, matmul_broadcast, narrow_and_concat, permute};

const F32: DType = DType::F32;

/// Tensor creation, read-back, reshape, cast, full.
pub fn creation_and_readback<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[3, 7], &[2, 3, 33], &[1, 1, 1, 1]] {
        let x = h.randn(shape, F32);
        assert_eq!(ok("to_vec", B::to_vec(&x.dev)), x.host, "round trip is exact in f32");
        assert_eq!(B::shape(&x.dev), Shape::new(shape));
        let flat = Shape::new([x.host.len()]);
        assert_matches::<B>("reshape", &B::reshape(&x.dev, &flat), &R::reshape(&x.reference, &flat));
        for dtype in [DType::F16, DType::BF16] {
            if B::supports_dtype(&h.device, dtype) {
                assert_matches::<B>("cast", &B::cast(&x.dev, dtype), &R::cast(&x.reference, dtype));
            }
        }
    }
    let s = Shape::new([3, 33]);
    assert_matches::<B>(
        "full",
        &B::full(&s, 1.5, F32, &h.device),
        &R::full(&s, 1.5, F32, &lisa_core::reference::RefDevice),
    );
    assert_eq!(ok("item", B::item(&B::full(&Shape::scalar(), 2.5, F32, &h.device).unwrap())), 2.5);
}

/// Counter-based normals: the same stream as the reference, at odd sizes.
pub fn random_normal_matches_reference<B: Backend>() {
    let h = Harness::<B>::default();
    for (n, seed) in [(1usize, 0u64), (7, 1), (33, 2), (100_003, 3)] {
        let s = Shape::new([n]);
        let got = B::random_normal(&s, seed, F32, &h.device);
        let want = R::random_normal(&s, seed, F32, &lisa_core::reference::RefDevice);
        assert_matches::<B>("random_normal", &got, &want);
    }
}

/// Broadcast binary ops over shape pairs with stretched dims on either side.
pub fn binary_broadcast<B: Backend>() {
    let mut h = Harness::<B>::default();
    let pairs: [(&[usize], &[usize]); 9] = [
        (&[3, 7], &[3, 7]),
        (&[2, 3, 4], &[4]),
        (&[2, 3, 1], &[1, 1, 5]),
        (&[1], &[33]),
        (&[], &[2, 2]),
        (&[4, 1, 3, 1], &[7, 1]),
        (&[2, 3, 4, 5], &[2, 3, 1, 1]),
        (&[33, 1], &[1, 7]),
        // One value per plane, planes longer than a CPU work chunk (16384).
        (&[2, 2, 130, 130], &[2, 2, 1, 1]),
    ];
    for (sa, sb) in pairs {
        let (a, b) = (h.randn(sa, F32), h.randn(sb, F32));
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
            let what = format!("{op:?} {sa:?} {sb:?}");
            assert_matches::<B>(&what, &B::binary(op, &a.dev, &b.dev), &R::binary(op, &a.reference, &b.reference));
            assert_matches::<B>(&what, &B::binary(op, &b.dev, &a.dev), &R::binary(op, &b.reference, &a.reference));
        }
        let pos = h.positive(sb, 0.5);
        assert_matches::<B>("Div", &B::div(&a.dev, &pos.dev), &R::div(&a.reference, &pos.reference));
    }
}

/// affine, axpby and the unary functions.
pub fn affine_axpby_unary<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[7], &[3, 33], &[2, 3, 7, 7]] {
        let (x, y) = (h.randn(shape, F32), h.randn(shape, F32));
        assert_matches::<B>("affine", &B::affine(&x.dev, -1.5, 0.25), &R::affine(&x.reference, -1.5, 0.25));
        assert_matches::<B>(
            "axpby",
            &B::axpby(0.3, &x.dev, -2.0, &y.dev),
            &R::axpby(0.3, &x.reference, -2.0, &y.reference),
        );
        for op in [UnaryOp::Silu, UnaryOp::Exp, UnaryOp::Square] {
            assert_matches::<B>(&format!("{op:?}"), &B::unary(op, &x.dev), &R::unary(op, &x.reference));
        }
        let p = h.positive(shape, 0.5);
        assert_matches::<B>("Sqrt", &B::unary(UnaryOp::Sqrt, &p.dev), &R::unary(UnaryOp::Sqrt, &p.reference));
    }
}

/// Unary backward against the reference and finite differences.
pub fn unary_backward<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[3, 7], &[2, 33]] {
        for op in [UnaryOp::Silu, UnaryOp::Exp, UnaryOp::Square, UnaryOp::Sqrt] {
            let x = if op == UnaryOp::Sqrt { h.positive(shape, 0.5) } else { h.randn(shape, F32) };
            let g = h.randn(shape, F32);
            let got = B::unary_backward(op, &x.dev, &g.dev);
            assert_matches::<B>(&format!("{op:?} backward"), &got, &R::unary_backward(op, &x.reference, &g.reference));
            finite_difference(
                &format!("{op:?} backward"),
                &h,
                &x,
                &g.host,
                |t| B::unary(op, t).unwrap(),
                &got.unwrap(),
            );
        }
    }
}

/// sum, mean, sum of squares.
pub fn reductions<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[7], &[33, 3], &[100_003]] {
        let x = h.randn(shape, F32);
        assert_matches::<B>("sum", &B::sum(&x.dev), &R::sum(&x.reference));
        assert_matches::<B>("mean", &B::mean(&x.dev), &R::mean(&x.reference));
        assert_matches::<B>("sum_squares", &B::sum_squares(&x.dev), &R::sum_squares(&x.reference));
    }
    // The sum of squares over many tensors (a model's gradient norm; each part counts, so a
    // dropped one shows), and over none.
    let parts: Vec<_> = [&[3usize, 4][..], &[7], &[33, 3], &[2, 5, 3, 3]].iter().map(|s| h.randn(s, F32)).collect();
    let dev: Vec<&B::Tensor> = parts.iter().map(|p| &p.dev).collect();
    let reference: Vec<&RefTensor> = parts.iter().map(|p| &p.reference).collect();
    let (got, want) = (ok("sum_squares_all", B::sum_squares_all(&dev)), R::sum_squares_all(&reference).unwrap());
    assert_values("sum_squares_all", &[got as f32], &[want as f32], backend_vs_reference(F32));
    assert_eq!(ok("sum_squares_all of none", B::sum_squares_all(&[])), 0.0);
}

/// sum_to_shape (the backward of broadcasting), including rank reduction.
pub fn sum_to_shape<B: Backend>() {
    let mut h = Harness::<B>::default();
    let cases: [(&[usize], &[usize]); 7] = [
        (&[2, 3, 4], &[4]),
        (&[2, 3, 4], &[3, 1]),
        (&[7, 33], &[1, 33]),
        (&[7, 33], &[7, 1]),
        (&[2, 5, 3, 3], &[1, 5, 1, 1]),
        (&[3, 7], &[]),
        (&[3, 7], &[3, 7]),
    ];
    for (from, to) in cases {
        let x = h.randn(from, F32);
        let s = Shape::new(to);
        assert_matches::<B>(
            &format!("sum_to_shape {from:?}->{to:?}"),
            &B::sum_to_shape(&x.dev, &s),
            &R::sum_to_shape(&x.reference, &s),
        );
    }
    let x = h.randn(&[2, 5, 3, 3], F32);
    assert_matches::<B>("conv bias grad", &B::conv2d_backward_bias(&x.dev), &R::conv2d_backward_bias(&x.reference));
}

/// Softmax over the last dim and its backward.
pub fn softmax<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[3, 7], &[2, 3, 33]] {
        let x = h.randn(shape, F32);
        let x_big = ok("affine", B::affine(&x.dev, 20.0, 0.0));
        let x_big_ref = R::affine(&x.reference, 20.0, 0.0).unwrap();
        assert_matches::<B>("softmax (large logits)", &B::softmax_last(&x_big), &R::softmax_last(&x_big_ref));
        let y = ok("softmax", B::softmax_last(&x.dev));
        let g = h.randn(shape, F32);
        let got = B::softmax_last_backward(&y, &g.dev);
        let y_ref = R::softmax_last(&x.reference).unwrap();
        assert_matches::<B>("softmax backward", &got, &R::softmax_last_backward(&y_ref, &g.reference));
        finite_difference("softmax backward", &h, &x, &g.host, |t| B::softmax_last(t).unwrap(), &got.unwrap());
    }
}

/// Batched matmul with every transpose combination.
pub fn matmul<B: Backend>() {
    let mut h = Harness::<B>::default();
    let cases: [(&[usize], usize, usize, usize); 6] =
        [(&[], 1, 1, 1), (&[], 3, 7, 33), (&[], 33, 3, 1), (&[2], 7, 33, 3), (&[2, 3], 5, 4, 6), (&[], 64, 65, 63)];
    for (batch, m, k, n) in cases {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let dims = |r: usize, c: usize| [batch, &[r, c][..]].concat();
            let a = h.randn(&if ta { dims(k, m) } else { dims(m, k) }, F32);
            let b = h.randn(&if tb { dims(n, k) } else { dims(k, n) }, F32);
            let t = Transpose { a: ta, b: tb };
            let what = format!("matmul {batch:?} {m}x{k}x{n} ta={ta} tb={tb}");
            assert_matches::<B>(&what, &B::matmul(&a.dev, &b.dev, t), &R::matmul(&a.reference, &b.reference, t));
        }
    }
}

/// One convolution case: input `[n, c_in, h, w]`, weight `[c_out, c_in, kh, kw]`.
#[derive(Debug, Clone, Copy)]
struct ConvCase {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

const fn conv_case(input: [usize; 4], c_out: usize, kernel: [usize; 2], stride: usize, pad: usize) -> ConvCase {
    let [n, c_in, h, w] = input;
    let [kh, kw] = kernel;
    ConvCase { n, c_in, h, w, c_out, kh, kw, stride, pad }
}

/// Odd sizes, 1×1, rectangular kernels, stride 2, batch 1 and a batch above any thread count,
/// padding up to and beyond `k − 1` (the CPU backend's backward data runs stride-1 cases with
/// `pad < k` as a forward convolution, the others by col2im), and rows of 12 to 40 pixels with
/// 4, 9 and 17 output channels (widths and channel counts that are not multiples of a vector
/// or a register block).
const CONV_CASES: [ConvCase; 14] = [
    conv_case([1, 1, 1, 1], 1, [1, 1], 1, 0),
    conv_case([2, 3, 7, 7], 4, [3, 3], 1, 1),
    conv_case([3, 2, 8, 8], 5, [3, 3], 2, 1),
    conv_case([1, 7, 5, 9], 3, [1, 1], 1, 0),
    conv_case([4, 3, 33, 7], 2, [3, 1], 1, 0),
    conv_case([5, 4, 6, 6], 3, [2, 2], 2, 0),
    conv_case([2, 33, 4, 4], 7, [3, 3], 1, 1),
    conv_case([33, 3, 3, 3], 1, [3, 3], 1, 1),
    conv_case([2, 4, 9, 9], 6, [3, 3], 2, 1),
    conv_case([2, 3, 5, 6], 4, [3, 3], 1, 2),
    conv_case([2, 3, 4, 5], 2, [1, 1], 1, 1),
    conv_case([2, 5, 6, 40], 9, [3, 3], 1, 1),
    conv_case([1, 4, 5, 13], 4, [3, 3], 1, 1),
    conv_case([3, 2, 7, 12], 17, [3, 3], 1, 1),
];

fn conv_inputs<B: Backend>(h: &mut Harness<B>, c: ConvCase) -> (Case<B>, Case<B>, Case<B>, Conv2dParams) {
    let x = h.randn(&[c.n, c.c_in, c.h, c.w], F32);
    let w = h.randn(&[c.c_out, c.c_in, c.kh, c.kw], F32);
    let b = h.randn(&[c.c_out], F32);
    (x, w, b, Conv2dParams { stride: [c.stride, c.stride], padding: [c.pad, c.pad] })
}

/// Convolution forward, with and without bias.
pub fn conv2d_forward<B: Backend>() {
    let mut h = Harness::<B>::default();
    for c in CONV_CASES {
        let (x, w, b, p) = conv_inputs(&mut h, c);
        let what = format!("conv2d {c:?}");
        assert_matches::<B>(
            &what,
            &B::conv2d(&x.dev, &w.dev, None, p),
            &R::conv2d(&x.reference, &w.reference, None, p),
        );
        assert_matches::<B>(
            &what,
            &B::conv2d(&x.dev, &w.dev, Some(&b.dev), p),
            &R::conv2d(&x.reference, &w.reference, Some(&b.reference), p),
        );
    }
}

/// Both convolution backwards (and the bias gradient) against the reference and finite differences.
pub fn conv2d_backward<B: Backend>() {
    let mut h = Harness::<B>::default();
    for c in CONV_CASES {
        let (x, w, _, p) = conv_inputs(&mut h, c);
        let y_shape = R::shape(&R::conv2d(&x.reference, &w.reference, None, p).unwrap());
        let g = h.randn(y_shape.dims(), F32);
        let what = format!("conv2d {c:?}");
        let dx = B::conv2d_backward_data(&g.dev, &w.dev, &B::shape(&x.dev), p);
        assert_matches::<B>(
            &format!("{what} dx"),
            &dx,
            &R::conv2d_backward_data(&g.reference, &w.reference, x.reference.shape(), p),
        );
        let dw = B::conv2d_backward_weight(&x.dev, &g.dev, &B::shape(&w.dev), p);
        assert_matches::<B>(
            &format!("{what} dw"),
            &dw,
            &R::conv2d_backward_weight(&x.reference, &g.reference, w.reference.shape(), p),
        );
        finite_difference(
            &format!("{what} dx"),
            &h,
            &x,
            &g.host,
            |t| B::conv2d(t, &w.dev, None, p).unwrap(),
            &dx.unwrap(),
        );
        finite_difference(
            &format!("{what} dw"),
            &h,
            &w,
            &g.host,
            |t| B::conv2d(&x.dev, t, None, p).unwrap(),
            &dw.unwrap(),
        );
    }
}

/// Group norm, and group norm + SiLU as one op: forward, statistics and backward (input, γ,
/// β) against the reference and finite differences.
pub fn group_norm<B: Backend>() {
    let mut h = Harness::<B>::default();
    let cases: [(&[usize], usize); 6] = [
        (&[1, 1, 1, 1], 1),
        (&[2, 4, 3, 3], 2),
        (&[3, 6, 7, 1], 3),
        (&[2, 8, 33, 1], 8),
        (&[1, 32, 8, 8], 8),
        (&[5, 6], 3),
    ];
    let plain = NormOp::<B> {
        suffix: "",
        dev: B::group_norm,
        reference: R::group_norm,
        dev_backward: |x, gm, _, stats, g, p| B::group_norm_backward(x, gm, stats, g, p),
        reference_backward: |x, gm, _, stats, g, p| R::group_norm_backward(x, gm, stats, g, p),
    };
    let with_silu = NormOp::<B> {
        suffix: " + silu",
        dev: B::group_norm_silu,
        reference: R::group_norm_silu,
        dev_backward: B::group_norm_silu_backward,
        reference_backward: R::group_norm_silu_backward,
    };
    for (shape, groups) in cases {
        let p = GroupNormParams { groups, eps: 1e-5 };
        let c = shape[1];
        let (x, gamma, beta) = (h.randn(shape, F32), h.randn(&[c], F32), h.randn(&[c], F32));
        let g = h.randn(shape, F32);
        for op in [&plain, &with_silu] {
            let what = format!("group_norm {shape:?}/{groups}{}", op.suffix);
            norm_matches(&h, &what, op, (&x, &gamma, &beta), &g, p);
        }
    }
}

type NormForward<T> = fn(&T, &T, &T, GroupNormParams) -> lisa_core::Result<GroupNormOutput<T>>;
type NormBackward<T> = fn(&T, &T, &T, &GroupNormOutput<T>, &T, GroupNormParams) -> lisa_core::Result<GroupNormGrads<T>>;

/// A group-norm op of the suite, on the backend and on the reference: forward `(x, γ, β)`,
/// backward `(x, γ, β, statistics, ∂L/∂y)`.
struct NormOp<B: Backend> {
    suffix: &'static str,
    dev: NormForward<B::Tensor>,
    reference: NormForward<RefTensor>,
    dev_backward: NormBackward<B::Tensor>,
    reference_backward: NormBackward<RefTensor>,
}

/// `op`'s output, statistics and gradients against the reference, and its gradients against
/// finite differences, seeded with `∂L/∂y = g`.
fn norm_matches<B: Backend>(
    h: &Harness<B>,
    what: &str,
    op: &NormOp<B>,
    (x, gamma, beta): (&Case<B>, &Case<B>, &Case<B>),
    g: &Case<B>,
    p: GroupNormParams,
) {
    let got = ok(what, (op.dev)(&x.dev, &gamma.dev, &beta.dev, p));
    let want = (op.reference)(&x.reference, &gamma.reference, &beta.reference, p).unwrap();
    assert_matches::<B>(what, &Ok(got.output.clone()), &Ok(want.output.clone()));
    assert_matches::<B>(&format!("{what} mean"), &Ok(got.mean.clone()), &Ok(want.mean.clone()));
    assert_matches::<B>(&format!("{what} rstd"), &Ok(got.rstd.clone()), &Ok(want.rstd.clone()));
    let grads = ok(what, (op.dev_backward)(&x.dev, &gamma.dev, &beta.dev, &got, &g.dev, p));
    let want_g =
        (op.reference_backward)(&x.reference, &gamma.reference, &beta.reference, &want, &g.reference, p).unwrap();
    assert_matches::<B>(&format!("{what} dx"), &Ok(grads.input.clone()), &Ok(want_g.input));
    assert_matches::<B>(&format!("{what} dgamma"), &Ok(grads.gamma.clone()), &Ok(want_g.gamma));
    assert_matches::<B>(&format!("{what} dbeta"), &Ok(grads.beta.clone()), &Ok(want_g.beta));
    let fwd = |x: &B::Tensor, gm: &B::Tensor, bt: &B::Tensor| (op.dev)(x, gm, bt, p).unwrap().output;
    finite_difference(&format!("{what} dx"), h, x, &g.host, |t| fwd(t, &gamma.dev, &beta.dev), &grads.input);
    finite_difference(&format!("{what} dgamma"), h, gamma, &g.host, |t| fwd(&x.dev, t, &beta.dev), &grads.gamma);
    finite_difference(&format!("{what} dbeta"), h, beta, &g.host, |t| fwd(&x.dev, &gamma.dev, t), &grads.beta);
}

/// Nearest upsampling and its backward.
pub fn upsample<B: Backend>() {
    let mut h = Harness::<B>::default();
    for (shape, f) in [(&[1usize, 1, 1, 1][..], 2usize), (&[2, 3, 7, 3], 2), (&[1, 2, 3, 33], 3), (&[2, 1, 4, 4], 1)] {
        let x = h.randn(shape, F32);
        let got = ok("upsample", B::upsample_nearest(&x.dev, f));
        assert_matches::<B>("upsample", &Ok(got.clone()), &R::upsample_nearest(&x.reference, f));
        let g = h.randn(B::shape(&got).dims(), F32);
        let back = B::upsample_nearest_backward(&g.dev, f);
        assert_matches::<B>("upsample backward", &back, &R::upsample_nearest_backward(&g.reference, f));
        finite_difference("upsample backward", &h, &x, &g.host, |t| B::upsample_nearest(t, f).unwrap(), &back.unwrap());
    }
}

/// Nearest ×2 upsampling + 3×3 convolution as one op (and both its backwards) against the
/// reference's composition, finite differences, and a bad kernel refused.
pub fn upsample_conv<B: Backend>() {
    let mut h = Harness::<B>::default();
    // [n, c_in, h, w] and c_out: one pixel, odd sides, rows of 13 and 40, 17 output channels.
    let cases: [([usize; 4], usize); 5] =
        [([1, 1, 1, 1], 1), ([2, 3, 3, 5], 4), ([1, 4, 7, 13], 2), ([2, 5, 4, 40], 3), ([1, 3, 6, 6], 17)];
    for (shape, c_out) in cases {
        let (x, w, b) = (h.randn(&shape, F32), h.randn(&[c_out, shape[1], 3, 3], F32), h.randn(&[c_out], F32));
        let what = format!("upsample_conv2d {shape:?} -> {c_out}");
        let y = ok(&what, B::upsample_conv2d(&x.dev, &w.dev, Some(&b.dev)));
        let want = R::upsample_conv2d(&x.reference, &w.reference, Some(&b.reference));
        assert_matches::<B>(&what, &Ok(y.clone()), &want);
        let g = h.randn(B::shape(&y).dims(), F32);
        let dx = B::upsample_conv2d_backward_data(&g.dev, &w.dev, &B::shape(&x.dev));
        let want_dx = R::upsample_conv2d_backward_data(&g.reference, &w.reference, x.reference.shape());
        assert_matches::<B>(&format!("{what} dx"), &dx, &want_dx);
        let dw = B::upsample_conv2d_backward_weight(&x.dev, &g.dev, &B::shape(&w.dev));
        let want_dw = R::upsample_conv2d_backward_weight(&x.reference, &g.reference, w.reference.shape());
        assert_matches::<B>(&format!("{what} dw"), &dw, &want_dw);
        let fwd = |x: &B::Tensor, w: &B::Tensor| B::upsample_conv2d(x, w, None).unwrap();
        finite_difference(&format!("{what} dx"), &h, &x, &g.host, |t| fwd(t, &w.dev), &dx.unwrap());
        finite_difference(&format!("{what} dw"), &h, &w, &g.host, |t| fwd(&x.dev, t), &dw.unwrap());
    }
    let (x, w1) = (h.randn(&[1, 2, 4, 4], F32), h.randn(&[3, 2, 1, 1], F32));
    assert!(B::upsample_conv2d(&x.dev, &w1.dev, None).is_err(), "a 1×1 kernel must be refused");
    let w_bad = h.randn(&[3, 5, 3, 3], F32);
    assert!(B::upsample_conv2d(&x.dev, &w_bad.dev, None).is_err(), "mismatched input channels must be refused");
}

/// Channel concat and slice (its backward).
pub fn concat_and_slice<B: Backend>() {
    let mut h = Harness::<B>::default();
    for (n, cs, rest) in [
        (1usize, &[1usize, 1][..], &[1usize][..]),
        (3, &[7, 1, 33], &[2, 3]),
        (2, &[4, 3], &[]),
        (33, &[2, 5], &[1, 3]),
    ] {
        let parts: Vec<Case<B>> = cs.iter().map(|&c| h.randn(&[&[n, c][..], rest].concat(), F32)).collect();
        let dev: Vec<&B::Tensor> = parts.iter().map(|p| &p.dev).collect();
        let refs: Vec<&RefTensor> = parts.iter().map(|p| &p.reference).collect();
        let cat = B::concat_channels(&dev);
        assert_matches::<B>("concat", &cat, &R::concat_channels(&refs));
        let cat = cat.unwrap();
        let mut start = 0;
        for (p, &c) in parts.iter().zip(cs) {
            assert_matches::<B>("slice", &B::slice_channels(&cat, start, c), &Ok(p.reference.clone()));
            start += c;
        }
    }
}

/// The fused MSE loss.
pub fn mse_loss<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[3, 7], &[4, 3, 33, 5]] {
        let (p, y) = (h.randn(shape, F32), h.randn(shape, F32));
        let (lb, gb) = ok("mse", B::mse_loss(&p.dev, &y.dev));
        let (lr, gr) = R::mse_loss(&p.reference, &y.reference).unwrap();
        assert_values("mse value", &[lb], &[lr], backend_vs_reference(F32));
        assert_matches::<B>("mse grad", &Ok(gb), &Ok(gr));
    }
}

/// The fused LISA target + loss + backward, for both distances and a weighting.
pub fn lisa_loss<B: Backend>() {
    let mut h = Harness::<B>::default();
    let configs = [
        LisaConfig::default(),
        LisaConfig { distance: Distance::Cosine, lambda: 0.5, ..LisaConfig::default() },
        LisaConfig { weighting: Weighting::MinSnr { gamma: 5.0 }, ..LisaConfig::default() },
    ];
    for shape in [&[1usize, 1, 1, 1][..], &[3, 3, 7, 7], &[2, 3, 33, 1]] {
        let b = shape[0];
        let terms: Vec<SampleTerms<f32>> =
            (0..b).map(|i| SampleTerms { target_scale: 1.0 + i as f32 * 0.5, weight: 0.25 + i as f32 }).collect();
        let (d, y, prior) = (h.randn(shape, F32), h.randn(shape, F32), h.randn(shape, F32));
        for cfg in &configs {
            let (lb, gb) = ok("lisa", B::lisa_loss(cfg, &terms, &d.dev, &y.dev, &prior.dev));
            let (lr, gr) = R::lisa_loss(cfg, &terms, &d.reference, &y.reference, &prior.reference).unwrap();
            assert_values(
                "lisa value",
                &[lb.weighted, lb.distance, lb.zero_distance],
                &[lr.weighted, lr.distance, lr.zero_distance],
                backend_vs_reference(F32),
            );
            assert_matches::<B>("lisa grad", &Ok(gb.clone()), &Ok(gr));
            // ∂L/∂decoded against finite differences of the backend's own loss.
            let loss_of = |t: &B::Tensor| {
                let (l, _) = B::lisa_loss(cfg, &terms, t, &y.dev, &prior.dev).unwrap();
                B::full(&Shape::scalar(), l.weighted, F32, &h.device).unwrap()
            };
            finite_difference("lisa grad", &h, &d, &[1.0], loss_of, &gb);
        }
    }
}

/// Several AdamW steps in place against the reference.
pub fn adamw<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[33, 7], &[100_003]] {
        let p0 = h.randn(shape, F32);
        let (mut p, mut m, mut v) = (p0.dev.clone(), B::zeros_like(&p0.dev).unwrap(), B::zeros_like(&p0.dev).unwrap());
        let (mut pr, mut mr, mut vr) =
            (p0.reference.clone(), R::zeros_like(&p0.reference).unwrap(), R::zeros_like(&p0.reference).unwrap());
        for step in 1..=3u64 {
            let g = h.randn(shape, F32);
            let hp = AdamWParams { lr: 1e-2, step, ..AdamWParams::default() };
            ok("adamw", B::adamw_update(&mut p, &mut m, &mut v, &g.dev, &hp));
            R::adamw_update(&mut pr, &mut mr, &mut vr, &g.reference, &hp).unwrap();
        }
        assert_matches::<B>("adamw param", &Ok(p), &Ok(pr));
        assert_matches::<B>("adamw m", &Ok(m), &Ok(mr));
        assert_matches::<B>("adamw v", &Ok(v), &Ok(vr));
    }
}

/// f16/bf16 storage where the backend supports it: ops round their outputs like the reference.
pub fn half_precision<B: Backend>() {
    let mut h = Harness::<B>::default();
    for dtype in [DType::F16, DType::BF16] {
        if !B::supports_dtype(&h.device, dtype) {
            let s = Shape::new([2]);
            let refused = B::from_slice(&[1.0, 2.0], &s, dtype, &h.device);
            assert!(
                matches!(refused, Err(Error::UnsupportedDType { .. })),
                "{dtype} unsupported must be a typed error"
            );
            continue;
        }
        let (x, y) = (h.randn(&[2, 3, 7, 7], dtype), h.randn(&[2, 3, 7, 7], dtype));
        assert_matches::<B>("half add", &B::add(&x.dev, &y.dev), &R::add(&x.reference, &y.reference));
        assert_matches::<B>("half silu", &B::silu(&x.dev), &R::silu(&x.reference));
        let w = h.randn(&[4, 3, 3, 3], dtype);
        let p = Conv2dParams::same(3);
        assert_matches::<B>(
            "half conv",
            &B::conv2d(&x.dev, &w.dev, None, p),
            &R::conv2d(&x.reference, &w.reference, None, p),
        );
        let f = h.randn(&[2, 3, 7, 7], F32);
        assert!(matches!(B::add(&x.dev, &f.dev), Err(Error::DTypeMismatch { .. })), "{dtype} + f32 must be refused");
    }
}

/// The backend rejects what the reference rejects, with the same error kind.
pub fn bad_inputs_are_typed_errors<B: Backend>() {
    let mut h = Harness::<B>::default();
    let x = h.randn(&[1, 3, 4, 4], F32);
    let w_bad = h.randn(&[2, 5, 3, 3], F32);
    let big_k = h.randn(&[2, 3, 9, 9], F32);
    let p = Conv2dParams::same(3);
    let zero_stride = Conv2dParams { stride: [0, 1], padding: [0, 0] };
    assert_matches::<B>(
        "conv channels",
        &B::conv2d(&x.dev, &w_bad.dev, None, p),
        &R::conv2d(&x.reference, &w_bad.reference, None, p),
    );
    let p1 = Conv2dParams::same(1);
    assert_matches::<B>(
        "conv kernel too big",
        &B::conv2d(&x.dev, &big_k.dev, None, p1),
        &R::conv2d(&x.reference, &big_k.reference, None, p1),
    );
    assert_matches::<B>(
        "conv zero stride",
        &B::conv2d(&x.dev, &big_k.dev, None, zero_stride),
        &R::conv2d(&x.reference, &big_k.reference, None, zero_stride),
    );
    let bad_grad = h.randn(&[1, 2, 3, 3], F32);
    let w = h.randn(&[2, 3, 3, 3], F32);
    assert_matches::<B>(
        "conv dx grad shape",
        &B::conv2d_backward_data(&bad_grad.dev, &w.dev, &B::shape(&x.dev), p),
        &R::conv2d_backward_data(&bad_grad.reference, &w.reference, x.reference.shape(), p),
    );
    let (a, b) = (h.randn(&[2, 3], F32), h.randn(&[4, 3], F32));
    assert_matches::<B>("add shapes", &B::add(&a.dev, &b.dev), &R::add(&a.reference, &b.reference));
    assert_matches::<B>(
        "matmul shapes",
        &B::matmul(&a.dev, &b.dev, Transpose::default()),
        &R::matmul(&a.reference, &b.reference, Transpose::default()),
    );
    let five = Shape::new([5]);
    assert_matches::<B>("reshape count", &B::reshape(&x.dev, &five), &R::reshape(&x.reference, &five));
    let huge = Shape::new([usize::MAX, 3]);
    assert!(matches!(B::zeros(&huge, F32, &h.device), Err(Error::SizeOverflow { .. })));
    assert!(matches!(B::from_slice(&[1.0; 3], &Shape::new([2, 2]), F32, &h.device), Err(Error::LengthMismatch { .. })));
    assert!(matches!(B::concat_channels(&[]), Err(Error::Empty { .. })));
    assert_matches::<B>("slice range", &B::slice_channels(&x.dev, 2, 2), &R::slice_channels(&x.reference, 2, 2));
    let (g3, b3) = (h.randn(&[3], F32), h.randn(&[3], F32));
    let gn = GroupNormParams { groups: 2, eps: 1e-5 };
    let got = B::group_norm(&x.dev, &g3.dev, &b3.dev, gn).map(|o| o.output);
    let want = R::group_norm(&x.reference, &g3.reference, &b3.reference, gn).map(|o| o.output);
    assert_matches::<B>("group norm groups", &got, &want);
    let odd = h.randn(&[1, 1, 3, 3], F32);
    assert_matches::<B>(
        "upsample backward size",
        &B::upsample_nearest_backward(&odd.dev, 2),
        &R::upsample_nearest_backward(&odd.reference, 2),
    );
    let (l3, l4) = (h.randn(&[3], F32), h.randn(&[4], F32));
    assert!(matches!(B::mse_loss(&l3.dev, &l4.dev), Err(Error::ShapeMismatch { .. })));
    let nan = h.from_host(vec![f32::NAN; 3], &Shape::new([3]), F32);
    assert!(matches!(B::mse_loss(&nan.dev, &l3.dev), Err(Error::NonFinite { .. })));
    let terms = [SampleTerms::<f32>::unit(); 2];
    let lisa = B::lisa_loss(&LisaConfig::default(), &terms, &l3.dev, &l3.dev, &l3.dev);
    assert!(matches!(lisa, Err(Error::InvalidArgument { .. })), "3 elements over 2 samples");
    let bad_lambda = LisaConfig { lambda: -1.0, ..LisaConfig::default() };
    assert!(B::lisa_loss(&bad_lambda, &terms[..1], &l3.dev, &l3.dev, &l3.dev).is_err());
    let (mut pm, mut mm, mut vm) = (l3.dev.clone(), l3.dev.clone(), l3.dev.clone());
    let bad_hp = AdamWParams { step: 0, ..AdamWParams::default() };
    assert!(B::adamw_update(&mut pm, &mut mm, &mut vm, &l3.dev, &bad_hp).is_err());
    assert!(matches!(
        B::adamw_update(&mut pm, &mut mm, &mut vm, &l4.dev, &AdamWParams::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    let _: Tolerance = backend_vs_reference(F32);
}

/// NaN is never swallowed: elementwise ops, reductions and the fused losses carry it through
/// (or refuse it with [`Error::NonFinite`]), so a diverged step cannot pass unnoticed.
pub fn nan_propagates<B: Backend>() {
    let h = Harness::<B>::default();
    let x = h.from_host(vec![1.0, f32::NAN, -2.0], &Shape::new([1, 3]), F32);
    for op in [UnaryOp::Silu, UnaryOp::Exp, UnaryOp::Square] {
        let y = ok("unary", B::to_vec(&ok("unary", B::unary(op, &x.dev))));
        assert!(y[1].is_nan(), "{op:?}(NaN) must be NaN, got {}", y[1]);
    }
    assert!(ok("sum", B::item(&ok("sum", B::sum(&x.dev)))).is_nan(), "sum with a NaN must be NaN");
    assert!(ok("softmax", B::to_vec(&ok("softmax", B::softmax_last(&x.dev)))).iter().all(|v| v.is_nan()));
    let terms = [SampleTerms::<f32>::unit()];
    assert!(matches!(
        B::lisa_loss(&LisaConfig::default(), &terms, &x.dev, &x.dev, &x.dev),
        Err(Error::NonFinite { .. })
    ));
}
