//! Results do not depend on the number of threads, nor on the tier of vector instructions
//! lisa-cpu's own loop kernels were compiled for: bit-for-bit equal under 1, 2 and 3 threads
//! and under every tier the CPU has (what exact checkpoint resume on the CPU relies on). The
//! `gemm` crate chooses its kernels by CPU on its own, so another machine may still round the
//! products differently.

use lisa_core::backend::prelude::*;
use lisa_core::backend::{
    AdamWParams, AttentionParams, Conv2dParams, DType, GroupNormParams, Shape, Transpose, UnaryOp,
};
use lisa_cpu::{CpuBackend as C, CpuDevice};

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(f)
}

fn bits(t: &lisa_cpu::CpuTensor) -> Vec<u32> {
    C::to_vec(t).unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Every op whose parallel split could change a sum, run on one input set.
fn run_all() -> Vec<Vec<u32>> {
    let d = CpuDevice;
    let x = C::random_normal(&Shape::new([33, 8, 16, 16]), 1, DType::F32, &d).unwrap();
    let w = C::random_normal(&Shape::new([16, 8, 3, 3]), 2, DType::F32, &d).unwrap();
    let p = Conv2dParams::same(3);
    let y = C::conv2d(&x, &w, None, p).unwrap();
    let g = C::random_normal(&C::shape(&y), 3, DType::F32, &d).unwrap();
    let gamma = C::full(&Shape::new([8]), 1.5, DType::F32, &d).unwrap();
    let beta = C::zeros(&Shape::new([8]), DType::F32, &d).unwrap();
    let gn = GroupNormParams { groups: 4, eps: 1e-5 };
    let stats = C::group_norm(&x, &gamma, &beta, gn).unwrap();
    let gx = C::random_normal(&C::shape(&x), 4, DType::F32, &d).unwrap();
    let gn_grads = C::group_norm_backward(&x, &gamma, &stats, &gx, gn).unwrap();
    let a = C::random_normal(&Shape::new([300, 200]), 5, DType::F32, &d).unwrap();
    let b = C::random_normal(&Shape::new([200, 100]), 6, DType::F32, &d).unwrap();
    let act = C::group_norm_silu(&x, &gamma, &beta, gn).unwrap();
    let act_grads = C::group_norm_silu_backward(&x, &gamma, &beta, &act, &gx, gn).unwrap();
    // [33, 8, 1, 1] broadcast over the planes (a ResBlock's time-embedding add), odd lengths.
    let per_channel = C::random_normal(&Shape::new([33, 8, 1, 1]), 7, DType::F32, &d).unwrap();
    let (mut param, mut m, mut v) = (gx.clone(), C::silu(&gx).unwrap(), C::mul(&x, &x).unwrap());
    for step in 1..=2 {
        C::adamw_update(&mut param, &mut m, &mut v, &x, &AdamWParams { step, ..AdamWParams::default() }).unwrap();
    }
    // Fewer output than input channels (the forward by col2im), with a bias; a broadcast that
    // takes the general path ([8, 1, 16] over [33, 8, 16, 16]).
    let narrow = C::random_normal(&Shape::new([4, 8, 3, 3]), 8, DType::F32, &d).unwrap();
    let narrow_bias = C::random_normal(&Shape::new([4]), 9, DType::F32, &d).unwrap();
    let rows = C::random_normal(&Shape::new([8, 1, 16]), 10, DType::F32, &d).unwrap();
    // Fused attention over several query blocks and key chunks (64 rows, 1024 keys a task).
    let (aq, ak) = (Shape::new([3, 130, 40]), Shape::new([3, 1100, 40]));
    let (q, k, vv) = (
        C::random_normal(&aq, 11, DType::F32, &d).unwrap(),
        C::random_normal(&ak, 12, DType::F32, &d).unwrap(),
        C::random_normal(&ak, 13, DType::F32, &d).unwrap(),
    );
    let ap = AttentionParams::new(40);
    let att = C::attention_forward(&q, &k, &vv, ap).unwrap();
    let att_grads = C::attention_backward(&q, &k, &vv, &att, &q, ap).unwrap();
    vec![
        bits(&att.out),
        bits(&att_grads.q),
        bits(&att_grads.k),
        bits(&att_grads.v),
        bits(&C::conv2d(&x, &narrow, Some(&narrow_bias), p).unwrap()),
        bits(&C::sub(&x, &rows).unwrap()),
        bits(&C::silu(&x).unwrap()),
        bits(&C::silu_backward(&x, &gx).unwrap()),
        bits(&C::unary(UnaryOp::Exp, &x).unwrap()),
        bits(&C::add(&x, &gx).unwrap()),
        bits(&C::mul(&x, &per_channel).unwrap()),
        bits(&act.output),
        bits(&act_grads.input),
        bits(&act_grads.beta),
        bits(&param),
        bits(&v),
        bits(&x),
        bits(&y),
        bits(&C::conv2d_backward_data(&g, &w, &C::shape(&x), p).unwrap()),
        bits(&C::conv2d_backward_weight(&x, &g, &C::shape(&w), p).unwrap()),
        bits(&C::conv2d_backward_bias(&g).unwrap()),
        bits(&stats.output),
        bits(&gn_grads.input),
        bits(&gn_grads.gamma),
        bits(&C::sum(&x).unwrap()),
        bits(&C::sum_squares(&x).unwrap()),
        bits(&C::sum_to_shape(&x, &Shape::new([1, 8, 1, 1])).unwrap()),
        bits(&C::matmul(&a, &b, Transpose::default()).unwrap()),
        bits(&C::mse_loss(&x, &gx).unwrap().1),
        vec![C::sum_squares_all(&[&x, &g, &gx]).unwrap().to_bits() as u32],
    ]
}

#[test]
fn results_are_bitwise_independent_of_thread_count() {
    let one = in_pool(1, run_all);
    for threads in [2, 3] {
        let many = in_pool(threads, run_all);
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!(a == b, "op #{i} differs between 1 and {threads} threads");
        }
    }
}

#[test]
fn results_are_bitwise_independent_of_the_instruction_set_tier() {
    use lisa_cpu::{Isa, detected_isa, set_isa_cap};
    let widest = detected_isa();
    let tiers: Vec<Isa> = [Isa::Baseline, Isa::Avx2, Isa::Avx512].into_iter().filter(|&t| t <= widest).collect();
    if tiers.len() < 2 {
        eprintln!("skipped: this CPU has only the {} tier", widest.name());
        return;
    }
    let mut results = Vec::new();
    for &tier in &tiers {
        assert_eq!(set_isa_cap(tier), tier);
        results.push((tier, in_pool(2, run_all)));
    }
    set_isa_cap(widest);
    let (first, reference) = &results[0];
    for (tier, r) in &results[1..] {
        for (i, (a, b)) in reference.iter().zip(r).enumerate() {
            assert!(a == b, "op #{i} differs between the {} and {} tiers", first.name(), tier.name());
        }
    }
}

#[test]
fn half_storage_rounds_and_casts() {
    let d = CpuDevice;
    let t = C::from_slice(&[1.0 + 1e-4, 3.0], &Shape::new([2]), DType::F16, &d).unwrap();
    assert_eq!(C::dtype(&t), DType::F16);
    assert_eq!(C::to_vec(&t).unwrap(), vec![1.0, 3.0]);
    let b = C::cast(&t, DType::BF16).unwrap();
    assert_eq!(C::dtype(&b), DType::BF16);
}
