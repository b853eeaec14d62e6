"""Curvature regularization: CURE (Moosavi-Dezfooli, Fawzi, Uesato & Frossard, CVPR 2019).

DESIGN.md §1.3: a finite difference of input gradients along the normalized sign of the gradient,
`R = ||∇_x ℓ(x + h z) − ∇_x ℓ(x)||^power` with `z = sign(∇_x ℓ(x)) / ||sign(∇_x ℓ(x))||` held constant. Inside one
linear region of a ReLU network the difference is `h ∇²_x ℓ z = h Jᵀ (diag p − p pᵀ) J z` (Guo et al.,
arXiv 2007.02209), so CURE is a Jacobian penalty weighted by the softmax covariance along the FGSM direction.
"""

import keras
from keras import ops

from keras_wssi import backend
from keras_wssi import linalg
from keras_wssi import validation
from keras_wssi.penalties.base import register_penalty
from keras_wssi.penalties.logit_jacobian import LOSSES
from keras_wssi.penalties.logit_jacobian import LogitJacobianPenalty
from keras_wssi.penalties.logit_jacobian import checked_logits
from keras_wssi.penalties.logit_jacobian import loss_cotangent

__all__ = ["CURE", "curvature_direction"]


def curvature_direction(gradients, epsilon=1e-12):
    """CURE's probe direction `sign(g)/||sign(g)||` per example (constant; an all-zero gradient gives 0)."""
    signs = ops.stop_gradient(ops.sign(gradients))
    flat = ops.reshape(signs, (ops.shape(signs)[0], -1))
    norms = linalg.safe_norm(flat, axis=-1, keepdims=True, epsilon=epsilon)
    return ops.reshape(flat / norms, ops.shape(signs))


@register_penalty("cure")
class CURE(LogitJacobianPenalty):
    """CURE: `||∇_x ℓ(x + h z) − ∇_x ℓ(x)||^power`, batch mean, `z` the normalized sign of `∇_x ℓ(x)`.

    Moosavi-Dezfooli et al., "Robustness via Curvature Regularization, and Vice Versa" (CVPR 2019). The
    finite difference estimates `h · ∇²_x ℓ · z`, the curvature of the loss along the FGSM direction; it is
    exact for ReLU networks as long as `x` and `x + h z` lie in the same linear region. Both gradients are
    differentiated (double backprop), as in the reference code; `z` is held constant.

    Cost: the gradient at `x` comes from the step's own forward pass; the probe point `x + h z` costs one more
    forward and backward pass. With `inference_probes=True` both gradients come from fresh inference-mode
    passes (`training=False`: BatchNorm uses its moving statistics and does not update them, Dropout is off),
    as the reference implementation does with `net.eval()`; that costs one more forward pass.

    Args:
        strength: λ (the reference code uses 4 on CIFAR-10).
        h: finite-difference step, `> 0`, in input units (`||h z|| = h`). The reference uses 3 on CIFAR-scale
            inputs; for 28×28 images in [0, 1], 0.1–1 keeps the probe close.
        power: exponent of the norm: 1 (the reference code, default) or 2 (the paper's formula).
        loss: `"cross_entropy"` (default) or `"compiled"`.
        inference_probes: compute both gradients in inference mode (see above). False (default): the probe
            uses the step's mode — note that BatchNorm in training mode then also updates its moving
            statistics on the probe batch.
        epsilon: guard of the norm at 0.
        name: metric name, `"cure"` by default.

    Example:

    ```python
    model.compile("adam", loss, regularizers=[keras_wssi.penalties.CURE(4.0, h=0.5)], jit_compile=True)
    ```
    """

    default_name = "cure"

    def __init__(self, strength=4.0, h=0.5, power=1.0, loss="cross_entropy", inference_probes=False, epsilon=1e-12, name=None):
        self.h = validation.positive_float(h, "h")
        self.power = validation.positive_float(power, "power")
        self.loss = validation.choice(loss, LOSSES, "loss")
        self.inference_probes = validation.boolean(inference_probes, "inference_probes")
        self.epsilon = validation.positive_float(epsilon, "epsilon")
        super().__init__(strength=strength, name=name)

    def _gradient_at(self, context, x, training):
        """`∇_x ℓ` from a fresh forward pass at `x` (differentiable with respect to the weights)."""
        # The backend's input-Jacobian pass: on JAX the probe's state updates (BatchNorm statistics in training
        # mode) are assigned after the pass, as for the step's own forward pass.
        _, y_pred, jacobian = backend.forward_with_input_jacobian(context.model, x, training)
        cotangent = loss_cotangent(ops.cast(y_pred, "float32"), context.y, self.loss, context.model, self.name)
        return jacobian.vjp(cotangent)

    def call(self, context):
        logits = checked_logits(context, self.name)
        x = context.x if keras.backend.standardize_dtype(context.x.dtype) == "float32" else ops.cast(context.x, "float32")
        if self.inference_probes:
            gradient = self._gradient_at(context, x, training=False)
        else:
            gradient = context.vjp(loss_cotangent(logits, context.y, self.loss, context.model, self.name))
        direction = curvature_direction(gradient)
        probe = ops.stop_gradient(x + self.h * ops.cast(direction, x.dtype))
        probe_gradient = self._gradient_at(context, probe, training=False if self.inference_probes else context.training)
        difference = ops.reshape(ops.cast(probe_gradient, "float32") - gradient, (ops.shape(gradient)[0], -1))
        if self.power == 2.0:
            values = ops.sum(ops.square(difference), axis=-1)
        else:
            values = ops.power(linalg.safe_norm(difference, axis=-1, epsilon=self.epsilon), self.power)
        return context.reduce_per_example(values)

    def get_config(self):
        return {
            **super().get_config(),
            "h": self.h,
            "power": self.power,
            "loss": self.loss,
            "inference_probes": self.inference_probes,
            "epsilon": self.epsilon,
        }
