//! A multilayer perceptron (ReLU hidden layers, softmax cross-entropy) whose parameters live in
//! an optarena arena. With no hidden layer it is multinomial logistic regression.
//!
//! Forward and backward use ndarray's `general_mat_mul` (matrixmultiply) on views of the arena:
//! the backward pass writes each gradient straight into `arena.grad_mut(param)`, accumulating
//! as autograd does, so the optimizer reads it where it was written.

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use optarena::{Arena, ArenaBuilder, Param};
use rand::Rng;

use crate::data::{Dataset, CLASSES, FEATURES};

/// Layer widths, input first, classes last: `[64, 256, 256, 10]`, or `[64, 10]` for logistic
/// regression.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Architecture(pub Vec<usize>);

impl Architecture {
    /// An MLP with the given hidden widths.
    pub fn mlp(hidden: &[usize]) -> Self {
        let mut dims = vec![FEATURES];
        dims.extend_from_slice(hidden);
        dims.push(CLASSES);
        Architecture(dims)
    }

    /// Multinomial logistic regression (no hidden layer).
    pub fn logistic() -> Self {
        Architecture(vec![FEATURES, CLASSES])
    }

    /// Number of linear layers.
    pub fn layers(&self) -> usize {
        self.0.len() - 1
    }

    /// Total parameter count.
    pub fn num_params(&self) -> usize {
        self.0.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }

    /// Initial values in arena order (all weights, then all biases), as torch's `nn.Linear`
    /// draws them: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weights and biases.
    pub fn init(&self, rng: &mut impl Rng) -> Vec<f32> {
        let mut values = Vec::with_capacity(self.num_params());
        for w in self.0.windows(2) {
            let bound = 1.0 / (w[0] as f32).sqrt();
            values.extend((0..w[0] * w[1]).map(|_| rng.random_range(-bound..bound)));
        }
        for w in self.0.windows(2) {
            let bound = 1.0 / (w[0] as f32).sqrt();
            values.extend((0..w[1]).map(|_| rng.random_range(-bound..bound)));
        }
        values
    }
}

/// The model's parameters in an arena: weights first (`fc{i}.weight`, shape `[out, in]` as in
/// torch), then biases (`fc{i}.bias`), so "weights" and "biases" are two param groups of one
/// run each (weight decay on the first only); any order would do, this one is the fastest.
pub struct Mlp {
    /// Layer widths.
    pub arch: Architecture,
    /// `fc{i}.weight` handles.
    pub weights: Vec<Param<f32>>,
    /// `fc{i}.bias` handles.
    pub biases: Vec<Param<f32>>,
}

impl Mlp {
    /// Registers the parameters with values `init` (arena order, see [`Architecture::init`]).
    pub fn build(arch: &Architecture, init: &[f32]) -> optarena::Result<(Mlp, Arena<f32>)> {
        let mut b = ArenaBuilder::<f32>::new();
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        let mut at = 0;
        for (i, w) in arch.0.windows(2).enumerate() {
            let n = w[0] * w[1];
            weights.push(b.param(
                &format!("fc{}.weight", i + 1),
                &[w[1], w[0]],
                &init[at..at + n],
            )?);
            at += n;
        }
        for (i, w) in arch.0.windows(2).enumerate() {
            biases.push(b.param(&format!("fc{}.bias", i + 1), &[w[1]], &init[at..at + w[1]])?);
            at += w[1];
        }
        let model = Mlp {
            arch: arch.clone(),
            weights,
            biases,
        };
        Ok((model, b.build()))
    }

    /// Buffers for batches of up to `rows` samples.
    pub fn workspace(&self, rows: usize) -> Workspace {
        Workspace {
            acts: self
                .arch
                .0
                .iter()
                .map(|&d| Array2::zeros((rows, d)))
                .collect(),
            deltas: self
                .arch
                .0
                .iter()
                .map(|&d| Array2::zeros((rows, d)))
                .collect(),
        }
    }

    /// Forward pass of `ws.acts[0][..rows]`; leaves the logits in the last activation.
    fn forward(&self, arena: &Arena<f32>, ws: &mut Workspace, rows: usize) {
        let last = self.arch.layers();
        for l in 0..last {
            let w = weight_view(arena, self.weights[l], &self.arch, l);
            let bias = arena.value(self.biases[l]);
            let (done, rest) = ws.acts.split_at_mut(l + 1);
            let input = done[l].slice(s![..rows, ..]);
            let mut out = rest[0].slice_mut(s![..rows, ..]);
            // z = a · Wᵀ, then + b, then ReLU except on the logits.
            general_mat_mul(1.0, &input, &w.t(), 0.0, &mut out);
            let hidden = l + 1 < last;
            for mut row in out.rows_mut() {
                for (z, &b) in row.iter_mut().zip(bias) {
                    let v = *z + b;
                    *z = if hidden { v.max(0.0) } else { v };
                }
            }
        }
    }

