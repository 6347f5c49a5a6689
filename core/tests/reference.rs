//! The reference backend: backward ops against finite differences, adjoint identities,
//! the counter-based RNG, and typed errors for bad input.

mod common;

use common::{assert_close, central_difference};
use lisa_core::backend::{
    ArithOps, Conv2dParams, ConvOps, DType, FusedOps, GroupNormParams, LayoutOps, MatmulOps, NormOps, ReduceOps, Shape,
    TensorOps, Transpose, UnaryOp,
};
use lisa_core::reference::{RefBackend as R, RefDevice, RefTensor};
use lisa_core::rng::{fill_normal, normal_at, philox4x32_10};
use lisa_core::tolerance::{F32_FINITE_DIFFERENCE, FD_STEP_F32, backend_vs_reference};
use lisa_core::{Error, LisaConfig};

fn t(data: &[f32], shape: impl Into<Shape>) -> RefTensor {
    R::from_slice(data, &shape.into(), DType::F32, &RefDevice).unwrap()
}

fn randn(shape: impl Into<Shape>, seed: u64) -> RefTensor {
    R::random_normal(&shape.into(), seed, DType::F32, &RefDevice).unwrap()
}

fn f64s(x: &RefTensor) -> Vec<f64> {
    x.data().iter().map(|&v| v as f64).collect()
}

/// Checks `backward(x, r)` = ∇ₓ ⟨r, f(x)⟩ by central differences, with `r` a random cotangent.
fn check_grad(
    name: &str,
    x: &RefTensor,
    f: impl Fn(&RefTensor) -> RefTensor,
    backward: impl Fn(&RefTensor, &RefTensor) -> RefTensor,
) {
    let y = f(x);
    let r = randn(y.shape().clone(), 99);
    let analytic = f64s(&backward(x, &r));
    let numeric = central_difference(&f64s(x), FD_STEP_F32, |xv| {
        let xv: Vec<f32> = xv.iter().map(|&v| v as f32).collect();
        let y = f(&t(&xv, x.shape().clone()));
        y.data().iter().zip(r.data()).map(|(&a, &b)| a as f64 * b as f64).sum()
    });
    assert_close(name, &analytic, &numeric, F32_FINITE_DIFFERENCE);
}

#[test]
fn conv2d_backwards_match_finite_differences() {
    for (stride, pad, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 2)] {
        let p = Conv2dParams { stride: [stride, stride], padding: [pad, pad] };
        let x = randn([2, 3, 5, 7], 1);
        let w = randn([4, 3, k, k], 2);
        let wd = w.clone();
        check_grad(
            "conv dx",
            &x,
            |x| R::conv2d(x, &wd, None, p).unwrap(),
            |x, g| R::conv2d_backward_data(g, &wd, x.shape(), p).unwrap(),
        );
        let xd = x.clone();
        check_grad(
            "conv dw",
            &w,
            |w| R::conv2d(&xd, w, None, p).unwrap(),
            |w, g| R::conv2d_backward_weight(&xd, g, w.shape(), p).unwrap(),
        );
        let b = randn([4], 3);
        check_grad(
            "conv db",
            &b,
            |b| R::conv2d(&xd, &wd, Some(b), p).unwrap(),
            |_, g| R::conv2d_backward_bias(g).unwrap(),
        );
    }
}

#[test]
fn group_norm_backward_matches_finite_differences() {
    let p = GroupNormParams { groups: 2, eps: 1e-5 };
    let x = randn([2, 4, 3, 3], 4);
    let (gamma, beta) = (randn([4], 5), randn([4], 6));
    let fwd = |x: &RefTensor, g: &RefTensor, b: &RefTensor| R::group_norm(x, g, b, p).unwrap();
    let grads = |x: &RefTensor, g: &RefTensor, cot: &RefTensor| {
        let stats = fwd(x, g, &beta);
        R::group_norm_backward(x, g, &stats, cot, p).unwrap()
    };
    check_grad("gn dx", &x, |x| fwd(x, &gamma, &beta).output, |x, c| grads(x, &gamma, c).input);
    check_grad("gn dgamma", &gamma, |g| fwd(&x, g, &beta).output, |g, c| grads(&x, g, c).gamma);
    check_grad("gn dbeta", &beta, |b| fwd(&x, &gamma, b).output, |_, c| grads(&x, &gamma, c).beta);
}

