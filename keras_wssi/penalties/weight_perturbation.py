"""Penalties for robustness to weight perturbations: the theory-driven loss and sharpness-aware minimization.

- `WeightPerturbationLoss`: Tsai, Hsu, Yu, Chen, "Formalizing Generalization and Robustness of Neural
  Networks to Weight Perturbations" (arXiv 2103.02200), whose certified-margin bound and perturbed-class
  complexity (see `keras_wssi.margin_bounds`, shared with `keras_wssi.analysis.certified_margins`) become a margin hinge and a complexity term.
  The combination is our reconstruction (DESIGN.md §1.4).
- `SharpnessAwareMinimization`: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for
  Efficiently Improving Generalization" (ICLR 2021), the comparison baseline, written as a penalty whose
  value is the sharpness `L(w + ε̂) − L(w)`: with strength 1 the total gradient is exactly the SAM gradient
  `∇L(w + ε̂)`.
"""

from keras import ops

from keras_wssi import backend
from keras_wssi import linalg
from keras_wssi import margin_bounds
from keras_wssi import structure
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_penalty

__all__ = ["SharpnessAwareMinimization", "WeightPerturbationLoss"]


def _non_negative(value, argument):
    return margin_bounds.validate_epsilon(value, argument)


@register_penalty("weight_perturbation")
class WeightPerturbationLoss(Penalty):
    """The theory-driven loss for robustness to weight perturbations (Tsai et al. 2021; reconstructed).

    With the certified-margin bounds `bound_{y,i}` of `keras_wssi.margin_bounds` (the worst-case decrease of the margin `m_{y,i} = z_y − z_i` over `||Δ_l|| ≤ ε_l`) the value is

        margin_weight · mean_x max_{i≠y} [bound_{y,i}(x) − m_{y,i}(x)]_+  +  complexity_weight · ∏_l (||W_l|| + ε_l)

    (the mean is weighted by `sample_weight`). The first term is zero exactly when the example is certified
    at radius ε; the second is the factor through which the Rademacher complexity of the perturbed class
    grows. Added to the cross-entropy with `strength`, this is DESIGN.md's
    `CE + λ1 · hinge + λ2 · ∏(||W_l|| + ε_l)` with `λ1 = strength · margin_weight`,
    `λ2 = strength · complexity_weight`.

    Args:
        strength: overall weight.
        epsilon: the radius ε ≥ 0 of every perturbed layer (absolute, in the operator norm `norm`).
        margin_weight: weight of the margin hinge term (≥ 0).
        complexity_weight: weight of the complexity term (≥ 0).
        norm: `"inf"` (max-row-ℓ1, default) or `"1"` (max-column-ℓ1); cheap and differentiable.
        layers: names of the perturbed weight layers (None: all); the others get ε_l = 0.
        mode: `"norm"` (DESIGN.md's bound from `||x||` and weight norms; Dense chains), `"activation"` (uses
            the hidden activations; tighter, one extra forward pass of the Dense chain), `"interval"`
            (element-wise bounds of every activation: two extra matrix products per layer, one with `|W|`;
            Dense and convolutional chains; far tighter) or `"linear"` (linear bounds, as the certificate's
            default but without refining hidden boxes: one extra backward pass per class; the tightest and
            the most expensive). docs/weight_perturbation_and_slope.md §3 gives the measured step times.
        name: metric name (default `"weight_perturbation"`).

    Example:

    ```python
    model = keras_wssi.architectures.mlp(hidden_units=(256,))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  regularizers=[keras_wssi.penalties.WeightPerturbationLoss(1.0, epsilon=1e-3)])
    ```
    """

    default_name = "weight_perturbation"
    requires = frozenset({"weights", "inputs", "labels", "logits"})

    def __init__(
        self,
        strength=1.0,
        epsilon=1e-3,
        margin_weight=1.0,
        complexity_weight=1e-4,
        norm="inf",
        layers=None,
        mode="norm",
        name=None,
    ):
        self.epsilon = _non_negative(epsilon, "epsilon")
        self.margin_weight = _non_negative(margin_weight, "margin_weight")
        self.complexity_weight = _non_negative(complexity_weight, "complexity_weight")
        self.norm = margin_bounds.validate_weight_norm(norm)
        if self.norm == "2":
            raise ValueError("norm: the training loss supports 'inf' and '1' (the spectral norm needs an SVD per step).")
        self.mode = margin_bounds.validate_mode(mode)
        if layers is not None:
            if isinstance(layers, str):
                layers = [layers]
            layers = [str(name) for name in layers]
        self.layers = layers
        super().__init__(strength=strength, name=name)

    def build(self, model):
        method = f"The penalty {self.name!r}"
        if self.mode in ("norm", "activation"):
            self._chain = structure.dense_chain(model, method=method)
            self._dense = self._chain
            kernels = self._chain.kernels
        else:
            self._chain = structure.feedforward_chain(model, method=method)
            kernels = [op.layer.kernel for op in self._chain.weight_ops]
            try:
                self._dense = structure.dense_chain(model, method=method)
            except structure.StructureError:
                self._dense = None
        self._kernels = kernels
        self._radii = margin_bounds.layer_radii(self._chain.names, kernels, self.epsilon, layers=self.layers, norm=self.norm)
        super().build(model)

    def call(self, context):
        if context.y is None:
            raise ValueError(f"{self.name} needs labels (y) to compute margins.")
        logits = context.logits
        labels = margin_bounds.labels_vector(context.y, logits.shape[-1])
        margins = margin_bounds.margins(ops.cast(logits, "float32"), labels)
        if self.mode in ("norm", "activation"):
            bounds = margin_bounds.activation_norm_bounds(self._chain, context.x, labels, self._radii, self.norm, self.mode)
        else:
            # The hinge uses the step's own margins; the bound's lower margins enter through their distance.
            result = margin_bounds.bound_margins(
                self._chain, context.x, labels, self._radii, self.norm, self.mode, dense=None, refine_limit=0,
                dtype="float32",
            )
            bounds = result["margins"] - result["lower"]
        # Column y has bound 0 and margin 0: its hinge is 0, so the max over all columns is the max over i ≠ y.
        hinge = ops.max(ops.relu(bounds - margins), axis=-1)
        value = ops.zeros((), "float32")
        if self.margin_weight:
            value += self.margin_weight * context.reduce_per_example(hinge)
        if self.complexity_weight:
            value += self.complexity_weight * margin_bounds.perturbed_class_complexity(self._kernels, self._radii, self.norm)
        return value

    def get_config(self):
        config = super().get_config()
        config.update(
            epsilon=self.epsilon,
            margin_weight=self.margin_weight,
            complexity_weight=self.complexity_weight,
            norm=self.norm,
            layers=list(self.layers) if self.layers is not None else None,
            mode=self.mode,
        )
        return config