    /// Loss and gradients of one mini-batch (rows `idx` of `data`): mean softmax cross-entropy.
    /// Gradients are added into the arena (`grad_mut`), so call `zero_grad` first. Returns the
    /// mean loss.
    pub fn loss_and_grad(
        &self,
        arena: &mut Arena<f32>,
        data: &Dataset,
        idx: &[usize],
        ws: &mut Workspace,
    ) -> f32 {
        let rows = idx.len();
        gather(data, idx, ws);
        self.forward(arena, ws, rows);
        let last = self.arch.layers();
        // dL/dz of the logits: (softmax − onehot) / rows.
        let logits = ws.acts[last].slice(s![..rows, ..]);
        let mut delta = ws.deltas[last].slice_mut(s![..rows, ..]);
        let mut loss = 0.0f64;
        let inv = 1.0 / rows as f32;
        for (r, (z, mut d)) in logits.rows().into_iter().zip(delta.rows_mut()).enumerate() {
            let label = data.y[idx[r]] as usize;
            let (lse, max) = log_sum_exp(z.as_slice().expect("contiguous row"));
            loss += f64::from(lse - (z[label] - max));
            for (c, (dv, &zv)) in d.iter_mut().zip(z.iter()).enumerate() {
                let p = (zv - max - lse).exp();
                *dv = (p - if c == label { 1.0 } else { 0.0 }) * inv;
            }
        }
        // Back through the layers, writing dW and db into the arena.
        for l in (0..last).rev() {
            let (lower, upper) = ws.deltas.split_at_mut(l + 1);
            let dz = upper[0].slice(s![..rows, ..]);
            let input = ws.acts[l].slice(s![..rows, ..]);
            let (out_dim, in_dim) = (self.arch.0[l + 1], self.arch.0[l]);
            {
                let g = arena.grad_mut(self.weights[l]);
                let mut gw = ArrayViewMut2::from_shape((out_dim, in_dim), g).expect("weight shape");
                general_mat_mul(1.0, &dz.t(), &input, 1.0, &mut gw);
            }
            {
                let gb = arena.grad_mut(self.biases[l]);
                for row in dz.rows() {
                    for (g, &d) in gb.iter_mut().zip(row) {
                        *g += d;
                    }
                }
            }
            if l > 0 {
                // dL/da of the layer below, then through its ReLU (a > 0 ⇔ z > 0).
                let w = weight_view(arena, self.weights[l], &self.arch, l);
                let mut da = lower[l].slice_mut(s![..rows, ..]);
                general_mat_mul(1.0, &dz, &w, 0.0, &mut da);
                da.zip_mut_with(&ws.acts[l].slice(s![..rows, ..]), |d, &a| {
                    if a <= 0.0 {
                        *d = 0.0;
                    }
                });
            }
        }
        (loss / rows as f64) as f32
    }

    /// Adds the L2 penalty `λ/2 · Σ W²` over the weights (not the biases) to the objective:
    /// `λ · W` into the weight gradients (call after [`Mlp::loss_and_grad`]). Returns the
    /// penalty.
    pub fn add_l2_penalty(&self, arena: &mut Arena<f32>, lambda: f32) -> f32 {
        let mut sum = 0.0f64;
        for &w in &self.weights {
            for i in 0..arena.info(w).len {
                let v = arena.value(w)[i];
                sum += f64::from(v) * f64::from(v);
                arena.grad_mut(w)[i] += lambda * v;
            }
        }
        (0.5 * f64::from(lambda) * sum) as f32
    }

    /// Mean loss and accuracy over a whole data set, in chunks of the workspace's size.
    pub fn evaluate(&self, arena: &Arena<f32>, data: &Dataset, ws: &mut Workspace) -> (f64, f64) {
        let chunk = ws.acts[0].len_of(Axis(0));
        let mut loss = 0.0f64;
        let mut correct = 0usize;
        let mut start = 0;
        let mut idx = Vec::with_capacity(chunk);
        while start < data.len() {
            let end = (start + chunk).min(data.len());
            idx.clear();
            idx.extend(start..end);
            gather(data, &idx, ws);
            self.forward(arena, ws, idx.len());
            let logits = ws.acts[self.arch.layers()].slice(s![..idx.len(), ..]);
            for (r, z) in logits.rows().into_iter().enumerate() {
                let label = data.y[idx[r]] as usize;
                let z = z.as_slice().expect("contiguous row");
                let (lse, max) = log_sum_exp(z);
                loss += f64::from(lse - (z[label] - max));
                let pred = z
                    .iter()
                    .enumerate()
                    .fold(0, |best, (c, &v)| if v > z[best] { c } else { best });
                correct += usize::from(pred == label);
            }
            start = end;
        }
        (loss / data.len() as f64, correct as f64 / data.len() as f64)
    }
}

/// Activations (`acts[l]`: input of layer `l`, logits last) and their gradients, sized for a
/// fixed maximum batch so that training allocates nothing per step.
pub struct Workspace {
    acts: Vec<Array2<f32>>,
    deltas: Vec<Array2<f32>>,
}

fn weight_view<'a>(
    arena: &'a Arena<f32>,
    w: Param<f32>,
    arch: &Architecture,
    l: usize,
) -> ArrayView2<'a, f32> {
    ArrayView2::from_shape((arch.0[l + 1], arch.0[l]), arena.value(w)).expect("weight shape")
}

/// Copies rows `idx` of `data` into the input activations.
fn gather(data: &Dataset, idx: &[usize], ws: &mut Workspace) {
    for (r, &i) in idx.iter().enumerate() {
        ws.acts[0]
            .row_mut(r)
            .as_slice_mut()
            .expect("contiguous row")
            .copy_from_slice(data.row(i));
    }
}

/// `(log Σ exp(z − max), max)`, the stable log-sum-exp of a row of logits.
fn log_sum_exp(z: &[f32]) -> (f32, f32) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
    (sum.ln(), max)
}
