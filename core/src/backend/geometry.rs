//! Shape validation shared by every backend: each op checks its operands here first, so
//! all backends reject the same inputs with the same typed errors.

use alloc::format;
use alloc::vec::Vec;

use super::Shape;
use crate::{Error, Result};

/// Stride and zero padding of a 2-D convolution (NCHW, no dilation, no groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Conv2dParams {
    /// `(stride_h, stride_w)`, each ≥ 1.
    pub stride: [usize; 2],
    /// `(pad_h, pad_w)` zeros on each side.
    pub padding: [usize; 2],
}

impl Conv2dParams {
    /// Stride 1 with "same" padding for an odd `k×k` kernel (`pad = k/2`).
    pub fn same(k: usize) -> Self {
        Self { stride: [1, 1], padding: [k / 2, k / 2] }
    }
}

/// The sizes of one 2-D convolution: `x [n, c_in, h, w] ⋆ w [c_out, c_in, kh, kw] → [n, c_out, oh, ow]`
/// with `oh = (h + 2·pad_h − kh)/stride_h + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Conv2dGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub params: Conv2dParams,
}

impl Conv2dGeometry {
    /// Validates input and weight shapes and derives the output size.
    pub fn new(op: &'static str, input: &Shape, weight: &Shape, params: Conv2dParams) -> Result<Self> {
        input.expect_rank(op, 4)?;
        weight.expect_rank(op, 4)?;
        let (i, k) = (input.dims(), weight.dims());
        if params.stride.contains(&0) {
            return Err(Error::invalid(op, "stride must be >= 1"));
        }
        if k[1] != i[1] {
            return Err(Error::ShapeMismatch {
                op,
                expected: Shape::new([k[0], i[1], k[2], k[3]]),
                got: weight.clone(),
            });
        }
        let out = |size: usize, kernel: usize, pad: usize, stride: usize| -> Result<usize> {
            let padded = pad.checked_mul(2).and_then(|p| p.checked_add(size)).ok_or(Error::SizeOverflow { op })?;
            if kernel == 0 || kernel > padded {
                return Err(Error::invalid(
                    op,
                    format!("kernel {kernel} does not fit the padded input {padded} (input {input}, weight {weight})"),
                ));
            }
            Ok((padded - kernel) / stride + 1)
        };
        let geometry = Self {
            batch: i[0],
            c_in: i[1],
            h: i[2],
            w: i[3],
            c_out: k[0],
            kh: k[2],
            kw: k[3],
            oh: out(i[2], k[2], params.padding[0], params.stride[0])?,
            ow: out(i[3], k[3], params.padding[1], params.stride[1])?,
            params,
        };
        geometry.output_shape().num_elements()?;
        input.num_elements()?;
        weight.num_elements()?;
        if geometry.batch == 0 || geometry.c_in == 0 || geometry.c_out == 0 {
            return Err(Error::Empty { op });
        }
        Ok(geometry)
    }

    /// `[n, c_in, h, w]`.
    pub fn input_shape(&self) -> Shape {
        Shape::new([self.batch, self.c_in, self.h, self.w])
    }
    /// `[c_out, c_in, kh, kw]`.
    pub fn weight_shape(&self) -> Shape {
        Shape::new([self.c_out, self.c_in, self.kh, self.kw])
    }
    /// `[n, c_out, oh, ow]`.
    pub fn output_shape(&self) -> Shape {
        Shape::new([self.batch, self.c_out, self.oh, self.ow])
    }
    /// Multiply-adds of the forward pass (FLOPs = 2×).
    pub fn macs(&self) -> u64 {
        (self.batch * self.c_out * self.oh * self.ow) as u64 * (self.c_in * self.kh * self.kw) as u64
    }
}

/// Which operands of a matmul are transposed (in their last two dimensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transpose {
    /// Use `aᵀ`.
    pub a: bool,
    /// Use `bᵀ`.
    pub b: bool,
}

