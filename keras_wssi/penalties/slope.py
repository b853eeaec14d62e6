"""The slope penalty: the mean of `slope(x)^power` over the batch, `slope(x) = σ_max(∂logits/∂x)`.

Johansson, Engsner, Strannegård, Mostad, "Slope and generalization properties of neural networks"
(arXiv 2107.01473) propose the slope as a regularizer; this penalizes the exact per-example slope.
"""

from keras import ops

from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi import validation
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_penalty

__all__ = ["METHODS", "SlopePenalty"]

METHODS = ("auto", "exact", "power_iteration")


@register_penalty("slope")
class SlopePenalty(Penalty):
    """Mean over the batch of `σ_max(J(x))^power`, `J = ∂logits/∂x` (Johansson et al. 2021).

    - `method="exact"` (Dense chains with elementwise activations): the Jacobian `W_L D_{L-1} … D_1 W_1` is
      formed from one extra forward pass of the chain, and `σ_max²` is `||vᵀ J||²` with `v` the top
      eigenvector of `J Jᵀ` (C×C) held constant (envelope theorem: the gradient is exact), both from
      `keras_wssi.linalg` (`dense_chain_jacobian`, `spectral_norm_squared`: no eigen-solver in the step).
    - `method="power_iteration"` (any model with one tensor input): `iterations` rounds of power iteration on
      `J Jᵀ` from the step's own forward pass (VJPs and VJP-of-VJP JVPs), then `σ² = ||vᵀ J||²`; a lower
      estimate of σ_max² that is exact at convergence.
    - `method="auto"`: exact when the model is a Dense chain, else power iteration.

    `power=2` penalizes `σ_max²` (smooth); `power=1` penalizes `sqrt(σ_max² + 1e-12)` (guarded at zero).

    Args:
        strength: λ.
        power: 1 or 2.
        method: `"auto"`, `"exact"` or `"power_iteration"`.
        iterations: power-iteration rounds (method `"power_iteration"`).
        name: metric name (default `"slope"`).

    Example:

    ```python
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  regularizers=[keras_wssi.penalties.SlopePenalty(1e-3)])
    ```
    """

    default_name = "slope"

    def __init__(self, strength=1e-3, power=2, method="auto", iterations=3, name=None):
        if isinstance(power, bool) or power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power!r}.")
        self.power = int(power)
        self.method = validation.choice(method, METHODS, "method")
        self.iterations = validation.positive_int(iterations, "iterations")
        # "auto" is resolved in build(); until then assume the general path (which needs the input-Jacobian products).
        self.requires = frozenset({"weights", "inputs"} | ({"input_jacobian"} if method != "exact" else set()))
        self._resolved = None
        super().__init__(strength=strength, name=name)

    def build(self, model):
        self._chain = None
        if self.method in ("auto", "exact"):
            try:
                self._chain = structure.dense_chain(model, method=f"The exact slope penalty {self.name!r}")
            except structure.StructureError:
                if self.method == "exact":
                    raise
        self._resolved = "exact" if self._chain is not None else "power_iteration"
        self.requires = frozenset({"weights", "inputs"} | ({"input_jacobian"} if self._resolved != "exact" else set()))
        super().build(model)

    def call(self, context):
        if self._resolved == "exact":
            chain = self._chain
            jacobian = linalg.dense_chain_jacobian(
                chain.kernels, [layer.bias for layer in chain.layers], chain.activations, context.x
            )
            _, sigma_squared = linalg.spectral_norm_squared(jacobian)
        else:
            num_classes = context.logits.shape[-1]
            start = ops.ones([context.batch_size, num_classes], "float32") + ops.arange(num_classes, dtype="float32")[None] * 0.1
            _, sigma_squared = linalg.jacobian_power_iteration(context.vjp, context.jvp, start, self.iterations)
        values = sigma_squared if self.power == 2 else ops.sqrt(sigma_squared + 1e-12)
        return context.reduce_per_example(values)

    def get_config(self):
        config = super().get_config()
        config.update(power=self.power, method=self.method, iterations=self.iterations)
        return config