@register_penalty("sam")
class SharpnessAwareMinimization(Penalty):
    """Sharpness-aware minimization (Foret et al., ICLR 2021) as a penalty: value `L(w + ε̂) − L(w)`.

    `ε̂ = ρ g / ||g||` with `g = ∇_w L(w)` (the global norm over all trainable weights, guarded at 0) is
    computed from a separate forward/backward pass and held constant; `L(w + ε̂)` is a stateless call of the
    model with the perturbed weights, differentiable in `w`; `L(w)` is the step's own compiled loss. With
    `strength=1` the loop's total loss is `L(w + ε̂)` in value and gradient (the SAM update); another strength
    `λ` gives `(1 − λ) ∇L(w) + λ ∇L(w + ε̂)`. The logged metric is the sharpness. `L` is the compiled loss
    (without `model.losses`); state updates of the perturbed pass (BatchNorm statistics) are discarded, and
    dropout draws different masks in the three passes.

    Args:
        strength: λ (1 is SAM).
        rho: the neighbourhood radius ρ > 0.
        name: metric name (default `"sam"`).

    Example:

    ```python
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  regularizers=[keras_wssi.penalties.SharpnessAwareMinimization(rho=0.05)])
    ```
    """

    default_name = "sam"
    requires = frozenset({"weights", "inputs", "labels", "logits"})

    def __init__(self, strength=1.0, rho=0.05, name=None):
        self.rho = _non_negative(rho, "rho")
        if self.rho == 0.0:
            raise ValueError("rho must be a positive radius, got 0.")
        super().__init__(strength=strength, name=name)

    def call(self, context):
        model = context.model
        # The current values (inside a training step: the step's values); the inner gradient is taken with
        # respect to them as primals and held constant.
        values = [ops.convert_to_tensor(v.value) for v in model.trainable_variables]
        non_trainable = [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables]

        def loss_at(*weights):
            outputs, _ = model.stateless_call(list(weights), non_trainable, context.x, training=context.training)
            return context.compiled_loss(outputs)

        gradients = backend.grad(loss_at, *values)
        gradients = [ops.stop_gradient(ops.cast(g, "float32")) for g in gradients]
        # Global norm over all weights, guarded: a zero gradient gives ε̂ = 0 (value 0), never NaN.
        global_norm = linalg.safe_norm(ops.stack([linalg.safe_norm(g) for g in gradients]))
        scale = self.rho / global_norm
        perturbed = [v + ops.cast(scale * g, v.dtype) for v, g in zip(values, gradients)]
        perturbed_outputs, _ = model.stateless_call(perturbed, non_trainable, context.x, training=context.training)
        return context.compiled_loss(perturbed_outputs) - context.compiled_loss(context._raw_logits)

    def get_config(self):
        config = super().get_config()
        config.update(rho=self.rho)
        return config
