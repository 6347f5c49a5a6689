use alloc::vec::Vec;
use core::fmt;

use crate::{Error, Result};

/// A tensor's dimensions, outermost first (`[batch, channels, h, w]` for images).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Shape(pub Vec<usize>);

impl Shape {
    /// A shape from its dimensions.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The scalar shape `[]` (one element).
    pub fn scalar() -> Self {
        Shape(Vec::new())
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// `∏ dims`, or [`Error::SizeOverflow`].
    pub fn num_elements(&self) -> Result<usize> {
        self.0
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or(Error::SizeOverflow { op: "Shape::num_elements" })
    }

    /// Row-major strides (in elements).
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = alloc::vec![1usize; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.0[i + 1];
        }
        strides
    }

    /// The numpy broadcast of two shapes (aligned from the right; 1 stretches).
    pub fn broadcast(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
        let rank = a.rank().max(b.rank());
        let dim = |s: &Shape, i: usize| {
            let offset = rank - s.rank();
            if i < offset { 1 } else { s.0[i - offset] }
        };
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let (x, y) = (dim(a, i), dim(b, i));
            out.push(match (x, y) {
                _ if x == y => x,
                (1, _) => y,
                (_, 1) => x,
                _ => {
                    return Err(Error::ShapeMismatch { op, expected: a.clone(), got: b.clone() });
                }
            });
        }
        let out = Shape(out);
        out.num_elements()?;
        Ok(out)
    }

    /// Strides of `self` as seen from a shape `out` it broadcasts to: the row-major strides,
    /// with 0 on every dimension `self` lacks or stretches (extent 1).
    pub fn broadcast_strides(&self, out: &Shape) -> Vec<usize> {
        let offset = out.rank().saturating_sub(self.rank());
        let strides = self.strides();
        (0..out.rank()).map(|i| if i < offset || self.0[i - offset] == 1 { 0 } else { strides[i - offset] }).collect()
    }

    /// Fails with [`Error::ShapeMismatch`] unless `self == other`.
    pub fn expect_eq(&self, op: &'static str, other: &Shape) -> Result<()> {
        if self == other {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { op, expected: self.clone(), got: other.clone() })
        }
    }

    /// Fails unless the shape has exactly `rank` dimensions.
    pub fn expect_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if self.rank() == rank {
            Ok(())
        } else {
            Err(Error::invalid(op, alloc::format!("expected a rank-{rank} tensor, got shape {self}")))
        }
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}
