//! Finite-difference checks of every layer and of a whole tiny dual-branch model with the
//! LISA term, on the CPU backend.

use lisa_core::LisaConfig;
use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, GroupNormParams, Shape};
use lisa_core::lisa::SampleTerms;
use lisa_core::tolerance::{F32_FINITE_DIFFERENCE, FD_STEP_F32, Tolerance};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::autodiff::{Tape, Var};
use lisa_trainer::model::toy::{ControlConfig, ToyConfig, UNetConfig};
use lisa_trainer::model::{
    Conditioning, DecoderConfig, DualDenoiser, ForwardOptions, HookLayer, ModelSpec, Parts, PromptEmbedding,
    forward_train, registry,
};
use lisa_trainer::nn::{
    AttentionConfig, CLIP_ATTENTION, ClassEmbedding, Conv2d, Conv2dConfig, GroupNorm, Linear, MultiHeadAttention,
    ResBlock, ResBlockConfig, SelfAttention, TransformerBlock, Upsample,
};
use lisa_trainer::params::{Bound, ParamId, ParamStore};

/// The most elements of one parameter perturbed (spread over the tensor).
const PROBES: usize = 12;

fn randn(shape: &[usize], seed: u64) -> lisa_cpu::CpuTensor {
    C::random_normal(&Shape::new(shape), seed, DType::F32, &CpuDevice).unwrap()
}

