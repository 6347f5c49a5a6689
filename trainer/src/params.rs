//! Named parameters, their per-step binding onto a tape, and seeded initialisation.

mod scope;

use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::rng::fill_normal;

use crate::autodiff::{Tape, Var, VarId};
use crate::error::{Result, TrainError};

pub use scope::Scope;

/// Index of a parameter in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub(crate) usize);

/// One named tensor of a model.
#[derive(Debug, Clone)]
pub struct Param<B: Backend> {
    /// Dotted name, e.g. `side.down.1.res.conv1.weight` (the checkpoint tensor name).
    pub name: String,
    /// The current value.
    pub value: B::Tensor,
    /// Whether the optimizer updates it (and it records gradients).
    pub trainable: bool,
}

/// How a new parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros (biases, ControlNet zero convs, the LISA decoder's last conv).
    Zeros,
    /// All ones (norm scales).
    Ones,
    /// `N(0, 1/fan_in)` (LeCun normal), from the store's seeded stream.
    LecunNormal {
        /// Inputs per output unit.
        fan_in: usize,
    },
}

/// All parameters of a model, in creation order, with unique names. Whether a new parameter
/// is trainable follows from its name: those under a frozen prefix (the main network's
/// `main.` during control training) are constants, every other one is trained.
#[derive(Debug, Clone)]
pub struct ParamStore<B: Backend> {
    params: Vec<Param<B>>,
    device: B::Device,
    seed: u64,
    frozen: Vec<String>,
    autocast: Option<DType>,
}

impl<B: Backend> ParamStore<B> {
    /// An empty store; initial values derive from `seed` and each parameter's index.
    pub fn new(device: B::Device, seed: u64) -> Self {
        Self { params: Vec::new(), device, seed, frozen: Vec::new(), autocast: None }
    }

    /// Autocast (accelerate's `--mixed_precision`): every forward bound from this store runs
    /// its matmuls, convolutions, norms and attention with `dtype` inputs (None: each layer in
    /// its weights' dtype, the default). The weights themselves stay as stored; f32 ones are
    /// cast once per bind ([`Bound::weight`]) and their gradients come back in f32.
    pub fn set_autocast(&mut self, dtype: Option<DType>) {
        self.autocast = dtype.filter(|d| *d != DType::F32);
    }

    /// The autocast dtype, if any ([`ParamStore::set_autocast`]).
    pub fn autocast(&self) -> Option<DType> {
        self.autocast
    }

    /// Parameters added later whose names start with `prefix` are frozen (not trainable).
    pub fn freeze_prefix(mut self, prefix: &str) -> Self {
        self.frozen.push(prefix.to_string());
        self
    }

    /// The device parameters live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Creates a parameter (trainable unless under a frozen prefix). Names must be unique.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> Result<ParamId> {
        let name = name.into();
        let trainable = !self.frozen.iter().any(|f| name.starts_with(f.as_str()));
        if self.params.iter().any(|p| p.name == name) {
            return Err(TrainError::Config(format!("duplicate parameter name {name}")));
        }
        let shape = Shape::new(shape);
        let n = shape.num_elements()?;
        let data = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::LecunNormal { fan_in } => {
                let mut v = vec![0.0f32; n];
                fill_normal(
                    self.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(self.params.len() as u64 + 1)),
                    0,
                    &mut v,
                );
                let std = 1.0 / (fan_in.max(1) as f32).sqrt();
                v.iter_mut().for_each(|x| *x *= std);
                v
            }
        };
        let value = B::from_slice(&data, &shape, DType::F32, &self.device)?;
        self.params.push(Param { name, value, trainable });
        Ok(ParamId(self.params.len() - 1))
    }

    /// The parameter behind `id`.
    pub fn get(&self, id: ParamId) -> &Param<B> {
        &self.params[id.0]
    }

    /// Mutable access (optimizer updates, weight copies).
    pub fn get_mut(&mut self, id: ParamId) -> &mut Param<B> {
        &mut self.params[id.0]
    }

    /// All parameters with their ids.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param<B>)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }

    /// The id of the parameter called `name`.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(ParamId)
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Scalar count of the trainable (or all) parameters.
    pub fn count(&self, trainable_only: bool) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable || !trainable_only)
            .map(|p| B::shape(&p.value).num_elements().unwrap_or(0))
            .sum()
    }

    /// Binds every parameter onto `tape` for one forward pass: trainable ones as leaves
    /// (their gradients come back from `backward`), frozen ones as constants.
    pub fn bind<'t>(&self, tape: &'t Tape<B>) -> Bound<'t, B> {
        let params = self.params.iter().map(|p| (p.value.clone(), p.trainable)).collect::<Vec<_>>();
        let vars = (0..params.len()).map(|_| std::cell::OnceCell::new()).collect();
        let casts = std::cell::RefCell::new(vec![[None, None]; params.len()]);
        Bound { tape, params, vars, autocast: self.autocast, casts }
    }
}