/// The sizes of a batched matmul `[.., m, k] × [.., k, n] → [.., m, n]` (same leading dims).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct MatmulGeometry {
    pub batch_dims: Vec<usize>,
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl MatmulGeometry {
    /// Validates `a`, `b` and the transposes.
    pub fn new(op: &'static str, a: &Shape, b: &Shape, t: Transpose) -> Result<Self> {
        if a.rank() < 2 || a.rank() != b.rank() {
            return Err(Error::invalid(op, format!("matmul needs two tensors of equal rank >= 2, got {a} and {b}")));
        }
        let r = a.rank();
        let (ad, bd) = (a.dims(), b.dims());
        if ad[..r - 2] != bd[..r - 2] {
            return Err(Error::ShapeMismatch { op, expected: a.clone(), got: b.clone() });
        }
        let (m, ka) = if t.a { (ad[r - 1], ad[r - 2]) } else { (ad[r - 2], ad[r - 1]) };
        let (kb, n) = if t.b { (bd[r - 1], bd[r - 2]) } else { (bd[r - 2], bd[r - 1]) };
        if ka != kb {
            return Err(Error::ShapeMismatch { op, expected: a.clone(), got: b.clone() });
        }
        let batch_dims = ad[..r - 2].to_vec();
        let batch = Shape::new(batch_dims.clone()).num_elements()?;
        let g = Self { batch_dims, batch, m, k: ka, n };
        g.output_shape().num_elements()?;
        a.num_elements()?;
        b.num_elements()?;
        Ok(g)
    }

    /// `[.., m, n]`.
    pub fn output_shape(&self) -> Shape {
        let mut d = self.batch_dims.clone();
        d.push(self.m);
        d.push(self.n);
        Shape(d)
    }
}

/// Group normalisation parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormParams {
    /// Number of channel groups (divides the channel count).
    pub groups: usize,
    /// Variance floor ε (1e-5 in torch; 1e-6 in diffusers' UNets).
    pub eps: f32,
}

/// The sizes of a group norm over `x [n, c, *spatial]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct GroupNormGeometry {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    /// Product of the spatial dimensions (1 for `[n, c]`).
    pub spatial: usize,
}

impl GroupNormGeometry {
    /// Validates `x [n, c, …]`, `gamma [c]` and `beta [c]` against `params`.
    pub fn new(op: &'static str, x: &Shape, gamma: &Shape, beta: &Shape, params: GroupNormParams) -> Result<Self> {
        if x.rank() < 2 {
            return Err(Error::invalid(op, format!("group norm needs [n, c, ...], got {x}")));
        }
        let (batch, channels) = (x.dims()[0], x.dims()[1]);
        let spatial = Shape::new(&x.dims()[2..]).num_elements()?;
        x.num_elements()?;
        Shape::new([channels]).expect_eq(op, gamma)?;
        Shape::new([channels]).expect_eq(op, beta)?;
        if params.groups == 0 || channels % params.groups != 0 {
            return Err(Error::invalid(op, format!("{} groups do not divide {channels} channels", params.groups)));
        }
        if !(params.eps > 0.0 && params.eps.is_finite()) {
            return Err(Error::invalid(op, format!("eps must be > 0, got {}", params.eps)));
        }
        if batch == 0 || channels == 0 || spatial == 0 {
            return Err(Error::Empty { op });
        }
        Ok(Self { batch, channels, groups: params.groups, spatial })
    }

    /// Elements in one (sample, group) slice: `(c/g)·spatial`.
    pub fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }

    /// `[n, groups]`, the shape of the saved mean and reciprocal std.
    pub fn stats_shape(&self) -> Shape {
        Shape::new([self.batch, self.groups])
    }
}

/// `[n, c, h, w] → [n, c, f·h, f·w]` for nearest upsampling by `factor`.
pub fn upsample_output_shape(op: &'static str, x: &Shape, factor: usize) -> Result<Shape> {
    x.expect_rank(op, 4)?;
    if factor == 0 {
        return Err(Error::invalid(op, "upsample factor must be >= 1"));
    }
    let d = x.dims();
    let mul = |v: usize| v.checked_mul(factor).ok_or(Error::SizeOverflow { op });
    let out = Shape::new([d[0], d[1], mul(d[2])?, mul(d[3])?]);
    out.num_elements()?;
    Ok(out)
}

