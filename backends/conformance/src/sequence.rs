//! Conformance checks of the transformer ops: GELU family, permute, narrow/concat along any
//! axis, broadcast matmul, layer norm, scaled dot-product attention. Where the reference
//! backend composes an op from others (layer norm, attention), the check also compares with
//! a plain host computation in `f64`, so the composition itself is pinned.

use lisa_core::backend::prelude::*;
use lisa_core::backend::{
    AttentionParams, Backend, DType, Shape, Transpose, UnaryOp, attention_backward_chunked, attention_chunked,
};
use lisa_core::reference::{RefBackend as R, RefTensor};
use lisa_core::tolerance::backend_vs_reference;
use lisa_core::{Error, Result};

use crate::harness::{Case, Harness, assert_matches, assert_values, finite_difference, ok};

const F32: DType = DType::F32;

/// The GELU family (erf, tanh, quick) forward and backward, against the reference and
/// finite differences, over a range that reaches the tails.
pub fn gelu_family<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize][..], &[3, 33], &[2, 3, 7, 7]] {
        let x0 = h.randn(shape, F32);
        let x = h.from_host(x0.host.iter().map(|v| 3.0 * v).collect(), &Shape::new(shape), F32);
        let g = h.randn(shape, F32);
        for op in [UnaryOp::Gelu, UnaryOp::GeluTanh, UnaryOp::QuickGelu] {
            assert_matches::<B>(&format!("{op:?}"), &B::unary(op, &x.dev), &R::unary(op, &x.reference));
            let back = B::unary_backward(op, &x.dev, &g.dev);
            assert_matches::<B>(&format!("{op:?} backward"), &back, &R::unary_backward(op, &x.reference, &g.reference));
            finite_difference(
                &format!("{op:?} backward"),
                &h,
                &x,
                &g.host,
                |t| B::unary(op, t).unwrap(),
                &back.unwrap(),
            );
        }
    }
    // Known values: torch.nn.functional.gelu(x) and approximate="tanh", x = −2, 0.5, 3.
    let x = h.from_host(vec![-2.0, 0.5, 3.0], &Shape::new([3]), F32);
    let gelu = ok("gelu", B::to_vec(&ok("gelu", B::unary(UnaryOp::Gelu, &x.dev))));
    assert_values("gelu known values", &gelu, &[-0.045_500_26, 0.345_731_14, 2.995_950_4], backend_vs_reference(F32));
    let tanh = ok("gelu tanh", B::to_vec(&ok("gelu tanh", B::unary(UnaryOp::GeluTanh, &x.dev))));
    assert_values(
        "gelu tanh known values",
        &tanh,
        &[-0.045_402_3, 0.345_714_3, 2.996_362_7],
        backend_vs_reference(F32),
    );
}

/// Permutations of ranks 1–4, their inverse (the backward), and bad axes.
pub fn permute<B: Backend>() {
    let mut h = Harness::<B>::default();
    let cases: [(&[usize], &[usize]); 6] = [
        (&[7], &[0]),
        (&[3, 7], &[1, 0]),
        (&[2, 3, 33], &[2, 0, 1]),
        (&[2, 3, 4, 5], &[0, 2, 1, 3]),
        (&[2, 3, 4, 5], &[3, 2, 1, 0]),
        (&[1, 5, 1, 3], &[0, 2, 3, 1]),
    ];
    for (shape, axes) in cases {
        let x = h.randn(shape, F32);
        let what = format!("permute {shape:?} by {axes:?}");
        let y = B::permute(&x.dev, axes);
        assert_matches::<B>(&what, &y, &R::permute(&x.reference, axes));
        let back = B::permute(&y.unwrap(), &lisa_core::backend::geometry::inverse_permutation(axes));
        assert_matches::<B>(&format!("{what} and back"), &back, &Ok(x.reference.clone()));
    }
    let x = h.randn(&[2, 3, 4], F32);
    for bad in [&[0usize, 1][..], &[0, 1, 1], &[0, 1, 3], &[0, 1, 2, 3]] {
        assert!(matches!(B::permute(&x.dev, bad), Err(Error::InvalidArgument { .. })), "permute by {bad:?}");
    }
}

