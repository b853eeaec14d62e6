"""Jacobian-norm penalties from vector-Jacobian products: input gradient (double backprop), Jacobian Frobenius
(random projections or exact) and cross-Lipschitz (DESIGN.md §1.2, §1.3).

Each value is a sum of squared products `||cᵀ J||²` of the step's own forward pass, one VJP per direction `c`.
"""

import numpy as np
from keras import ops

from keras_wssi import validation
from keras_wssi.penalties.base import register_penalty
from keras_wssi.penalties.logit_jacobian import LOSSES
from keras_wssi.penalties.logit_jacobian import LogitJacobianPenalty
from keras_wssi.penalties.logit_jacobian import RandomLogitJacobianPenalty
from keras_wssi.penalties.logit_jacobian import checked_logits
from keras_wssi.penalties.logit_jacobian import loss_cotangent
from keras_wssi.penalties.logit_jacobian import per_example_power_norm

__all__ = ["CrossLipschitz", "InputGradient", "JacobianFrobenius"]


@register_penalty("input_gradient")
class InputGradient(LogitJacobianPenalty):
    """Input-gradient penalty (double backpropagation): the mean over the batch of `||∇_x ℓ(x_i)||_p^power`.

    Drucker & LeCun (1992); Ross & Doshi-Velez (2018). `∇_x ℓ = Jᵀ (∂ℓ/∂z)` is one vector-Jacobian product of
    the step's own forward pass; the penalty's weight gradient is a second backward pass through it (double
    backprop). The value is exact, not an estimate. With cross-entropy, `∇_x ℓ = Jᵀ(p − e_y)`, so the penalty is
    `(p − e_y)ᵀ J Jᵀ (p − e_y)` (DESIGN.md §1.3).

    Args:
        strength: λ.
        loss: `"cross_entropy"` (softmax cross-entropy on the logits, default) or `"compiled"` (the model's
            compiled loss, per example, applied to the model's output).
        p: the norm of the gradient, `p >= 1` (2 by default).
        power: the exponent applied to the norm (2 by default: `||∇_x ℓ||²`).
        epsilon: guard of the norm at 0 (used unless `p == power`, where no root is taken).
        name: metric name, `"input_gradient"` by default.

    Example:

    ```python
    model = keras_wssi.architectures.mlp()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  regularizers=[keras_wssi.penalties.InputGradient(0.1)], jit_compile=True)
    ```
    """

    default_name = "input_gradient"

    def __init__(self, strength=0.1, loss="cross_entropy", p=2.0, power=2.0, epsilon=1e-12, name=None):
        self.loss = validation.choice(loss, LOSSES, "loss")
        self.p = validation.finite_float(p, "p", minimum=1.0)
        self.power = validation.positive_float(power, "power")
        self.epsilon = validation.positive_float(epsilon, "epsilon")
        super().__init__(strength=strength, name=name)

    def call(self, context):
        logits = checked_logits(context, self.name)
        cotangent = loss_cotangent(logits, context.y, self.loss, context.model, self.name)
        gradients = context.vjp(cotangent)
        return context.reduce_per_example(per_example_power_norm(gradients, self.p, self.power, self.epsilon))

    def get_config(self):
        return {**super().get_config(), "loss": self.loss, "p": self.p, "power": self.power, "epsilon": self.epsilon}