#[test]
fn elementwise_softmax_and_resampling_backwards() {
    let x = randn([2, 3, 4, 4], 7);
    for op in [UnaryOp::Silu, UnaryOp::Exp, UnaryOp::Square] {
        check_grad("unary", &x, |x| R::unary(op, x).unwrap(), |x, g| R::unary_backward(op, x, g).unwrap());
    }
    let pos = R::affine(&R::unary(UnaryOp::Square, &x).unwrap(), 1.0, 0.5).unwrap();
    check_grad(
        "sqrt",
        &pos,
        |x| R::unary(UnaryOp::Sqrt, x).unwrap(),
        |x, g| R::unary_backward(UnaryOp::Sqrt, x, g).unwrap(),
    );
    check_grad(
        "softmax",
        &x,
        |x| R::softmax_last(x).unwrap(),
        |x, g| R::softmax_last_backward(&R::softmax_last(x).unwrap(), g).unwrap(),
    );
    check_grad(
        "upsample",
        &x,
        |x| R::upsample_nearest(x, 2).unwrap(),
        |_, g| R::upsample_nearest_backward(g, 2).unwrap(),
    );
}

#[test]
fn broadcast_and_sum_to_shape_are_adjoint() {
    // ⟨broadcast(a), g⟩ = ⟨a, sum_to_shape(g)⟩ for every broadcastable pair.
    for (small, big) in [
        (vec![4], vec![2, 3, 4]),
        (vec![3, 1], vec![2, 3, 4]),
        (vec![1, 3, 1, 1], vec![2, 3, 5, 5]),
        (vec![], vec![2, 2]),
    ] {
        let a = randn(small.clone(), 8);
        let g = randn(big.clone(), 9);
        let zeros = R::zeros(&Shape::new(big.clone()), DType::F32, &RefDevice).unwrap();
        let bcast = R::add(&zeros, &a).unwrap();
        assert_eq!(bcast.shape().dims(), &big[..]);
        let lhs: f64 = bcast.data().iter().zip(g.data()).map(|(&x, &y)| x as f64 * y as f64).sum();
        let summed = R::sum_to_shape(&g, &Shape::new(small)).unwrap();
        let rhs: f64 = a.data().iter().zip(summed.data()).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    }
    let a = t(&[1.0, 2.0, 3.0], [3, 1]);
    let b = t(&[10.0, 20.0], [2]);
    assert_eq!(R::add(&a, &b).unwrap().data(), &[11.0, 21.0, 12.0, 22.0, 13.0, 23.0]);
}

#[test]
fn matmul_transposes_agree() {
    let a = randn([2, 3, 4], 10);
    let b = randn([2, 4, 5], 11);
    let plain = R::matmul(&a, &b, Transpose::default()).unwrap();
    assert_eq!(plain.shape().dims(), &[2, 3, 5]);
    // Transpose by hand and ask the op to undo it.
    let tr = |x: &RefTensor| {
        let d = x.shape().dims().to_vec();
        let (bn, m, n) = (d[0], d[1], d[2]);
        let mut out = vec![0.0; x.data().len()];
        for b in 0..bn {
            for i in 0..m {
                for j in 0..n {
                    out[b * m * n + j * m + i] = x.data()[b * m * n + i * n + j];
                }
            }
        }
        t(&out, [bn, n, m])
    };
    let both = R::matmul(&tr(&a), &tr(&b), Transpose { a: true, b: true }).unwrap();
    assert_close("matmul ᵀᵀ", &f64s(&both), &f64s(&plain), backend_vs_reference(DType::F32));
    let x = t(&[1.0, 2.0, 3.0, 4.0], [2, 2]);
    let id = t(&[1.0, 0.0, 0.0, 1.0], [2, 2]);
    assert_eq!(R::matmul(&x, &id, Transpose::default()).unwrap().data(), x.data());
}

#[test]
fn concat_and_slice_are_inverse() {
    let a = randn([2, 3, 2, 2], 12);
    let b = randn([2, 5, 2, 2], 13);
    let c = R::concat_channels(&[&a, &b]).unwrap();
    assert_eq!(c.shape().dims(), &[2, 8, 2, 2]);
    assert_eq!(R::slice_channels(&c, 0, 3).unwrap(), a);
    assert_eq!(R::slice_channels(&c, 3, 5).unwrap(), b);
}

#[test]
fn philox_known_answers_and_normal_stream() {
    // Random123 known-answer vectors for Philox4x32-10.
    assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
    assert_eq!(
        philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
    let n = 100_000;
    let z = randn([n], 42);
    let mean = z.data().iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = z.data().iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean}, var {var}");
    assert_eq!(randn([n], 42), z, "same seed, same stream");
    assert_ne!(randn([8], 43).data(), &z.data()[..8]);
    // Any window of the stream equals the elementwise definition.
    let mut window = [0.0f32; 9];
    fill_normal(42, 5, &mut window);
    for (i, &v) in window.iter().enumerate() {
        assert_eq!(v, normal_at::<f32>(42, 5 + i as u64));
        assert_eq!(v, z.data()[5 + i]);
    }
}