/// Narrowing and concatenation along every axis (GEGLU's split and its backward).
pub fn narrow_and_concat<B: Backend>() {
    let mut h = Harness::<B>::default();
    let x = h.randn(&[2, 3, 8], F32);
    for (axis, start, len) in [(0usize, 1usize, 1usize), (1, 0, 2), (2, 4, 4), (2, 0, 1)] {
        let what = format!("narrow axis {axis} {start}+{len}");
        assert_matches::<B>(&what, &B::narrow(&x.dev, axis, start, len), &R::narrow(&x.reference, axis, start, len));
        let rest = x.reference.shape().dims()[axis] - start - len;
        let mut parts = Vec::new();
        for (s, l) in [(0, start), (start, len), (start + len, rest)] {
            if l > 0 {
                parts.push(ok(&what, B::narrow(&x.dev, axis, s, l)));
            }
        }
        let refs: Vec<&B::Tensor> = parts.iter().collect();
        assert_matches::<B>(&format!("{what} rejoined"), &B::concat(&refs, axis), &Ok(x.reference.clone()));
    }
    assert!(matches!(B::narrow(&x.dev, 3, 0, 1), Err(Error::InvalidArgument { .. })), "axis out of range");
    assert!(matches!(B::narrow(&x.dev, 2, 6, 3), Err(Error::InvalidArgument { .. })), "range past the end");
    let y = h.randn(&[2, 4, 8], F32);
    assert!(B::concat(&[&x.dev, &y.dev], 2).is_err(), "concat of unequal other dims");
    // Zero padding of the last two dims (the VAE's asymmetric (0, 1, 0, 1)), against a host
    // computation, and cropped back.
    let img = h.randn(&[2, 3, 4, 5], F32);
    for pad in [[0usize, 1, 0, 1], [2, 0, 1, 3], [0, 0, 0, 0]] {
        let got = ok("pad", B::pad_spatial(&img.dev, pad));
        let (hh, ww) = (4 + pad[0] + pad[1], 5 + pad[2] + pad[3]);
        let mut want = vec![0.0f32; 6 * hh * ww];
        for plane in 0..6 {
            for i in 0..4 {
                for j in 0..5 {
                    want[plane * hh * ww + (i + pad[0]) * ww + j + pad[2]] = img.host[plane * 20 + i * 5 + j];
                }
            }
        }
        assert_values(&format!("pad {pad:?}"), &ok("pad", B::to_vec(&got)), &want, backend_vs_reference(F32));
        let cropped = B::narrow(&ok("crop", B::narrow(&got, 2, pad[0], 4)), 3, pad[2], 5);
        assert_matches::<B>(&format!("pad {pad:?} cropped back"), &cropped, &Ok(img.reference.clone()));
    }
    assert!(B::pad_spatial(&h.randn(&[3], F32).dev, [1, 1, 1, 1]).is_err(), "padding a rank-1 tensor");
}

/// Matmul with broadcast leading dims, against the reference and a host loop.
pub fn matmul_broadcast<B: Backend>() {
    let mut h = Harness::<B>::default();
    let cases: [(&[usize], &[usize]); 4] =
        [(&[2, 3, 5, 4], &[4, 6]), (&[1, 3, 5, 4], &[2, 1, 4, 6]), (&[5, 4], &[3, 4, 2]), (&[2, 5, 4], &[2, 4, 6])];
    for (sa, sb) in cases {
        let (a, b) = (h.randn(sa, F32), h.randn(sb, F32));
        let what = format!("matmul_broadcast {sa:?} x {sb:?}");
        let got = B::matmul_broadcast(&a.dev, &b.dev, Transpose::default());
        assert_matches::<B>(&what, &got, &R::matmul_broadcast(&a.reference, &b.reference, Transpose::default()));
        // Host: every output row from the broadcast operands.
        let lead = lisa_core::backend::broadcast_leading("test", &Shape::new(sa), &Shape::new(sb)).unwrap();
        let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let la = Shape::new(&sa[..sa.len() - 2]).broadcast_strides(&lead);
        let lb = Shape::new(&sb[..sb.len() - 2]).broadcast_strides(&lead);
        let mut want = Vec::new();
        let count = lead.num_elements().unwrap();
        for flat in 0..count {
            let (mut rem, mut oa, mut ob) = (flat, 0, 0);
            for d in (0..lead.rank()).rev() {
                let c = rem % lead.dims()[d];
                rem /= lead.dims()[d];
                oa += c * la[d];
                ob += c * lb[d];
            }
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k)
                        .map(|p| a.host[oa * m * k + i * k + p] as f64 * b.host[ob * k * n + p * n + j] as f64)
                        .sum();
                    want.push(s as f32);
                }
            }
        }
        assert_values(
            &format!("{what} vs host"),
            &ok(&what, B::to_vec(&got.unwrap())),
            &want,
            backend_vs_reference(F32),
        );
    }
    let (a, b) = (h.randn(&[2, 5, 4], F32), h.randn(&[3, 4, 6], F32));
    assert!(B::matmul_broadcast(&a.dev, &b.dev, Transpose::default()).is_err(), "leading dims 2 vs 3");
}