fn dot(a: &lisa_cpu::CpuTensor, b: &[f32]) -> f64 {
    C::to_vec(a).unwrap().iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Checks d⟨r, f⟩/dθ for every trainable parameter of `store` (and the input `x`) against
/// central differences. `f` builds the output from bound parameters and the input var.
fn check(
    name: &str,
    store: &mut ParamStore<C>,
    x: lisa_cpu::CpuTensor,
    f: impl Fn(&Bound<'_, C>, &Var<C>) -> Var<C>,
    tol: Tolerance,
) {
    let tape = Tape::<C>::new();
    let bound = store.bind(&tape);
    let xv = tape.leaf(x.clone());
    let y = f(&bound, &xv);
    let r = C::to_vec(&randn(C::shape(&y.value).dims(), 777)).unwrap();
    let seed = C::from_slice(&r, &C::shape(&y.value), DType::F32, &CpuDevice).unwrap();
    let mut grads = tape.backward(&[(&y, seed)]).unwrap();
    let leaves = bound.leaves();
    drop(bound);
    let eval = |store: &ParamStore<C>, x: &lisa_cpu::CpuTensor| {
        let tape = Tape::<C>::new();
        let bound = store.bind(&tape);
        tape.no_grad(|| dot(&f(&bound, &tape.constant(x.clone())).value, &r))
    };
    // The input.
    let gx = C::to_vec(&grads.remove(xv.id().unwrap()).expect("input grad")).unwrap();
    let xs = C::to_vec(&x).unwrap();
    for i in (0..xs.len()).step_by(xs.len().div_ceil(PROBES).max(1)) {
        let probe = |d: f64| {
            let mut v = xs.clone();
            v[i] = (v[i] as f64 + d) as f32;
            eval(store, &C::from_slice(&v, &C::shape(&x), DType::F32, &CpuDevice).unwrap())
        };
        let fd = (probe(FD_STEP_F32) - probe(-FD_STEP_F32)) / (2.0 * FD_STEP_F32);
        assert!(tol.accepts(gx[i] as f64, fd), "{name}: d/dx[{i}] analytic {} vs fd {fd}", gx[i]);
    }
    // Every trainable parameter.
    for (pid, vid) in leaves {
        let pname = store.get(pid).name.clone();
        let g = C::to_vec(&grads.remove(vid).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"))).unwrap();
        let base = C::to_vec(&store.get(pid).value).unwrap();
        let shape = C::shape(&store.get(pid).value);
        for i in (0..base.len()).step_by(base.len().div_ceil(PROBES).max(1)) {
            let mut probe = |d: f64| {
                let mut v = base.clone();
                v[i] = (v[i] as f64 + d) as f32;
                store.get_mut(pid).value = C::from_slice(&v, &shape, DType::F32, &CpuDevice).unwrap();
                let out = eval(store, &x);
                store.get_mut(pid).value = C::from_slice(&base, &shape, DType::F32, &CpuDevice).unwrap();
                out
            };
            let fd = (probe(FD_STEP_F32) - probe(-FD_STEP_F32)) / (2.0 * FD_STEP_F32);
            assert!(tol.accepts(g[i] as f64, fd), "{name}: d/d{pname}[{i}] analytic {} vs fd {fd}", g[i]);
        }
    }
}

fn store() -> ParamStore<C> {
    ParamStore::new(CpuDevice, 11)
}

#[test]
fn conv_linear_norm_upsample() {
    let mut s = store();
    let conv = Conv2d::new(&mut s, "c", Conv2dConfig::new(3, 4, 3)).unwrap();
    check("conv2d", &mut s, randn(&[2, 3, 5, 5], 1), |p, x| conv.forward(p, x).unwrap(), F32_FINITE_DIFFERENCE);
    let mut s = store();
    let down = Conv2d::new(&mut s, "d", Conv2dConfig::new(3, 2, 3).stride(2)).unwrap();
    check(
        "conv2d stride 2",
        &mut s,
        randn(&[2, 3, 6, 6], 2),
        |p, x| down.forward(p, x).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
    let mut s = store();
    let lin = Linear::new(&mut s, "l", 5, 3).unwrap();
    check("linear", &mut s, randn(&[4, 5], 3), |p, x| lin.forward(p, x).unwrap(), F32_FINITE_DIFFERENCE);
    let mut s = store();
    let gn = GroupNorm::new(&mut s, "g", 4, GroupNormParams { groups: 2, eps: 1e-5 }).unwrap();
    check("group norm", &mut s, randn(&[2, 4, 3, 3], 4), |p, x| gn.forward(p, x).unwrap(), F32_FINITE_DIFFERENCE);
    let mut s = store();
    let up = Upsample::new(&mut s, "u", 2).unwrap();
    check("upsample", &mut s, randn(&[1, 2, 3, 3], 5), |p, x| up.forward(p, x).unwrap(), F32_FINITE_DIFFERENCE);
    // A 1×1 convolution after the upsampling runs before it (same values).
    let mut s = store();
    let point = Conv2d::new(&mut s, "p", Conv2dConfig::new(2, 3, 1)).unwrap();
    let x = randn(&[2, 2, 3, 4], 6);
    check("1x1 after upsample", &mut s, x, |p, x| point.forward_upsampled(p, x).unwrap(), F32_FINITE_DIFFERENCE);
}

/// `forward_upsampled` computes `conv(upsample(x))` for the kernels it treats specially.
#[test]
fn upsampled_convolutions_equal_upsample_then_convolve() {
    for k in [1, 3] {
        let mut s = store();
        let conv = Conv2d::new(&mut s, "c", Conv2dConfig::new(3, 5, k)).unwrap();
        s.get_mut(conv.bias).value = randn(&[5], 7); // nonzero, so a misplaced bias shows
        let tape = Tape::<C>::new();
        let p = s.bind(&tape);
        let x = tape.constant(randn(&[2, 3, 4, 6], 8));
        let fused = C::to_vec(&conv.forward_upsampled(&p, &x).unwrap().value).unwrap();
        let plain = C::to_vec(&conv.forward(&p, &tape.upsample(&x, 2).unwrap()).unwrap().value).unwrap();
        let err = fused.iter().zip(&plain).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "{k}x{k}: relative difference {err}");
    }
}

#[test]
fn batch_and_channel_slices() {
    let mut s = store();
    let conv = Conv2d::new(&mut s, "c", Conv2dConfig::new(3, 2, 1)).unwrap();
    check(
        "slice_batch",
        &mut s,
        randn(&[4, 3, 2, 2], 40),
        |p, x| p.tape.slice_batch(&conv.forward(p, x).unwrap(), 3).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
    let mut s = store();
    let conv = Conv2d::new(&mut s, "c", Conv2dConfig::new(3, 5, 1)).unwrap();
    check(
        "slice_channels",
        &mut s,
        randn(&[2, 3, 2, 2], 41),
        |p, x| p.tape.slice_channels(&conv.forward(p, x).unwrap(), 1, 3).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
}

#[test]
fn resblock_with_time_injection_and_concat() {
    let mut s = store();
    let block = ResBlock::new(
        &mut s,
        "r",
        ResBlockConfig { in_channels: 4, out_channels: 6, time_dim: 5, norm: GroupNormParams { groups: 2, eps: 1e-5 } },
    )
    .unwrap();
    let temb = randn(&[2, 5], 6);
    let other = randn(&[2, 2, 4, 4], 7);
    check(
        "resblock",
        &mut s,
        randn(&[2, 2, 4, 4], 8),
        |p, x| {
            let t = p.tape;
            let cat = t.concat_channels(&[x, &t.constant(other.clone())]).unwrap();
            let e = t.silu(&t.constant(temb.clone())).unwrap();
            block.forward(p, &cat, &e).unwrap()
        },
        F32_FINITE_DIFFERENCE,
    );
}

#[test]
fn attention_and_embeddings() {
    let mut s = store();
    let attn = SelfAttention::new(&mut s, "a", 4, GroupNormParams { groups: 2, eps: 1e-5 }).unwrap();
    check("attention", &mut s, randn(&[2, 4, 3, 3], 9), |p, x| attn.forward(p, x).unwrap(), F32_FINITE_DIFFERENCE);
    let mut s = store();
    let emb = ClassEmbedding::new(&mut s, "e", 5, 3).unwrap();
    check(
        "class embedding",
        &mut s,
        randn(&[3, 3], 10),
        |p, x| p.tape.add(&emb.forward(p, &[0, 4, 2]).unwrap(), x).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
}

#[test]
fn transformer_block_and_broadcast_matmul() {
    // The SD transformer block (layer norms, self- and cross-attention over split heads,
    // GEGLU), every parameter and the input, with a fixed context.
    let mut s = store();
    let block = TransformerBlock::new(&mut s, "t", 8, 2, 6).unwrap();
    let ctx = randn(&[2, 3, 6], 11);
    check(
        "transformer block",
        &mut s,
        randn(&[2, 5, 8], 12),
        |p, x| block.forward(p, x, &p.tape.constant(ctx.clone())).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
    // Causal multi-head attention with biases (the CLIP layer's), and zero padding.
    let mut s = store();
    let causal =
        AttentionConfig { query_dim: 8, context_dim: 8, heads: 2, head_dim: 4, names: CLIP_ATTENTION, causal: true };
    let attn = MultiHeadAttention::new(&mut s, "c", causal).unwrap();
    check(
        "causal attention",
        &mut s,
        randn(&[2, 5, 8], 14),
        |p, x| attn.forward(p, x, None).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
    check(
        "pad",
        &mut store(),
        randn(&[1, 2, 3, 4], 15),
        |p, x| p.tape.pad_spatial(x, [0, 1, 2, 1]).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
    // Broadcast matmul: a weight [k, n] against a batch [2, 3, m, k]; its gradient sums
    // over the broadcast dims.
    let mut s = store();
    let w = s.add("w", &[4, 5], lisa_trainer::params::Init::LecunNormal { fan_in: 4 }).unwrap();
    check(
        "broadcast matmul",
        &mut s,
        randn(&[2, 3, 6, 4], 13),
        |p, x| p.tape.matmul(x, p.p(w), Default::default()).unwrap(),
        F32_FINITE_DIFFERENCE,
    );
}

fn tiny_config() -> ModelSpec {
    let toy = ToyConfig {
        unet: UNetConfig {
            resolution: 8,
            channels: vec![4, 8],
            norm_groups: 2,
            time_sinusoidal_dim: 8,
            time_dim: 8,
            attention: true,
            ..UNetConfig::default()
        },
        control: ControlConfig { hint_hidden: 4, ..ControlConfig::default() },
    };
    toy.to_spec(&DecoderConfig {
        hook: Some(HookLayer::Down(1)),
        time_sinusoidal_dim: 8,
        channel_floor: 2,
        ..DecoderConfig::default()
    })
}

struct Inputs {
    x_t: lisa_cpu::CpuTensor,
    hint: lisa_cpu::CpuTensor,
    y: lisa_cpu::CpuTensor,
    cond: Conditioning,
}

/// `L = MSE(pred, y) + λ·MSE(D(h), τ)` and, when asked, `∂L/∂θ` of every trainable tensor.
fn loss_and_grads(model: &dyn DualDenoiser<C>, inp: &Inputs, grads: bool) -> (f64, Vec<(ParamId, Vec<f32>)>) {
    let tape = Tape::<C>::new();
    let bound = model.store().bind(&tape);
    let (x_t, hint) = (tape.constant(inp.x_t.clone()), tape.constant(inp.hint.clone()));
    let out = forward_train(model, &bound, &x_t, &hint, &inp.cond, ForwardOptions::lisa(true)).unwrap();
    let (main, g_pred) = C::mse_loss(&out.pred.value, &inp.y).unwrap();
    let dec = out.decoded.unwrap();
    let terms = [SampleTerms::unit(); 2];
    let (lisa, g_dec) =
        C::lisa_loss(&LisaConfig::default(), &terms, &dec.value, &inp.y, out.prior.as_ref().unwrap()).unwrap();
    let loss = (main + lisa.weighted) as f64;
    if !grads {
        return (loss, Vec::new());
    }
    let leaves = bound.leaves();
    let mut g = tape.backward(&[(&out.pred, g_pred), (&dec, g_dec)]).unwrap();
    let out = leaves
        .into_iter()
        .map(|(pid, vid)| {
            let name = &model.store().get(pid).name;
            (pid, C::to_vec(&g.remove(vid).unwrap_or_else(|| panic!("no gradient reached {name}"))).unwrap())
        })
        .collect();
    (loss, out)
}

/// The whole dual-branch model with the LISA term: the analytic gradient of every side and
/// decoder tensor (largest element) against central differences of the true loss.
#[test]
fn whole_dual_branch_model_with_lisa_term() {
    let mut model = registry::build::<C>(&tiny_config(), Parts::Dual { decoder: true }, CpuDevice, 5).unwrap();
    // Move every trainable tensor (zero convs included) off its init so all receive gradient.
    let ids: Vec<_> = model.store().iter().filter(|(_, p)| p.trainable).map(|(id, _)| id).collect();
    for (k, &id) in ids.iter().enumerate() {
        let shape = C::shape(&model.store().get(id).value);
        let bump = C::scale(&randn(shape.dims(), 100 + k as u64), 0.2).unwrap();
        let v = C::add(&model.store().get(id).value, &bump).unwrap();
        model.store_mut().get_mut(id).value = v;
    }
    let inp = Inputs {
        x_t: randn(&[2, 3, 8, 8], 30),
        hint: randn(&[2, 1, 8, 8], 20),
        y: randn(&[2, 3, 8, 8], 21),
        cond: Conditioning { t: vec![3.0, 700.0], prompt: PromptEmbedding::Classes(vec![vec![1, 8], vec![0, 3]]) },
    };
    let (_, grads) = loss_and_grads(model.as_ref(), &inp, true);
    assert_eq!(grads.len(), ids.len(), "every trainable tensor gets a gradient");
    let tol = Tolerance { abs: 5e-3, rel: 2e-2 };
    for (pid, g) in grads {
        let name = model.store().get(pid).name.clone();
        let base = C::to_vec(&model.store().get(pid).value).unwrap();
        let shape = C::shape(&model.store().get(pid).value);
        let i = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let mut at = |d: f64| {
            let mut v = base.clone();
            v[i] = (v[i] as f64 + d) as f32;
            model.store_mut().get_mut(pid).value = C::from_slice(&v, &shape, DType::F32, &CpuDevice).unwrap();
            let l = loss_and_grads(model.as_ref(), &inp, false).0;
            model.store_mut().get_mut(pid).value = C::from_slice(&base, &shape, DType::F32, &CpuDevice).unwrap();
            l
        };
        let fd = (at(FD_STEP_F32) - at(-FD_STEP_F32)) / (2.0 * FD_STEP_F32);
        assert!(tol.accepts(g[i] as f64, fd), "dL/d{name}[{i}]: analytic {} vs fd {fd}", g[i]);
    }
}