#[test]
fn fused_defaults_match_slice_math() {
    let (d, y, prior) = (randn([2, 3, 4, 4], 20), randn([2, 3, 4, 4], 21), randn([2, 3, 4, 4], 22));
    let terms = [lisa_core::lisa::SampleTerms::unit(); 2];
    let (loss, grad) = R::lisa_loss(&LisaConfig::default(), &terms, &d, &y, &prior).unwrap();
    let tau = R::sub(&y, &prior).unwrap();
    let (mse, mse_grad) = R::mse_loss(&d, &tau).unwrap();
    assert!((loss.weighted - 0.2 * mse).abs() < 1e-5, "{} vs {}", loss.weighted, 0.2 * mse);
    assert_close(
        "lisa grad",
        &f64s(&grad),
        &f64s(&R::scale(&mse_grad, 0.2).unwrap()),
        backend_vs_reference(DType::F32),
    );
}

#[test]
fn adamw_first_step_moves_by_lr() {
    // At step 1, m̂ = g and v̂ = g², so each weight moves by ≈ lr·sign(g) plus decay.
    let mut p = t(&[1.0, -1.0, 0.5], [3]);
    let (mut m, mut v) = (R::zeros_like(&p).unwrap(), R::zeros_like(&p).unwrap());
    let g = t(&[0.3, -2.0, 1e-3], [3]);
    let hp = lisa_core::backend::AdamWParams { lr: 0.1, weight_decay: 0.0, ..Default::default() };
    R::adamw_update(&mut p, &mut m, &mut v, &g, &hp).unwrap();
    let want = [0.9, -0.9, 0.4];
    for (a, b) in p.data().iter().zip(want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let bad = lisa_core::backend::AdamWParams { step: 0, ..hp };
    assert!(matches!(R::adamw_update(&mut p, &mut m, &mut v, &g, &bad), Err(Error::InvalidArgument { .. })));
}

#[test]
fn f16_storage_rounds_and_dtypes_must_match() {
    let x = R::from_slice(&[1.0 + 1e-4, 2.0], &Shape::new([2]), DType::F16, &RefDevice).unwrap();
    assert_eq!(R::to_vec(&x).unwrap(), vec![1.0, 2.0], "f16 has no 1 + 1e-4");
    let y = t(&[1.0, 2.0], [2]);
    assert!(matches!(R::add(&x, &y), Err(Error::DTypeMismatch { .. })));
    assert_eq!(R::dtype(&R::cast(&y, DType::BF16).unwrap()), DType::BF16);
}

#[test]
fn bad_shapes_are_typed_errors_not_panics() {
    let x = randn([1, 3, 4, 4], 30);
    let w = randn([2, 5, 3, 3], 31);
    assert!(matches!(R::conv2d(&x, &w, None, Conv2dParams::same(3)), Err(Error::ShapeMismatch { .. })));
    let big_kernel = randn([2, 3, 9, 9], 32);
    assert!(matches!(R::conv2d(&x, &big_kernel, None, Conv2dParams::same(1)), Err(Error::InvalidArgument { .. })));
    let zero_stride = Conv2dParams { stride: [0, 1], padding: [0, 0] };
    assert!(matches!(R::conv2d(&x, &randn([2, 3, 1, 1], 1), None, zero_stride), Err(Error::InvalidArgument { .. })));
    assert!(matches!(R::add(&randn([2, 3], 1), &randn([4, 3], 2)), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        R::matmul(&randn([2, 3], 1), &randn([4, 3], 2), Transpose::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(R::reshape(&x, &Shape::new([5])), Err(Error::LengthMismatch { .. })));
    assert!(matches!(
        R::from_slice(&[1.0; 3], &Shape::new([2, 2]), DType::F32, &RefDevice),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(R::zeros(&Shape::new([usize::MAX, 3]), DType::F32, &RefDevice), Err(Error::SizeOverflow { .. })));
    assert!(matches!(R::concat_channels(&[]), Err(Error::Empty { .. })));
    assert!(matches!(R::slice_channels(&x, 2, 2), Err(Error::InvalidArgument { .. })));
    let gn = GroupNormParams { groups: 2, eps: 1e-5 };
    assert!(matches!(R::group_norm(&x, &randn([3], 1), &randn([3], 2), gn), Err(Error::InvalidArgument { .. })));
    assert!(matches!(R::mean(&randn([0], 1)), Err(Error::Empty { .. })));
    assert!(matches!(R::upsample_nearest_backward(&randn([1, 1, 3, 3], 1), 2), Err(Error::InvalidArgument { .. })));
    assert!(matches!(R::mse_loss(&randn([3], 1), &randn([4], 1)), Err(Error::ShapeMismatch { .. })));
}
