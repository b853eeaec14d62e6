"""The layer-wise spectral-norm upper bound (Yoshida & Miyato, arXiv 1705.10941), a weight-only penalty.

The power-iteration vectors are penalty state (variables of the model), so they are saved and resumed.
"""

import warnings

import keras
from keras import ops

from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi import validation
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_penalty

__all__ = ["CONV_NORMS", "LayerwiseSpectralNorm"]

CONV_NORMS = ("reshaped", "operator")


@register_penalty("layerwise_spectral_norm")
class LayerwiseSpectralNorm(Penalty):
    """Layer-wise spectral-norm upper bound (Yoshida & Miyato, arXiv 1705.10941): `½ Σ_l σ(W_l)²`.

    For a ReLU network `||J||_2 ≤ ∏_l σ(W_l)`; Yoshida & Miyato penalize `(λ/2) Σ_l σ(W_l)²`, each σ by power
    iteration with its vector kept across steps (warm start), `iterations` rounds per step. The vectors are
    non-trainable variables created in `build`, before the step is traced, so the update compiles under XLA.

    For convolutions, `conv_norm="reshaped"` (the paper) uses the kernel reshaped to a `(k_h k_w C_in, C_out)`
    matrix; `conv_norm="operator"` uses the true operator norm of the 2-D convolution on the layer's input
    shape (power iteration through `conv2d` and `conv2d_transpose`, with the layer's strides and padding).
    Other kernels (Dense, depthwise, 1-D/3-D convolutions) always use the reshaped matrix. The same term per
    layer is `keras_wssi.regularizers.SpectralNormRegularizer`.

    Args:
        strength: λ.
        iterations: power-iteration rounds per step (1 in the paper).
        conv_norm: `"reshaped"` (default) or `"operator"`.
        name: metric name, `"layerwise_spectral_norm"` by default.

    Example:

    ```python
    model = keras_wssi.architectures.small_cnn()
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.LayerwiseSpectralNorm(0.01, conv_norm="operator")])
    ```
    """

    default_name = "layerwise_spectral_norm"
    requires = frozenset({"weights"})

    def __init__(self, strength=0.01, iterations=1, conv_norm="reshaped", name=None):
        self.iterations = validation.positive_int(iterations, "iterations")
        self.conv_norm = validation.choice(conv_norm, CONV_NORMS, "conv_norm")
        super().__init__(strength=strength, name=name)

    def build(self, model):
        left_out = structure.other_kernels(model)
        if left_out:
            warnings.warn(
                f"{self.name}: leaves out {structure.describe_variables(left_out)}: the layer-wise bound "
                "∏ σ(W_l) is defined for the Dense and convolution layers of a feed-forward network, and these weights "
                "(recurrent kernels, embedding tables, attention projections) are not such layers. Add `l2` to "
                "regularize them.",
                stacklevel=2,
            )
        self._entries = []
        for index, weight_layer in enumerate(structure.weight_layers(model)):
            layer = weight_layer.layer
            for k_index, kernel in enumerate(weight_layer.kernels):
                kind = weight_layer.kind
                if kind == "separable_conv":
                    kind = "depthwise_conv" if k_index == 0 else "dense"
                operator = self.conv_norm == "operator" and kind == "conv" and isinstance(layer, keras.layers.Conv2D)
                operator = operator and not isinstance(layer, keras.layers.Conv2DTranspose)
                if operator:
                    if getattr(layer, "data_format", "channels_last") != "channels_last":
                        raise ValueError(f"{self.name}: conv_norm='operator' supports channels_last, layer {layer.name!r} is not.")
                    input_shape = tuple(layer.input.shape[1:])
                    if any(s is None for s in input_shape):
                        raise ValueError(
                            f"{self.name}: conv_norm='operator' needs a static input shape for layer {layer.name!r}, "
                            f"got {input_shape}."
                        )
                    shape = (1, *input_shape)
                    settings = {"strides": tuple(layer.strides), "padding": layer.padding, "dilations": tuple(layer.dilation_rate)}
                else:
                    shape = tuple(linalg.kernel_matrices(kernel, kind).shape[:2])
                    settings = None
                initial = linalg.random_unit_rows(shape, [len(self._entries), 29])
                state = self.add_state(f"u_{index}_{k_index}", shape, initial)
                self._entries.append((kernel, kind, settings, state))
        super().build(model)

    def layer_norms(self):
        """`σ(W_l)` per kernel (updating the warm-start vectors), as a list of scalars."""
        sigmas = []
        for kernel, kind, settings, state in self._entries:
            kernel = ops.cast(kernel, "float32")
            if settings is not None:
                new_u, sigma = linalg.conv2d_operator_norm(kernel, state.value, iterations=self.iterations, **settings)
            else:
                new_u, _, sigma_batch = linalg.power_iteration(
                    linalg.kernel_matrices(kernel, kind), state.value, iterations=self.iterations
                )
                sigma = ops.max(sigma_batch)
            state.assign(new_u)
            sigmas.append(sigma)
        return sigmas

    def call(self, context):
        squares = [ops.square(s) for s in self.layer_norms()]
        total = squares[0]
        for square in squares[1:]:  # In order, as `tf.add_n`.
            total = total + square
        return 0.5 * total

    def get_config(self):
        return {**super().get_config(), "iterations": self.iterations, "conv_norm": self.conv_norm}
