//! The direct AVX-512 convolution (opt-in, `set_direct_conv`), through the conformance suite's
//! convolution checks (forward, both backwards, against the reference and finite differences).
//! Without AVX-512F on the machine that built the tests they are ignored, not passed.

fn direct_on() {
    lisa_cpu::set_direct_conv(true);
    assert!(lisa_cpu::direct_conv_available(), "this machine was built as AVX-512F but the CPU lacks it");
}

#[test]
#[cfg_attr(not(lisa_host_avx512), ignore = "needs AVX-512F")]
fn direct_conv2d_forward_matches_the_reference() {
    direct_on();
    lisa_conformance::checks::conv2d_forward::<lisa_cpu::CpuBackend>();
}

#[test]
#[cfg_attr(not(lisa_host_avx512), ignore = "needs AVX-512F")]
fn direct_conv2d_backward_matches_the_reference() {
    direct_on();
    lisa_conformance::checks::conv2d_backward::<lisa_cpu::CpuBackend>();
}
