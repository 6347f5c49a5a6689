//! Attention: the core's chunked default, which never holds more than
//! [`lisa_core::backend::ATTENTION_SCORE_BUDGET`] scores at once (matmul + softmax
//! kernels); a fused flash-style kernel is future work.

use cubecl::prelude::*;
use lisa_core::backend::AttentionOps;

use super::CubeBackend;

impl<R: Runtime> AttentionOps for CubeBackend<R> {}