/// Layer norm forward (against a host computation) and backward (against the reference and
/// finite differences of the backend's own forward).
pub fn layer_norm<B: Backend>() {
    let mut h = Harness::<B>::default();
    for shape in [&[1usize, 1][..], &[3, 7], &[2, 5, 33], &[1, 4, 2, 16]] {
        let c = *shape.last().unwrap();
        let (x, gamma, beta) = (h.randn(shape, F32), h.randn(&[c], F32), h.randn(&[c], F32));
        let eps = 1e-5;
        let what = format!("layer_norm {shape:?}");
        let got = ok(&what, B::layer_norm(&x.dev, &gamma.dev, &beta.dev, eps));
        let mut want = Vec::new();
        for row in x.host.chunks(c) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for (i, &v) in row.iter().enumerate() {
                want.push(((v as f64 - mean) * rstd * gamma.host[i] as f64 + beta.host[i] as f64) as f32);
            }
        }
        assert_values(&format!("{what} vs host"), &ok(&what, B::to_vec(&got.output)), &want, backend_vs_reference(F32));
        let g = h.randn(shape, F32);
        let grads = ok(&what, B::layer_norm_backward(&x.dev, &gamma.dev, &got, &g.dev, eps));
        let want_stats = R::layer_norm(&x.reference, &gamma.reference, &beta.reference, eps).unwrap();
        let want_g = R::layer_norm_backward(&x.reference, &gamma.reference, &want_stats, &g.reference, eps).unwrap();
        assert_matches::<B>(&format!("{what} dx"), &Ok(grads.input.clone()), &Ok(want_g.input));
        assert_matches::<B>(&format!("{what} dgamma"), &Ok(grads.gamma.clone()), &Ok(want_g.gamma));
        assert_matches::<B>(&format!("{what} dbeta"), &Ok(grads.beta.clone()), &Ok(want_g.beta));
        let fwd = |x: &B::Tensor, gm: &B::Tensor, bt: &B::Tensor| B::layer_norm(x, gm, bt, eps).unwrap().output;
        finite_difference(&format!("{what} dx"), &h, &x, &g.host, |t| fwd(t, &gamma.dev, &beta.dev), &grads.input);
        finite_difference(&format!("{what} dgamma"), &h, &gamma, &g.host, |t| fwd(&x.dev, t, &beta.dev), &grads.gamma);
        finite_difference(&format!("{what} dbeta"), &h, &beta, &g.host, |t| fwd(&x.dev, &gamma.dev, t), &grads.beta);
    }
    // Half storage (mixed precision): forward and backward in the input's dtype.
    for dtype in [DType::F16, DType::BF16] {
        if !B::supports_dtype(&h.device, dtype) {
            continue;
        }
        let (x, gamma, beta, g) =
            (h.randn(&[3, 16], dtype), h.randn(&[16], dtype), h.randn(&[16], dtype), h.randn(&[3, 16], dtype));
        let got = ok("half layer_norm", B::layer_norm(&x.dev, &gamma.dev, &beta.dev, 1e-5));
        let want = R::layer_norm(&x.reference, &gamma.reference, &beta.reference, 1e-5).unwrap();
        assert_matches::<B>(&format!("{dtype} layer_norm"), &Ok(got.output.clone()), &Ok(want.output.clone()));
        let grads = ok("half layer_norm backward", B::layer_norm_backward(&x.dev, &gamma.dev, &got, &g.dev, 1e-5));
        let want_g = R::layer_norm_backward(&x.reference, &gamma.reference, &want, &g.reference, 1e-5).unwrap();
        assert_matches::<B>(&format!("{dtype} layer_norm dx"), &Ok(grads.input), &Ok(want_g.input));
    }
    let (x, gamma) = (h.randn(&[2, 4], F32), h.randn(&[3], F32));
    assert!(matches!(B::layer_norm(&x.dev, &gamma.dev, &gamma.dev, 1e-5), Err(Error::ShapeMismatch { .. })));
}

