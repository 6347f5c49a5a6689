//! Reverse-mode autodiff over any backend: a tape of recorded ops.
//!
//! Each op computes its value with the backend and, when gradients are enabled and some
//! input needs a gradient, records a node holding the op's backward closure (which owns
//! exactly the tensors it needs). [`Tape::backward`] runs the nodes in reverse, hands each
//! its output gradient, adds the input gradients into their producers, and **drops each
//! node as soon as its backward has run**, releasing the saved activations.
//!
//! - Constants ([`Tape::constant`], frozen weights, data) record nothing.
//! - Inside [`Tape::no_grad`] nothing is recorded at all.
//! - Trainable parameters enter as leaves ([`Tape::leaf`]); their gradients are returned by
//!   `backward`, keyed by the leaf's [`VarId`].

mod ops;
mod sequence;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use lisa_core::backend::Backend;

use crate::error::{Result, TrainError};

/// Identifies a recorded value on a tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId(usize);

/// A value on a tape: the tensor, and the node that produced it when it needs a gradient.
#[derive(Debug, Clone)]
pub struct Var<B: Backend> {
    /// The forward value.
    pub value: B::Tensor,
    node: Option<VarId>,
}

impl<B: Backend> Var<B> {
    /// The node id, when this value needs a gradient.
    pub fn id(&self) -> Option<VarId> {
        self.node
    }

    /// Whether a gradient flows back from this value.
    pub fn requires_grad(&self) -> bool {
        self.node.is_some()
    }
}

type BackwardFn<B> = Box<
    dyn FnOnce(
        &<B as lisa_core::backend::BackendTypes>::Tensor,
    ) -> Result<Vec<Option<<B as lisa_core::backend::BackendTypes>::Tensor>>>,
>;

struct Node<B: Backend> {
    /// The producers of the op's inputs (None: a constant input).
    inputs: Vec<Option<VarId>>,
    /// None for a leaf.
    backward: Option<BackwardFn<B>>,
}

/// A tape of recorded ops (single-threaded; one per training step).
pub struct Tape<B: Backend> {
    nodes: RefCell<Vec<Option<Node<B>>>>,
    grad_enabled: Cell<bool>,
}

impl<B: Backend> Default for Tape<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// The gradients of a backward pass, by leaf.
pub struct Gradients<B: Backend> {
    grads: HashMap<VarId, B::Tensor>,
}

impl<B: Backend> Default for Gradients<B> {
    fn default() -> Self {
        Self { grads: HashMap::new() }
    }
}

impl<B: Backend> Gradients<B> {
    /// The gradient of a leaf, if any gradient reached it.
    pub fn get(&self, id: VarId) -> Option<&B::Tensor> {
        self.grads.get(&id)
    }

    /// Takes the gradient of a leaf out.
    pub fn remove(&mut self, id: VarId) -> Option<B::Tensor> {
        self.grads.remove(&id)
    }
}

impl<B: Backend> Tape<B> {
    /// An empty tape with gradients enabled.
    pub fn new() -> Self {
        Self { nodes: RefCell::new(Vec::new()), grad_enabled: Cell::new(true) }
    }

    /// A value that never receives a gradient (data, frozen weights).
    pub fn constant(&self, value: B::Tensor) -> Var<B> {
        Var { value, node: None }
    }

    /// A trainable leaf (a parameter for this step): its gradient is reported by `backward`.
    pub fn leaf(&self, value: B::Tensor) -> Var<B> {
        let id = self.push(Node { inputs: Vec::new(), backward: None });
        Var { value, node: Some(id) }
    }

    /// Runs `f` without recording anything (outputs are constants).
    pub fn no_grad<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.grad_enabled.replace(false);
        let out = f();
        self.grad_enabled.set(before);
        out
    }

    /// Whether ops currently record.
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled.get()
    }

    /// The number of nodes still held (recorded and not yet back-propagated).
    pub fn live_nodes(&self) -> usize {
        self.nodes.borrow().iter().filter(|n| n.as_ref().is_some_and(|n| n.backward.is_some())).count()
    }

    fn push(&self, node: Node<B>) -> VarId {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Some(node));
        VarId(nodes.len() - 1)
    }

    /// Records an op's output. `backward` maps the output gradient to one gradient per input
    /// (None where the input needs none). Nothing is recorded when gradients are disabled or
    /// no input needs a gradient.
    pub(crate) fn record(
        &self,
        value: B::Tensor,
        inputs: &[&Var<B>],
        backward: impl FnOnce(&B::Tensor) -> Result<Vec<Option<B::Tensor>>> + 'static,
    ) -> Var<B> {
        if !self.grad_enabled.get() || inputs.iter().all(|v| v.node.is_none()) {
            return Var { value, node: None };
        }
        let id =
            self.push(Node { inputs: inputs.iter().map(|v| v.node).collect(), backward: Some(Box::new(backward)) });
        Var { value, node: Some(id) }
    }

    /// Back-propagates from several roots at once, each with its seed gradient
    /// (`∂L/∂root`, e.g. from a fused loss). Returns the gradients of every leaf reached.
    /// Nodes are released as they are processed; the tape can be reused afterwards.
    pub fn backward(&self, roots: &[(&Var<B>, B::Tensor)]) -> Result<Gradients<B>> {
        let mut leaves = HashMap::new();
        self.backward_each(roots, |id, grad| {
            leaves.insert(id, grad);
            Ok(())
        })?;
        Ok(Gradients { grads: leaves })
    }

    /// [`Tape::backward`], handing each leaf's gradient to `on_leaf` as soon as it is final:
    /// a leaf is recorded before every op that reads it, so the reverse sweep reaches it after
    /// all of them. A data-parallel step starts reducing gradients while the sweep goes on.
    pub fn backward_each(
        &self,
        roots: &[(&Var<B>, B::Tensor)],
        mut on_leaf: impl FnMut(VarId, B::Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut pending: HashMap<VarId, B::Tensor> = HashMap::new();
        for (var, seed) in roots {
            let id = var.node.ok_or(TrainError::Autodiff("backward from a value that needs no gradient"))?;
            accumulate::<B>(&mut pending, id, seed.clone())?;
        }
        let last = self.nodes.borrow().len();
        for index in (0..last).rev() {
            let id = VarId(index);
            let Some(node) = self.nodes.borrow_mut()[index].take() else {
                continue;
            };
            let Some(grad) = pending.remove(&id) else {
                continue;
            };
            match node.backward {
                None => on_leaf(id, grad)?,
                Some(backward) => {
                    let input_grads = backward(&grad)?;
                    if input_grads.len() != node.inputs.len() {
                        return Err(TrainError::Autodiff("an op's backward returned the wrong number of gradients"));
                    }
                    for (input, g) in node.inputs.iter().zip(input_grads) {
                        if let (Some(input), Some(g)) = (input, g) {
                            accumulate::<B>(&mut pending, *input, g)?;
                        }
                    }
                }
            }
        }
        self.nodes.borrow_mut().clear();
        Ok(())
    }
}

fn accumulate<B: Backend>(pending: &mut HashMap<VarId, B::Tensor>, id: VarId, g: B::Tensor) -> Result<()> {
    match pending.remove(&id) {
        Some(prev) => {
            pending.insert(id, B::add(&prev, &g)?);
        }
        None => {
            pending.insert(id, g);
        }
    }
    Ok(())
}