/// Validates the gradient of a nearest upsampling by `factor` (`[n, c, f·h, f·w]`) and
/// returns the input's shape `[n, c, h, w]`.
pub fn upsample_backward_input_shape(op: &'static str, grad: &Shape, factor: usize) -> Result<Shape> {
    grad.expect_rank(op, 4)?;
    let d = grad.dims();
    if factor == 0 || !d[2].is_multiple_of(factor) || !d[3].is_multiple_of(factor) {
        return Err(Error::invalid(op, alloc::format!("{grad} is not a multiple of factor {factor}")));
    }
    Ok(Shape::new([d[0], d[1], d[2] / factor, d[3] / factor]))
}

/// Validates the inputs of a channel concat (`dim 1`) and returns the output shape.
pub fn concat_channels_shape(op: &'static str, shapes: &[&Shape]) -> Result<Shape> {
    let first = shapes.first().ok_or(Error::Empty { op })?;
    if first.rank() < 2 {
        return Err(Error::invalid(op, format!("concat needs [n, c, ...], got {first}")));
    }
    let mut channels = 0usize;
    for s in shapes {
        if s.rank() != first.rank() || s.dims()[0] != first.dims()[0] || s.dims()[2..] != first.dims()[2..] {
            return Err(Error::ShapeMismatch { op, expected: (*first).clone(), got: (*s).clone() });
        }
        channels = channels.checked_add(s.dims()[1]).ok_or(Error::SizeOverflow { op })?;
    }
    let mut out = first.0.clone();
    out[1] = channels;
    let out = Shape(out);
    out.num_elements()?;
    Ok(out)
}

/// Validates a channel slice `[start, start + len)` of `x [n, c, ...]`; returns its shape.
pub fn slice_channels_shape(op: &'static str, x: &Shape, start: usize, len: usize) -> Result<Shape> {
    if x.rank() < 2 {
        return Err(Error::invalid(op, format!("channel slice needs [n, c, ...], got {x}")));
    }
    let end = start.checked_add(len).ok_or(Error::SizeOverflow { op })?;
    if end > x.dims()[1] || len == 0 {
        return Err(Error::invalid(op, format!("channels {start}..{end} out of range for {x}")));
    }
    let mut out = x.0.clone();
    out[1] = len;
    Ok(Shape(out))
}

/// Validates `axes` as a permutation of `x`'s dims; returns the permuted shape
/// `out.dims[i] = x.dims[axes[i]]`.
pub fn permute_shape(op: &'static str, x: &Shape, axes: &[usize]) -> Result<Shape> {
    let r = x.rank();
    let mut seen = alloc::vec![false; r];
    if axes.len() != r {
        return Err(Error::invalid(op, format!("{} axes for a rank-{r} tensor {x}", axes.len())));
    }
    for &a in axes {
        if a >= r || core::mem::replace(&mut seen[a], true) {
            return Err(Error::invalid(op, format!("axes {axes:?} are not a permutation of 0..{r}")));
        }
    }
    Ok(Shape(axes.iter().map(|&a| x.dims()[a]).collect()))
}

/// The inverse permutation: `inverse[axes[i]] = i` (the backward of a permute).
pub fn inverse_permutation(axes: &[usize]) -> Vec<usize> {
    let mut inv = alloc::vec![0; axes.len()];
    for (i, &a) in axes.iter().enumerate() {
        inv[a] = i;
    }
    inv
}

/// For a permute of `x` by `axes`: the output dims, then the strides in `x` of each output
/// dim (`x.strides[axes[i]]`). Every backend's permute kernel walks these.
pub fn permute_strides(x: &Shape, axes: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let strides = x.strides();
    (axes.iter().map(|&a| x.dims()[a]).collect(), axes.iter().map(|&a| strides[a]).collect())
}