@register_penalty("jacobian_frobenius")
class JacobianFrobenius(RandomLogitJacobianPenalty):
    """Jacobian Frobenius penalty `½ ||J||_F²` (Hoffman, Roberts & Yaida, arXiv 1908.02729), mean over the batch.

    With `num_projections = n ≥ 1`, the unbiased random-projection estimate `½ · C/n · Σ_μ ||v_μᵀ J||²` with
    `v_μ` uniform on the unit sphere of `R^C` (`E[v vᵀ] = I/C`): one vector-Jacobian product per projection, new
    directions every step. With `num_projections=-1` the value is exact: `½ Σ_c ||e_cᵀ J||²` (C products).

    Args:
        strength: λ (the paper's `λ_JR`; the ½ is part of the value, as in the paper).
        num_projections: `n ≥ 1` random projections, or `-1` for the exact value.
        seed: seed of the random directions (None: nondeterministic).
        name: metric name, `"jacobian_frobenius"` by default.

    Example:

    ```python
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.JacobianFrobenius(0.01, num_projections=1)])
    ```
    """

    default_name = "jacobian_frobenius"

    def __init__(self, strength=0.01, num_projections=1, seed=None, name=None):
        if isinstance(num_projections, bool) or not isinstance(num_projections, (int, np.integer)) or (
            num_projections != -1 and num_projections < 1
        ):
            raise ValueError(f"num_projections must be an integer >= 1, or -1 for the exact value; got {num_projections!r}.")
        self.num_projections = int(num_projections)
        super().__init__(seed=seed, strength=strength, name=name)

    def call(self, context):
        logits = checked_logits(context, self.name)
        batch, num_classes = ops.shape(logits)[0], logits.shape[-1]
        total = ops.zeros([batch], "float32")
        if self.num_projections == -1:
            for row in np.eye(num_classes, dtype=np.float32):
                rows = context.vjp(ops.broadcast_to(ops.convert_to_tensor(row)[None], [batch, num_classes]))
                total += ops.sum(ops.square(ops.reshape(rows, [batch, -1])), axis=-1)
        else:
            for _ in range(self.num_projections):
                rows = context.vjp(self._unit_vectors(batch, num_classes))
                total += ops.sum(ops.square(ops.reshape(rows, [batch, -1])), axis=-1)
            total *= float(num_classes) / float(self.num_projections)
        return context.reduce_per_example(0.5 * total)

    def get_config(self):
        return {**super().get_config(), "num_projections": self.num_projections, "seed": self.seed}


@register_penalty("cross_lipschitz")
class CrossLipschitz(RandomLogitJacobianPenalty):
    """Cross-Lipschitz penalty (Hein & Andriushchenko 2017): `1/C² Σ_{l,m} ||∇z_l − ∇z_m||²`, mean over the batch.

    Computed through the identity `Σ_{l,m} ||∇z_l − ∇z_m||² = 2C ||P J||_F²` (Guo et al., arXiv 2007.02209;
    DESIGN.md §1.3), i.e. the value is `(2/C) ||P J||_F²`. Exact (`num_projections=-1`, default): `||P J||_F²` is
    summed over an orthonormal basis `q_1 … q_{C−1}` of the centered subspace `1^⊥`, so it costs `C − 1`
    vector-Jacobian products, not the `C²` differences. Estimate (`n ≥ 1`): `(C − 1)/n Σ_μ ||v_μᵀ J||²` with `v_μ`
    uniform on the unit sphere of `1^⊥` (`E[v vᵀ] = P/(C − 1)`), unbiased.

    Args:
        strength: λ.
        num_projections: `-1` (exact, default) or `n ≥ 1` random projections.
        seed: seed of the random directions.
        name: metric name, `"cross_lipschitz"` by default.

    Example:

    ```python
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.CrossLipschitz(0.01)])
    ```
    """

    default_name = "cross_lipschitz"

    def __init__(self, strength=0.01, num_projections=-1, seed=None, name=None):
        if isinstance(num_projections, bool) or not isinstance(num_projections, (int, np.integer)) or (
            num_projections != -1 and num_projections < 1
        ):
            raise ValueError(f"num_projections must be an integer >= 1, or -1 for the exact value; got {num_projections!r}.")
        self.num_projections = int(num_projections)
        super().__init__(seed=seed, strength=strength, name=name)

    @staticmethod
    def centered_basis(num_classes):
        """`(C − 1, C)` orthonormal rows spanning `1^⊥` (Helmert-like, from a QR of the centering projector)."""
        projector = np.eye(num_classes) - np.full((num_classes, num_classes), 1.0 / num_classes)
        q, _ = np.linalg.qr(projector[:, : num_classes - 1])
        return q.T.astype(np.float32)

    def call(self, context):
        logits = checked_logits(context, self.name)
        batch, num_classes = ops.shape(logits)[0], logits.shape[-1]
        total = ops.zeros([batch], "float32")
        if self.num_projections == -1:
            for row in self.centered_basis(num_classes):
                rows = context.vjp(ops.broadcast_to(ops.convert_to_tensor(row)[None], [batch, num_classes]))
                total += ops.sum(ops.square(ops.reshape(rows, [batch, -1])), axis=-1)
        else:
            for _ in range(self.num_projections):
                rows = context.vjp(self._unit_vectors(batch, num_classes, centered=True))
                total += ops.sum(ops.square(ops.reshape(rows, [batch, -1])), axis=-1)
            total *= float(num_classes - 1) / float(self.num_projections)
        return context.reduce_per_example((2.0 / num_classes) * total)

    def get_config(self):
        return {**super().get_config(), "num_projections": self.num_projections, "seed": self.seed}