/// Parameters bound onto a tape for one forward pass.
pub struct Bound<'t, B: Backend> {
    /// The tape ops record on.
    pub tape: &'t Tape<B>,
    /// Each parameter's value and whether it trains.
    params: Vec<(B::Tensor, bool)>,
    /// Each parameter's variable, made at its first use: a trainable one's leaf is then
    /// recorded just before the first op that reads it, so the backward's sweep reaches it
    /// (and its gradient is final) as soon as it has passed that op, while the sweep goes on
    /// ([`Tape::backward_each`]).
    vars: Vec<std::cell::OnceCell<Var<B>>>,
    autocast: Option<DType>,
    /// Each parameter's cast to the autocast dtype, made at its first use in this pass: one
    /// slot for recorded use, one for use under no-grad (sampling binds once and runs every
    /// step without recording).
    casts: std::cell::RefCell<Vec<[Option<Var<B>>; 2]>>,
}

impl<'t, B: Backend> Bound<'t, B> {
    /// The bound value of a parameter.
    pub fn p(&self, id: ParamId) -> &Var<B> {
        self.vars[id.0].get_or_init(|| {
            let (value, trainable) = &self.params[id.0];
            if *trainable { self.tape.leaf(value.clone()) } else { self.tape.constant(value.clone()) }
        })
    }

    /// The dtype a layer whose weight is `w` computes in: the autocast dtype when the store
    /// has one, else `w`'s own.
    pub fn compute_dtype(&self, w: ParamId) -> DType {
        self.autocast.unwrap_or_else(|| B::dtype(&self.params[w.0].0))
    }

    /// The autocast dtype of this pass, if any ([`ParamStore::set_autocast`]).
    pub fn autocast(&self) -> Option<DType> {
        self.autocast
    }

    /// Parameter `id` as `dtype`: itself when stored so, else a differentiable cast made once
    /// per pass (torch autocast's weight cache), whose backward returns the gradient in the
    /// stored dtype (the f32 master weight's).
    pub fn weight(&self, id: ParamId, dtype: DType) -> Result<Var<B>> {
        let var = self.p(id);
        if B::dtype(&var.value) == dtype {
            return Ok(var.clone());
        }
        let slot = usize::from(!self.tape.grad_enabled());
        if let Some(cast) = &self.casts.borrow()[id.0][slot]
            && B::dtype(&cast.value) == dtype
        {
            return Ok(cast.clone());
        }
        let cast = self.tape.cast(var, dtype)?;
        // A cast made while the tape records carries the gradient when its weight needs one;
        // one made under no-grad never does, and serves only no-grad uses.
        if slot == 1 || cast.requires_grad() == var.requires_grad() {
            self.casts.borrow_mut()[id.0][slot] = Some(cast.clone());
        }
        Ok(cast)
    }

    /// The tape leaf of each trainable parameter, to read gradients after `backward`.
    pub fn leaves(&self) -> Vec<(ParamId, VarId)> {
        self.vars.iter().enumerate().filter_map(|(i, v)| v.get()?.id().map(|id| (ParamId(i), id))).collect()
    }
}
