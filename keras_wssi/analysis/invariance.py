"""The weight scale shift: a change of weights that leaves a positively homogeneous network's function alone.

Liu, Cui, Chan (arXiv 2008.02965): with positively homogeneous activations, `W_l → γ_l W_l` and
`b_l → (∏_{k≤l} γ_k) b_l` with `∏ γ_l = 1` computes the same function. `scale_shift` applies it to a copy
of a functional or Sequential model, propagating the cumulative scale through the graph, so it also covers
residual blocks (every input of an `Add` must carry the same scale) and refuses shifts that would change
the function.
"""

import math

import keras
import numpy as np

from keras_wssi import structure

__all__ = ["scale_shift"]

_RELATIVE_TOLERANCE = 1e-6


def _validate_factors(factors, weight_layers):
    names = [w.name for w in weight_layers]
    if isinstance(factors, dict):
        unknown = sorted(set(factors) - set(names))
        if unknown:
            raise ValueError(f"factors names layers {unknown} that are not weight layers of the model: {names}.")
        values = [factors.get(name, 1.0) for name in names]
    else:
        values = list(factors)
        if len(values) != len(names):
            raise ValueError(
                f"factors must have one entry per weight layer ({len(names)}: {names}), got {len(values)}."
            )
    for name, value in zip(names, values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
            math.isfinite(value) and value > 0
        ):
            raise ValueError(f"factors[{name!r}] must be a finite positive number, got {value!r}.")
    return {name: float(value) for name, value in zip(names, values)}


def _copy(model):
    inner = structure.unwrap(model)
    copy = keras.models.clone_model(inner)
    copy.set_weights(inner.get_weights())
    return copy


def scale_shift(model, factors):
    """Returns a copy of `model` with every weight layer's kernel scaled by its factor and biases by the
    cumulative product, computing the same function.

    Args:
        model: a functional or Sequential Keras model (or one wrapped by `keras_wssi.wrap`) whose layers are
            positively homogeneous (linear, ReLU, leaky ReLU, max/avg-pool, …).
        factors: positive numbers, one per weight layer in `keras_wssi.structure.weight_layers` order, or a
            dict `{layer_name: factor}` (missing layers get 1). Their product along every input-to-output
            path must be 1 (for a chain: `∏ γ_l = 1`), and the inputs of every `Add`/`Concatenate` must carry
            the same cumulative scale.

    Returns:
        A new `keras.Model` (the original is untouched).

    Raises:
        keras_wssi.structure.StructureError: non-homogeneous layers, subclassed models, or factors that do
            not preserve the function.

    Example:

    ```python
    shifted = keras_wssi.analysis.scale_shift(model, [2.0, 0.25, 2.0])   # 2 · 0.25 · 2 = 1
    np.testing.assert_allclose(shifted.predict(x), model.predict(x), rtol=1e-5)
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    structure.check_homogeneous(model, method="scale_shift", error=True)
    original_layers = structure.weight_layers(model)
    gamma = _validate_factors(factors, original_layers)

    shifted = _copy(model)
    nodes = structure.graph_nodes(shifted)
    copied_layers = {w.name: w for w in structure.weight_layers(shifted)}
    scale_of_node = {}
    bias_scale_of_layer = {}
    for node in nodes:
        parent_scales = [scale_of_node[id(p)] for p in node.parents]
        if not parent_scales:
            scale = 1.0
        else:
            scale = parent_scales[0]
            if any(not math.isclose(s, scale, rel_tol=_RELATIVE_TOLERANCE) for s in parent_scales[1:]):
                raise structure.StructureError(
                    f"scale_shift: the inputs of {node.layer.name!r} carry different cumulative scales "
                    f"{parent_scales}; the factors of its branches must have equal products."
                )
        weight_layer = copied_layers.get(node.layer.name)
        if weight_layer is not None and weight_layer.layer is node.layer:
            scale *= gamma[weight_layer.name]
            previous = bias_scale_of_layer.setdefault(weight_layer.name, scale)
            if not math.isclose(previous, scale, rel_tol=_RELATIVE_TOLERANCE):
                raise structure.StructureError(
                    f"scale_shift: shared layer {weight_layer.name!r} is called at cumulative scales {previous} "
                    f"and {scale}; one bias cannot follow both."
                )
        scale_of_node[id(node)] = scale
    outputs = [n for n in nodes if not n.children]
    for node in outputs:
        if not math.isclose(scale_of_node[id(node)], 1.0, rel_tol=_RELATIVE_TOLERANCE):
            raise structure.StructureError(
                f"scale_shift: the factors multiply to {scale_of_node[id(node)]:.6g} on the path to output "
                f"{node.layer.name!r}; they must multiply to 1 on every input-to-output path."
            )

    for name, weight_layer in copied_layers.items():
        factor = gamma[name]
        # A separable convolution's scale goes on its pointwise (last) kernel.
        kernel = weight_layer.kernels[-1]
        kernel.assign(kernel.numpy() * factor)
        if weight_layer.bias is not None and name in bias_scale_of_layer:
            weight_layer.bias.assign(weight_layer.bias.numpy() * bias_scale_of_layer[name])
    return shifted
