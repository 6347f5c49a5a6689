//! Seeded standard normals: Philox4x32-10 + Box–Muller, element `i` equal to
//! [`lisa_core::rng::normal_at`]`(seed, i)` (up to the last bits of ln/cos/sin).

use cubecl::prelude::*;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// `((x >> 8) + 0.5) / 2²⁴`: a uniform in (0, 1).
#[cube]
fn uniform_open(x: u32) -> f32 {
    (f32::cast_from(x >> 8) + 0.5) * (1.0 / 16_777_216.0)
}

/// One thread per block of four normals; `key` = the seed's two words.
// 2π as a literal: kernels embed literals, not paths to std constants.
#[allow(clippy::approx_constant, clippy::excessive_precision)]
#[cube(launch)]
pub fn random_normal<F: Float>(out: &mut Array<F>, key0: u32, key1: u32) {
    let block = ABSOLUTE_POS;
    let first = block * 4;
    if first < out.len() {
        let mut c0 = block as u32;
        let mut c1 = 0u32;
        let mut c2 = 0u32;
        let mut c3 = 0u32;
        let mut k0 = key0;
        let mut k1 = key1;
        for round in 0..10u32 {
            if round > 0 {
                k0 += W0;
                k1 += W1;
            }
            let hi0 = u32::mul_hi(M0, c0);
            let lo0 = M0 * c0;
            let hi1 = u32::mul_hi(M1, c2);
            let lo1 = M1 * c2;
            let n0 = hi1 ^ c1 ^ k0;
            let n2 = hi0 ^ c3 ^ k1;
            c0 = n0;
            c1 = lo1;
            c2 = n2;
            c3 = lo0;
        }
        let tau = 6.283_185_307_179_586f32;
        let r0 = f32::sqrt(-2.0 * f32::ln(uniform_open(c0)));
        let a0 = tau * uniform_open(c1);
        let r1 = f32::sqrt(-2.0 * f32::ln(uniform_open(c2)));
        let a1 = tau * uniform_open(c3);
        out[first] = F::cast_from(r0 * f32::cos(a0));
        if first + 1 < out.len() {
            out[first + 1] = F::cast_from(r0 * f32::sin(a0));
        }
        if first + 2 < out.len() {
            out[first + 2] = F::cast_from(r1 * f32::cos(a1));
        }
        if first + 3 < out.len() {
            out[first + 3] = F::cast_from(r1 * f32::sin(a1));
        }
    }
}
