//! The shared backend conformance suite, on lisa-cpu.
lisa_conformance::conformance_tests!(lisa_cpu::CpuBackend);