/// `softmax(s·QKᵀ + M)·V` and each row's log-sum-exp `ln Σ_j e^{s·q·k_j}` on the host, in
/// `f64` (`M`: causal mask when asked for): `([g, t_q, d_v], [g, t_q])`.
fn host_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (g, tq, tk, d, dv): (usize, usize, usize, usize, usize),
    p: AttentionParams,
) -> (Vec<f32>, Vec<f32>) {
    let mut out = Vec::with_capacity(g * tq * dv);
    let mut lse = Vec::with_capacity(g * tq);
    for gi in 0..g {
        for i in 0..tq {
            // Causal: keys after the query are left out of the softmax.
            let visible = if p.causal { i + 1 } else { tk };
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let dot: f64 =
                        (0..d).map(|c| q[(gi * tq + i) * d + c] as f64 * k[(gi * tk + j) * d + c] as f64).sum();
                    dot * p.scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            lse.push((max + z.ln()) as f32);
            for c in 0..dv {
                out.push((0..visible).map(|j| e[j] / z * v[(gi * tk + j) * dv + c] as f64).sum::<f64>() as f32);
            }
        }
    }
    (out, lse)
}

/// The fused forward's output and (when it keeps one) its log-sum-exp against the host, its
/// backward against the reference backend and finite differences.
fn check_fused_attention<B: Backend>(
    h: &Harness<B>,
    what: &str,
    (q, k, v): (&Case<B>, &Case<B>, &Case<B>),
    go: &Case<B>,
    dims: (usize, usize, usize, usize, usize),
    params: AttentionParams,
) {
    let (want_out, want_lse) = host_attention(&q.host, &k.host, &v.host, dims, params);
    let fwd = ok(what, B::attention_forward(&q.dev, &k.dev, &v.dev, params));
    let tol = backend_vs_reference(F32);
    assert_values(&format!("{what} vs host"), &ok(what, B::to_vec(&fwd.out)), &want_out, tol);
    if let Some(lse) = &fwd.lse {
        assert_eq!(B::shape(lse).dims(), &[dims.0, dims.1], "{what}: log-sum-exp shape");
        assert_values(&format!("{what} log-sum-exp vs host"), &ok(what, B::to_vec(lse)), &want_lse, tol);
    }
    let grads = ok(what, B::attention_backward(&q.dev, &k.dev, &v.dev, &fwd, &go.dev, params));
    let rf = R::attention_forward(&q.reference, &k.reference, &v.reference, params).unwrap();
    let want = R::attention_backward(&q.reference, &k.reference, &v.reference, &rf, &go.reference, params).unwrap();
    for (name, got, want) in [("dq", &grads.q, want.q), ("dk", &grads.k, want.k), ("dv", &grads.v, want.v)] {
        assert_matches::<B>(&format!("{what} {name}"), &Ok(got.clone()), &Ok(want));
    }
    let f = |q: &B::Tensor, k: &B::Tensor, v: &B::Tensor| B::attention(q, k, v, params).unwrap();
    finite_difference(&format!("{what} dq"), h, q, &go.host, |t| f(t, &k.dev, &v.dev), &grads.q);
    finite_difference(&format!("{what} dk"), h, k, &go.host, |t| f(&q.dev, t, &v.dev), &grads.k);
    finite_difference(&format!("{what} dv"), h, v, &go.host, |t| f(&q.dev, &k.dev, t), &grads.v);
}

