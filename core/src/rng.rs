//! Counter-based random numbers: Philox4x32-10 (Salmon et al. 2011, as in cuRAND and torch).
//!
//! Element `i` of a stream is a pure function of `(seed, i)`, so a tensor of normals is the
//! same whatever the thread count, tiling or backend. Four normals come from one Philox
//! block: block `i / 4`, lane `i % 4`, two Box–Muller pairs.

use crate::real::Real;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// The Philox4x32-10 block for a 128-bit counter and a 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A uniform in the open interval (0, 1) from the top 24 bits: `(⌊x/2⁸⌋ + ½)·2⁻²⁴`.
#[inline]
pub fn uniform_open(x: u32) -> f32 {
    ((x >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// The four normals of block `block` of stream `seed` (Box–Muller in `F`).
pub fn normal_block<F: Real>(seed: u64, block: u64) -> [F; 4] {
    let r = philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], [seed as u32, (seed >> 32) as u32]);
    let pair = |a: u32, b: u32| {
        let u1 = F::lit(uniform_open(a) as f64);
        let u2 = F::lit(uniform_open(b) as f64);
        let radius = (F::lit(-2.0) * u1.ln()).sqrt();
        let angle = F::TAU() * u2;
        (radius * angle.cos(), radius * angle.sin())
    };
    let (z0, z1) = pair(r[0], r[1]);
    let (z2, z3) = pair(r[2], r[3]);
    [z0, z1, z2, z3]
}

/// Element `index` of the standard-normal stream `seed`.
pub fn normal_at<F: Real>(seed: u64, index: u64) -> F {
    normal_block::<F>(seed, index / 4)[(index % 4) as usize]
}

/// Fills `out` with elements `offset .. offset + out.len()` of stream `seed`.
pub fn fill_normal<F: Real>(seed: u64, offset: u64, out: &mut [F]) {
    let mut i = 0usize;
    while i < out.len() {
        let index = offset + i as u64;
        let block = normal_block::<F>(seed, index / 4);
        let mut lane = (index % 4) as usize;
        while lane < 4 && i < out.len() {
            out[i] = block[lane];
            lane += 1;
            i += 1;
        }
    }
}