/// Attention (self: `t_q = t_k`; cross: `t_q ≠ t_k`, `d_v ≠ d`) forward against a host
/// computation, backward against finite differences; the chunked paths (a budget of a few
/// scores) against the unchunked ones; half storage against `f32`; bad shapes.
pub fn attention<B: Backend>() {
    let mut h = Harness::<B>::default();
    let cases = [
        (1usize, 1usize, 1usize, 1usize, 1usize, false),
        (2, 7, 7, 4, 4, false),
        (3, 5, 9, 8, 3, false),
        (2, 33, 6, 2, 5, false),
        (2, 7, 7, 4, 4, true),
        (1, 33, 33, 2, 3, true),
    ];
    for (g, tq, tk, d, dv, causal) in cases {
        let what = format!("attention g{g} q{tq} k{tk} d{d} dv{dv} causal={causal}");
        let (q, k, v) = (h.randn(&[g, tq, d], F32), h.randn(&[g, tk, d], F32), h.randn(&[g, tk, dv], F32));
        let go = h.randn(&[g, tq, dv], F32);
        let scale = AttentionParams { causal, ..AttentionParams::new(d) };
        check_fused_attention(&h, &what, (&q, &k, &v), &go, (g, tq, tk, d, dv), scale);
        let chunked = attention_chunked::<B>(&q.dev, &k.dev, &v.dev, scale, 5);
        assert_matches::<B>(
            &format!("{what} chunked"),
            &chunked,
            &R::attention(&q.reference, &k.reference, &v.reference, scale),
        );
        let chunked_g = ok(&what, attention_backward_chunked::<B>(&q.dev, &k.dev, &v.dev, &go.dev, scale, 5));
        let rf = R::attention_forward(&q.reference, &k.reference, &v.reference, scale).unwrap();
        let want_g =
            R::attention_backward(&q.reference, &k.reference, &v.reference, &rf, &go.reference, scale).unwrap();
        for (name, chunk, want) in
            [("dq", &chunked_g.q, want_g.q), ("dk", &chunked_g.k, want_g.k), ("dv", &chunked_g.v, want_g.v)]
        {
            assert_matches::<B>(&format!("{what} {name} chunked"), &Ok(chunk.clone()), &Ok(want));
        }
    }
    // Larger than the fused kernels' tiles (on the CPU 64 query rows, 256 keys, 1024 keys per
    // backward task; smaller on cubecl): several blocks, ragged ends, causal across blocks,
    // SD's cross-attention shape (77 keys) and head dims 40 and 80.
    let big = [
        (1usize, 130usize, 300usize, 8usize, 8usize, false),
        (2, 150, 77, 40, 40, false),
        (1, 70, 77, 80, 80, false),
        (1, 300, 300, 4, 4, true),
        (1, 70, 1100, 4, 6, false),
    ];
    for (g, tq, tk, d, dv, causal) in big {
        let what = format!("attention g{g} q{tq} k{tk} d{d} dv{dv} causal={causal}");
        let (q, k, v) = (h.randn(&[g, tq, d], F32), h.randn(&[g, tk, d], F32), h.randn(&[g, tk, dv], F32));
        let go = h.randn(&[g, tq, dv], F32);
        let params = AttentionParams { causal, ..AttentionParams::new(d) };
        check_fused_attention(&h, &what, (&q, &k, &v), &go, (g, tq, tk, d, dv), params);
    }
    // Half storage: scores run in f32, the output is stored in the inputs' dtype.
    if B::supports_dtype(&h.device, DType::F16) {
        let (q, k, v) =
            (h.randn(&[2, 6, 4], DType::F16), h.randn(&[2, 3, 4], DType::F16), h.randn(&[2, 3, 4], DType::F16));
        let p = AttentionParams { scale: 0.5, causal: false };
        let got: Result<B::Tensor> = B::attention(&q.dev, &k.dev, &v.dev, p);
        let want: Result<RefTensor> = R::attention(&q.reference, &k.reference, &v.reference, p);
        assert_matches::<B>("attention f16", &got, &want);
        for causal in [false, true] {
            let what = format!("attention f16 backward causal={causal}");
            let (q, k, v) =
                (h.randn(&[2, 70, 8], DType::F16), h.randn(&[2, 70, 8], DType::F16), h.randn(&[2, 70, 8], DType::F16));
            let go = h.randn(&[2, 70, 8], DType::F16);
            let p = AttentionParams { causal, ..AttentionParams::new(8) };
            let fwd = ok(&what, B::attention_forward(&q.dev, &k.dev, &v.dev, p));
            assert_matches::<B>(
                &what,
                &Ok(fwd.out.clone()),
                &R::attention(&q.reference, &k.reference, &v.reference, p),
            );
            let grads = ok(&what, B::attention_backward(&q.dev, &k.dev, &v.dev, &fwd, &go.dev, p));
            let rf = R::attention_forward(&q.reference, &k.reference, &v.reference, p).unwrap();
            let want = R::attention_backward(&q.reference, &k.reference, &v.reference, &rf, &go.reference, p).unwrap();
            for (name, got, want) in [("dq", &grads.q, want.q), ("dk", &grads.k, want.k), ("dv", &grads.v, want.v)] {
                assert_matches::<B>(&format!("{what} {name}"), &Ok(got.clone()), &Ok(want));
            }
        }
    }
    let one = AttentionParams { scale: 1.0, causal: false };
    let (q, k) = (h.randn(&[2, 3, 4], F32), h.randn(&[2, 5, 3], F32));
    assert!(matches!(B::attention(&q.dev, &k.dev, &k.dev, one), Err(Error::ShapeMismatch { .. })), "d of q vs k");
    let k1 = h.randn(&[1, 5, 4], F32);
    assert!(matches!(B::attention(&q.dev, &k1.dev, &k1.dev, one), Err(Error::ShapeMismatch { .. })), "groups");
    let k4 = h.randn(&[2, 5, 4], F32);
    let nan = AttentionParams { scale: f32::NAN, causal: false };
    assert!(B::attention(&q.dev, &k4.dev, &k4.dev, nan).is_err(), "NaN scale");
    assert!(
        matches!(B::attention(&q.dev, &k4.dev, &k4.dev, one.causal()), Err(Error::InvalidArgument { .. })),
        "causal with 3 queries and 5 keys"
    );
}
