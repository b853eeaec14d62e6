"""Reading a Keras model: its weight layers, normalization, residual blocks and homogeneity.

Penalties and analysis tools ask this module, never the model's internals directly. Functional and
Sequential models are read from their graph (so order, normalization and residual blocks are known);
subclassed models only expose their layers in tracking order, and methods that need the graph say so.
"""

import dataclasses
import math
import warnings

import keras
from keras import ops

__all__ = [
    "DenseChain",
    "FeedForwardChain",
    "PIECEWISE_LINEAR_ACTIVATIONS",
    "GraphNode",
    "ResidualBlock",
    "StructureError",
    "WeightLayer",
    "check_homogeneous",
    "dense_chain",
    "describe_variables",
    "feedforward_chain",
    "graph_nodes",
    "is_weight_layer",
    "non_homogeneous_layers",
    "other_kernels",
    "output_activation",
    "residual_blocks",
    "unwrap",
    "weight_layers",
]

L = keras.layers

_CONV_TYPES = (L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_DEPTHWISE_TYPES = tuple(t for t in (getattr(L, "DepthwiseConv1D", None), L.DepthwiseConv2D) if t)
_SEPARABLE_TYPES = (L.SeparableConv1D, L.SeparableConv2D)
_NORMALIZATION_TYPES = (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization, L.UnitNormalization)

# Positively homogeneous (degree one) activations: f(γ t) = γ f(t) for γ > 0.
_HOMOGENEOUS_ACTIVATIONS = {"linear", "relu", "leaky_relu"}

# Layers that pass a scale through unchanged (positively homogeneous or linear without bias).
_PASS_THROUGH_TYPES = (
    L.InputLayer,
    L.Flatten,
    L.Reshape,
    L.Permute,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    L.Add,
    L.Concatenate,
    L.Identity,
)


class StructureError(ValueError):
    """Raised when a model's structure does not fit a method's assumptions."""


@dataclasses.dataclass(frozen=True, eq=False)
class WeightLayer:
    """A layer with a linear map `W` (Dense or a convolution) as the structure module sees it.

    Attributes:
        layer: the Keras layer.
        kernels: its kernel variables in the order they are applied (two for separable convolutions).
        bias: its bias variable, or None.
        kind: `"dense"`, `"conv"`, `"depthwise_conv"` or `"separable_conv"`.
        receptive_field: the number of kernel taps per output (∏ kernel sizes; 1 for Dense). A convolution's
            operator norm is at most `sqrt(receptive_field)` times the norm of its reshaped kernel matrix.
        normalized: True when the output reaches a normalization layer through scale-preserving ops only,
            so the function does not depend on the kernel's scale.
    """

    layer: object
    kernels: tuple
    bias: object
    kind: str
    receptive_field: int
    normalized: bool

    @property
    def name(self):
        return self.layer.name


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualBlock:
    """Branches joined by an `Add`: `out = Σ_branches branch(h)`, a branch with no weight layer being the skip.

    Attributes:
        add_layer: the `Add` layer that joins the branches.
        branches: one tuple of `WeightLayer`s per input of the `Add` (empty for the identity skip).
    """

    add_layer: object
    branches: tuple

    @property
    def name(self):
        return self.add_layer.name

    @property
    def weight_layers(self):
        return tuple(w for branch in self.branches for w in branch)


@dataclasses.dataclass(frozen=True, eq=False)
class GraphNode:
    """One call of a layer in a functional graph, with the nodes feeding it and consuming it."""

    layer: object
    parents: list
    children: list


def unwrap(model):
    """The innermost model that carries the layers (looks through `keras_wssi.wrap`)."""
    seen = set()
    while getattr(model, "_keras_wssi_wrapped", None) is not None and id(model) not in seen:
        seen.add(id(model))
        model = model._keras_wssi_wrapped
    return model


def _functional_view(model):
    model = unwrap(model)
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise StructureError(
                f"Sequential model {model.name!r} is not built with a known input shape; build it first "
                "(give an `Input`, or call `model.build(input_shape)`)."
            )
        return functional
    if hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations"):
        return model
    return None


def graph_nodes(model):
    """The model's layer calls in topological order (inputs first), as `GraphNode`s.

    Nested functional/Sequential models are expanded in place. Raises `StructureError` for
    subclassed models, whose graph Keras does not record.
    """
    functional = _functional_view(model)
    if functional is None:
        raise StructureError(
            f"Model {unwrap(model).name!r} is subclassed: its layer graph is not recorded by Keras, so "
            "this method (which needs the order of layers, residual blocks or normalization) cannot read "
            "it. Build the model with the functional or Sequential API."
        )
    ordered = []

    def visit(function, input_parents):
        # Keras stores depth 0 at the outputs; the largest depth holds the inputs.
        input_index = 0
        local = {}
        for depth in sorted(function._nodes_by_depth, reverse=True):
            for node in function._nodes_by_depth[depth]:
                operation = node.operation
                parents = [local[id(p)] for p in node.parent_nodes if id(p) in local]
                if node.is_input:
                    parents = list(input_parents[input_index : input_index + 1])
                    input_index += 1
                inner = _functional_view(operation) if isinstance(operation, keras.Model) else None
                if inner is not None:
                    local[id(node)] = visit(inner, parents)
                    continue
                graph_node = GraphNode(layer=operation, parents=parents, children=[])
                for parent in parents:
                    parent.children.append(graph_node)
                ordered.append(graph_node)
                local[id(node)] = graph_node
        # The node producing the (first) output of this function.
        output = function.outputs[0]._keras_history
        return local[id(output.operation._inbound_nodes[output.node_index])]

    visit(functional, [])
    return ordered


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def _is_homogeneous_layer(layer, include_own_activation=True):
    if isinstance(layer, (L.Dense, *_CONV_TYPES, *_DEPTHWISE_TYPES, *_SEPARABLE_TYPES)):
        return not include_own_activation or _activation_name(layer) in _HOMOGENEOUS_ACTIVATIONS
    if isinstance(layer, L.Activation):
        return _activation_name(layer) in _HOMOGENEOUS_ACTIVATIONS
    if isinstance(layer, L.ReLU):
        # A ReLU with a ceiling or a threshold is not homogeneous; negative_slope keeps it homogeneous.
        return layer.max_value is None and float(layer.threshold) == 0.0
    if isinstance(layer, L.LeakyReLU):
        return True
    return isinstance(layer, _PASS_THROUGH_TYPES)


def is_weight_layer(layer):
    """True for the layers the structure module treats as linear maps `W` (Dense and convolutions)."""
    return isinstance(layer, (L.Dense, *_CONV_TYPES, *_DEPTHWISE_TYPES, *_SEPARABLE_TYPES))


def _kernels_of(layer):
    if isinstance(layer, _SEPARABLE_TYPES):
        return (layer.depthwise_kernel, layer.pointwise_kernel), "separable_conv"
    if isinstance(layer, _DEPTHWISE_TYPES):
        return (layer.kernel,), "depthwise_conv"
    if isinstance(layer, _CONV_TYPES):
        return (layer.kernel,), "conv"
    if isinstance(layer, L.Dense):
        return (layer.kernel,), "dense"
    return None, None


def _receptive_field(kernels, kind):
    if kind == "dense":
        return 1
    spatial = kernels[0].shape[:-2]
    return int(math.prod(int(s) for s in spatial))


def _reaches_normalization(node):
    """Follows single-consumer, scale-preserving ops from a weight layer's output to a normalization."""
    if _activation_name(node.layer) not in _HOMOGENEOUS_ACTIVATIONS:
        return False
    current = node
    while len(current.children) == 1:
        child = current.children[0]
        if isinstance(child.layer, _NORMALIZATION_TYPES):
            return True
        if isinstance(child.layer, (L.Add, L.Concatenate)) or not _is_homogeneous_layer(child.layer):
            return False
        current = child
    return False


def _make_weight_layer(layer, normalized):
    if not layer.built:
        raise StructureError(f"Layer {layer.name!r} is not built yet; build the model first (call it on data).")
    kernels, kind = _kernels_of(layer)
    return WeightLayer(
        layer=layer,
        kernels=kernels,
        bias=getattr(layer, "bias", None),
        kind=kind,
        receptive_field=_receptive_field(kernels, kind),
        normalized=normalized,
    )


def weight_layers(model):
    """The model's weight layers (Dense, Conv1D/2D/3D and transposes, DepthwiseConv, SeparableConv).

    In graph order for functional and Sequential models (each shared layer once, at its first call);
    in tracking order for subclassed models, where `normalized` is read from the adjacent layer in that
    order (a best effort, announced by a warning when normalization layers are present).

    Raises:
        StructureError: the model has no weight layer, or is not built.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    result = []
    seen = set()
    try:
        nodes = graph_nodes(model)
    except StructureError:
        nodes = None
    if nodes is not None:
        for node in nodes:
            if not is_weight_layer(node.layer) or id(node.layer) in seen:
                continue
            seen.add(id(node.layer))
            result.append(_make_weight_layer(node.layer, _reaches_normalization(node)))
    else:
        layers = [l for l in unwrap(model)._flatten_layers(include_self=False, recursive=True)]
        has_normalization = any(isinstance(l, _NORMALIZATION_TYPES) for l in layers)
        if has_normalization:
            warnings.warn(
                f"Model {unwrap(model).name!r} is subclassed: kernels are treated as followed by normalization "
                "when the next tracked layer is a normalization layer (the call graph is not recorded).",
                stacklevel=2,
            )
        for index, layer in enumerate(layers):
            if not is_weight_layer(layer) or id(layer) in seen:
                continue
            seen.add(id(layer))
            following = layers[index + 1] if index + 1 < len(layers) else None
            result.append(_make_weight_layer(layer, isinstance(following, _NORMALIZATION_TYPES)))
    if not result:
        raise StructureError(
            f"Model {unwrap(model).name!r} has no weight layers (Dense, Conv, DepthwiseConv, SeparableConv): "
            "there is nothing for a weight penalty to act on."
        )
    return result


def other_kernels(model):
    """The trainable weight matrices (rank >= 2) that `weight_layers` does not read: recurrent kernels (LSTM, GRU),
    embedding tables, attention projections (`EinsumDense` inside `MultiHeadAttention`), custom layers' kernels.

    Penalties that read model structure use it to say what they leave out (and weight decay to cover it). Biases
    and normalization parameters (rank 1) are not kernels.

    Returns:
        The variables, each once, in the model's variable order.

    Example:

    ```python
    [v.path for v in keras_wssi.structure.other_kernels(model)]   # e.g. ['lstm/lstm_cell/kernel', ...]
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    try:
        covered = {id(k) for w in weight_layers(model) for k in w.kernels}
    except StructureError:
        covered = set()
    result, seen = [], set()
    for variable in unwrap(model).trainable_variables:
        if len(variable.shape) >= 2 and id(variable) not in covered and id(variable) not in seen:
            seen.add(id(variable))
            result.append(variable)
    return result


def describe_variables(variables):
    """`"path (shape), …"` for messages."""
    return ", ".join(f"{getattr(v, 'path', v.name)} {tuple(v.shape)}" for v in variables)


def non_homogeneous_layers(model):
    """Names of layers inside the network (not the output layer's own activation) that break positive
    homogeneity: sigmoid/tanh/softmax activations, normalization, capped ReLUs, unknown layers."""
    nodes = graph_nodes(model)
    output_layers = {id(n.layer) for n in nodes if not n.children}
    offenders = []
    for node in nodes:
        layer = node.layer
        is_output = id(layer) in output_layers
        if _is_homogeneous_layer(layer, include_own_activation=not is_output):
            continue
        if is_output and isinstance(layer, (L.Activation, L.Softmax)):
            continue  # A final softmax/sigmoid is a function of the logits: it does not break the shift.
        offenders.append(layer.name)
    return offenders


def check_homogeneous(model, method="This method", error=True):
    """Raises (or warns, with `error=False`) when the network is not positively homogeneous."""
    offenders = non_homogeneous_layers(model)
    if offenders:
        message = (
            f"{method} assumes positively homogeneous activations (linear, ReLU, leaky ReLU, max-pool) inside "
            f"the network, but model {unwrap(model).name!r} has non-homogeneous layers: {', '.join(offenders)}."
        )
        if error:
            raise StructureError(message)
        warnings.warn(message, stacklevel=2)
    return offenders


def output_activation(model):
    """The name of the activation applied by the model's last layer (`"linear"` for logits)."""
    nodes = graph_nodes(model)
    last = [n for n in nodes if not n.children][-1].layer
    if isinstance(last, L.Softmax):
        return "softmax"
    return _activation_name(last)


def _weight_ancestors(node, stop, cache):
    """Weight-layer nodes on the paths between `stop` (exclusive) and `node` (inclusive), in graph order."""
    key = id(node)
    if key in cache:
        return cache[key]
    found = []
    if node is not stop:
        for parent in node.parents:
            for item in _weight_ancestors(parent, stop, cache):
                if item not in found:
                    found.append(item)
        if is_weight_layer(node.layer):
            found.append(node)
    cache[key] = found
    return found


def _ancestors(node):
    result, stack = set(), [node]
    while stack:
        current = stack.pop()
        for parent in current.parents:
            if id(parent) not in result:
                result.add(id(parent))
                stack.append(parent)
    return result


def residual_blocks(model):
    """The residual blocks of a functional model: every `Add` whose inputs share a common ancestor.

    Each branch lists the weight layers between the split point (the nearest common ancestor of the
    `Add`'s inputs) and the `Add`; the identity skip is an empty branch.
    """
    nodes = graph_nodes(model)
    position = {id(n): i for i, n in enumerate(nodes)}
    weight_by_layer = {id(w.layer): w for w in weight_layers(model)}
    blocks = []
    for node in nodes:
        if not isinstance(node.layer, L.Add) or len(node.parents) < 2:
            continue
        ancestor_sets = [(_ancestors(p) | {id(p)}) for p in node.parents]
        common = set.intersection(*ancestor_sets)
        if not common:
            continue  # Independent inputs joined by Add: not a residual block.
        split = nodes[max(position[c] for c in common)]
        branches = []
        for parent in node.parents:
            cache = {}
            branch_nodes = _weight_ancestors(parent, split, cache)
            branches.append(tuple(weight_by_layer[id(n.layer)] for n in branch_nodes))
        blocks.append(ResidualBlock(add_layer=node.layer, branches=tuple(branches)))
    return blocks


# ---- Feed-forward chains: the model classes the weight-perturbation certificate covers. ----

# Elementwise activations with σ(0) = 0, 1-Lipschitz and monotone: the certificate holds for them.
_CERTIFIABLE_ACTIVATIONS = {"linear", "relu", "leaky_relu", "relu6", "elu", "tanh"}
# Piecewise-linear ones (the local affine map is exact): used by the slope module.
PIECEWISE_LINEAR_ACTIVATIONS = {"linear", "relu", "leaky_relu"}
_NON_MONOTONE = {"gelu", "silu", "swish", "mish", "sin", "cos", "sinc", "hard_swish", "hard_silu", "log_softmax"}
_NONZERO_AT_ZERO = {"sigmoid", "softplus", "hard_sigmoid", "exponential", "softmax", "softsign_shifted"}
_SKIPPED_LAYERS = (L.InputLayer, L.Dropout, L.GaussianDropout, L.AlphaDropout, L.GaussianNoise, L.Identity)


def _callable_activation_name(fn):
    if fn is None:
        return "linear"
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return name.lower()


class DenseChain:
    """A model read as `Flatten → (Dense → elementwise activations)*`, the class the certificate covers.

    Attributes:
        layers: the Dense layers in order.
        activations: per Dense layer, the list of elementwise callables applied after it (its own
            activation, then standalone activation layers), as Python callables on tensors.
        activation_names: the same, as names.
        names: the Dense layers' names.
    """

    def __init__(self, layers, activations, activation_names):
        self.layers = list(layers)
        self.activations = list(activations)
        self.activation_names = list(activation_names)

    @property
    def names(self):
        return [layer.name for layer in self.layers]

    @property
    def kernels(self):
        return [layer.kernel for layer in self.layers]

    @property
    def biases(self):
        return [layer.bias for layer in self.layers]

    @property
    def piecewise_linear(self):
        return all(set(names) <= PIECEWISE_LINEAR_ACTIVATIONS for names in self.activation_names[:-1])

    def hidden(self, x, kernels=None):
        """The hidden activations `[h_0 = flatten(x), h_1, …, h_{L-1}]` and the logits (float32)."""
        kernels = self.kernels if kernels is None else kernels
        x = ops.convert_to_tensor(x)
        h = ops.reshape(ops.cast(x, "float32"), [ops.shape(x)[0], -1])
        hidden = [h]
        for index, (layer, kernel) in enumerate(zip(self.layers, kernels)):
            h = ops.matmul(h, ops.cast(kernel, "float32"))
            if layer.bias is not None:
                h = h + ops.cast(layer.bias, "float32")
            for fn in self.activations[index]:
                h = ops.cast(fn(h), "float32")
            if index < len(self.layers) - 1:
                hidden.append(h)
        return hidden, h


def _check_activation(name, where, method):
    if name in _CERTIFIABLE_ACTIVATIONS:
        return
    if name in _NON_MONOTONE:
        raise StructureError(
            f"{method}: {where} uses the non-monotone activation {name!r}; the certificate needs monotone, "
            "1-Lipschitz activations with σ(0) = 0 (linear, relu, leaky_relu, relu6, elu, tanh)."
        )
    if name in _NONZERO_AT_ZERO:
        raise StructureError(
            f"{method}: {where} uses the activation {name!r} with σ(0) ≠ 0 (or not elementwise); the certificate "
            "needs monotone, 1-Lipschitz activations with σ(0) = 0 (linear, relu, leaky_relu, relu6, elu, tanh)."
        )
    raise StructureError(
        f"{method}: {where} uses the activation {name!r}, which is not known to be monotone and 1-Lipschitz "
        "with σ(0) = 0; supported: linear, relu, leaky_relu, relu6, elu, tanh."
    )


def _standalone_activation(layer, method):
    if isinstance(layer, L.ReLU):
        if layer.max_value is not None and float(layer.max_value) != 6.0 or float(layer.threshold) != 0.0:
            raise StructureError(
                f"{method}: ReLU layer {layer.name!r} has a threshold or a ceiling other than 6; σ(0) = 0 and "
                "1-Lipschitz are needed."
            )
        if not 0.0 <= float(layer.negative_slope) <= 1.0:
            raise StructureError(
                f"{method}: ReLU layer {layer.name!r} has negative_slope {layer.negative_slope}; it must be in "
                "[0, 1] (1-Lipschitz, monotone)."
            )
        return "relu" if float(layer.negative_slope) == 0.0 else "leaky_relu"
    if isinstance(layer, L.LeakyReLU):
        slope = float(getattr(layer, "negative_slope", getattr(layer, "alpha", 0.3)))
        if not 0.0 <= slope <= 1.0:
            raise StructureError(
                f"{method}: LeakyReLU layer {layer.name!r} has slope {slope}; it must be in [0, 1]."
            )
        return "leaky_relu"
    if isinstance(layer, L.Activation):
        return _callable_activation_name(layer.activation)
    return None


def dense_chain(model, method="The weight-perturbation certificate"):
    """Reads `model` as a chain of Dense layers with elementwise activations (see `DenseChain`).

    Accepted layers: Input, Flatten/Reshape before the first Dense, Dropout-like layers (identity at
    inference), Dense, and Activation/ReLU/LeakyReLU layers. The last Dense must output logits (no
    softmax after it).

    Raises:
        keras_wssi.StructureError: another layer, a branch, a non-monotone activation, or an
            activation with σ(0) ≠ 0.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    nodes = graph_nodes(model)
    dense_layers, activations, names = [], [], []
    for node in nodes:
        layer = node.layer
        if len(node.parents) > 1 or len(node.children) > 1:
            raise StructureError(
                f"{method} covers feed-forward chains; layer {layer.name!r} has several inputs or outputs."
            )
        if isinstance(layer, _SKIPPED_LAYERS):
            continue
        if isinstance(layer, (L.Flatten, L.Reshape)):
            if dense_layers:
                raise StructureError(
                    f"{method}: {type(layer).__name__} layer {layer.name!r} after a Dense layer is not supported."
                )
            continue
        if isinstance(layer, L.Dense):
            if not layer.built:
                raise StructureError(f"Layer {layer.name!r} is not built yet; build the model first.")
            name = _callable_activation_name(layer.activation)
            dense_layers.append(layer)
            activations.append([layer.activation] if name != "linear" else [])
            names.append([name])
            continue
        standalone = _standalone_activation(layer, method)
        if standalone is None:
            raise StructureError(
                f"{method} covers Dense networks with elementwise activations; layer {layer.name!r} "
                f"({type(layer).__name__}) is not supported."
            )
        if not dense_layers:
            raise StructureError(f"{method}: activation layer {layer.name!r} before the first Dense.")
        activations[-1].append(layer)
        names[-1].append(standalone)
    if not dense_layers:
        raise StructureError(f"{method}: model {model.name!r} has no Dense layer.")
    for index, layer_names in enumerate(names):
        is_last = index == len(names) - 1
        for name in layer_names:
            if is_last and name != "linear":
                raise StructureError(
                    f"{method} is stated on logits, but the last Dense layer {dense_layers[-1].name!r} is followed "
                    f"by {name!r}; remove the output activation (use from_logits=True losses)."
                )
            _check_activation(name, f"layer {dense_layers[index].name!r}", method)
    return DenseChain(dense_layers, activations, names)


@dataclasses.dataclass(frozen=True, eq=False)
class ChainOp:
    """One step of a `FeedForwardChain`.

    Attributes:
        kind: `"dense"`, `"conv"` (weight layers, whose kernels may be perturbed), `"scale"` (inference
            BatchNorm: `s ⊙ h + t` along the channel axis), `"linear"` (a linear map with non-negative
            coefficients: Flatten, Reshape, average pooling, zero padding), `"activation"` (elementwise,
            monotone) or `"max_pool"`.
        layer: the Keras layer (for `"activation"` of a weight layer: that weight layer).
        fn: the callable applied to a tensor (for `"activation"`, `"linear"`, `"max_pool"`).
        params: kind-specific settings: conv `strides`, `padding`, `kernel_size`; activation `activation`
            (`"piecewise"`, `"elu"`, `"tanh"`), `negative_slope`, `ceiling`; max-pool `pool_size`, `strides`,
            `padding`.
    """

    kind: str
    layer: object
    fn: object = None
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self):
        return self.layer.name

    def scale_shift(self, dtype="float32"):
        """For `"scale"` ops: the inference-mode BatchNorm as `(s, t)` tensors, `s = γ/sqrt(var + eps)`,
        `t = β − mean · s`, computed in `dtype`."""
        layer = self.layer
        dtype = keras.backend.standardize_dtype(dtype)
        variance = ops.cast(layer.moving_variance, dtype)
        scale = 1.0 / ops.sqrt(variance + ops.convert_to_tensor(float(layer.epsilon), dtype))
        if layer.gamma is not None:
            scale = scale * ops.cast(layer.gamma, dtype)
        shift = -ops.cast(layer.moving_mean, dtype) * scale
        if layer.beta is not None:
            shift = shift + ops.cast(layer.beta, dtype)
        return scale, shift


class FeedForwardChain:
    """A model read as a chain of Dense/Conv2D layers, monotone activations, pooling, Flatten and BatchNorm.

    Attributes:
        ops: the `ChainOp`s in order, from the input to the logits (the last op is a Dense layer).
        weight_ops: the `"dense"` and `"conv"` ops (the perturbable layers), in order.
        names: the weight layers' names.
        dense_only: True when the chain is a Dense chain (what `dense_chain` reads).
    """

    def __init__(self, ops):
        self.ops = list(ops)

    @property
    def weight_ops(self):
        return [op for op in self.ops if op.kind in ("dense", "conv")]

    @property
    def names(self):
        return [op.name for op in self.weight_ops]

    @property
    def num_classes(self):
        return int(self.weight_ops[-1].layer.units)

    @property
    def dense_only(self):
        return all(op.kind in ("dense", "activation") or op.kind == "linear" and op.params.get("flatten") for op in self.ops)


def _activation_op(layer, fn, name, method, where):
    _check_activation(name, where, method)
    if name == "linear":
        return None
    if name in ("relu", "leaky_relu"):
        slope = 0.0 if name == "relu" else -float(ops.convert_to_numpy(fn(ops.convert_to_tensor([-1.0], "float32"))).reshape(-1)[0])
        return ChainOp("activation", layer, fn, {"activation": "piecewise", "negative_slope": slope, "ceiling": None})
    if name == "relu6":
        return ChainOp("activation", layer, fn, {"activation": "piecewise", "negative_slope": 0.0, "ceiling": 6.0})
    return ChainOp("activation", layer, fn, {"activation": name})


def _standalone_activation_op(layer, method):
    if isinstance(layer, L.ReLU):
        _standalone_activation(layer, method)  # Validates threshold, ceiling and slope.
        ceiling = None if layer.max_value is None else float(layer.max_value)
        params = {"activation": "piecewise", "negative_slope": float(layer.negative_slope), "ceiling": ceiling}
        return ChainOp("activation", layer, layer, params)
    if isinstance(layer, L.LeakyReLU):
        _standalone_activation(layer, method)
        slope = float(getattr(layer, "negative_slope", getattr(layer, "alpha", 0.3)))
        return ChainOp("activation", layer, layer, {"activation": "piecewise", "negative_slope": slope, "ceiling": None})
    name = _standalone_activation(layer, method)
    if name is None:
        return None
    return _activation_op(layer, layer.activation, name, method, f"layer {layer.name!r}") or "identity"


def _channels_last(layer, method):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise StructureError(f"{method}: layer {layer.name!r} uses data_format={layer.data_format!r}; only "
                             "channels_last is supported.")


def _padding(layer):
    return str(layer.padding).upper()


def feedforward_chain(model, method="The weight-perturbation certificate"):
    """Reads `model` as a feed-forward chain of Dense/Conv2D layers and monotone elementwise activations.

    Accepted layers: Input, Dropout-like layers (identity at inference), Dense (on flat inputs), Conv2D (any
    padding and strides; channels_last, no dilation, no groups), Activation/ReLU/LeakyReLU layers and the
    activations of Dense/Conv2D (linear, relu, leaky_relu, relu6, elu, tanh), MaxPooling2D and
    AveragePooling2D, GlobalAveragePooling2D, Flatten, Reshape, ZeroPadding2D, and inference-mode
    BatchNormalization over the channel axis (an elementwise affine map, so the bounds treat it exactly, as if
    folded into the preceding layer). The last layer must be a Dense layer giving logits.

    Raises:
        StructureError: naming the first layer outside this class (a residual `Add`, a branch, another
            layer type, an unsupported activation or an output activation).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    ops = []
    nodes = graph_nodes(model)
    merges = [n for n in nodes if isinstance(n.layer, (L.Add, L.Concatenate, L.Multiply, L.Subtract, L.Average, L.Maximum, L.Minimum))]
    for node in merges + nodes:
        layer = node.layer
        if isinstance(layer, (L.Add, L.Concatenate, L.Multiply, L.Subtract, L.Average, L.Maximum, L.Minimum)):
            raise StructureError(
                f"{method} covers feed-forward chains; the merge layer {layer.name!r} ({type(layer).__name__}) "
                "joins branches (a residual connection), which is not supported: its branches see the same "
                "perturbed activations, and the interval/linear bounds here are not implemented for that."
            )
        if len(node.parents) > 1 or len(node.children) > 1:
            raise StructureError(
                f"{method} covers feed-forward chains; layer {layer.name!r} has several inputs or outputs."
            )
        if isinstance(layer, (*_SKIPPED_LAYERS, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D)):
            continue
        if isinstance(layer, (L.Dense, L.Conv2D)) and not layer.built:
            raise StructureError(f"Layer {layer.name!r} is not built yet; build the model first.")
        if isinstance(layer, L.Dense):
            ops.append(ChainOp("dense", layer))
            name = _callable_activation_name(layer.activation)
            if not node.children and name != "linear":
                raise StructureError(
                    f"{method} is stated on logits, but the last Dense layer {layer.name!r} applies {name!r}; "
                    "remove the output activation (use from_logits=True losses)."
                )
            op = _activation_op(layer, layer.activation, name, method, f"layer {layer.name!r}")
            if op is not None:
                ops.append(op)
            continue
        if type(layer) is L.Conv2D:
            _channels_last(layer, method)
            if tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "groups", 1) != 1:
                raise StructureError(
                    f"{method}: Conv2D layer {layer.name!r} has dilation {layer.dilation_rate} or groups "
                    f"{getattr(layer, 'groups', 1)}; only dilation 1 and groups 1 are supported."
                )
            params = {"strides": tuple(layer.strides), "padding": _padding(layer), "kernel_size": tuple(layer.kernel_size)}
            ops.append(ChainOp("conv", layer, params=params))
            name = _callable_activation_name(layer.activation)
            op = _activation_op(layer, layer.activation, name, method, f"layer {layer.name!r}")
            if op is not None:
                ops.append(op)
            continue
        if isinstance(layer, L.BatchNormalization):
            axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
            rank = len(layer.input.shape) if hasattr(layer, "input") else None
            if axis is None or not (axis == -1 or rank is not None and axis == rank - 1):
                raise StructureError(
                    f"{method}: BatchNormalization layer {layer.name!r} normalizes axis {layer.axis}; only the "
                    "last (channel) axis is supported."
                )
            ops.append(ChainOp("scale", layer))
            continue
        if isinstance(layer, L.Flatten):
            ops.append(ChainOp("linear", layer, lambda h: ops.reshape(h, [ops.shape(h)[0], -1]), {"flatten": True}))
            continue
        if isinstance(layer, L.Reshape):
            ops.append(ChainOp("linear", layer, layer, {"flatten": len(layer.target_shape) == 1}))
            continue
        if isinstance(layer, (L.AveragePooling2D, L.GlobalAveragePooling2D, L.ZeroPadding2D)):
            _channels_last(layer, method)
            ops.append(ChainOp("linear", layer, layer))
            continue
        if isinstance(layer, L.MaxPooling2D):
            _channels_last(layer, method)
            params = {"pool_size": tuple(layer.pool_size), "strides": tuple(layer.strides), "padding": _padding(layer)}
            ops.append(ChainOp("max_pool", layer, layer, params))
            continue
        if not node.children and isinstance(layer, (L.Activation, L.Softmax, L.ReLU, L.LeakyReLU)):
            raise StructureError(
                f"{method} is stated on logits, but the model ends with the activation layer {layer.name!r}; "
                "remove the output activation (use from_logits=True losses)."
            )
        op = _standalone_activation_op(layer, method)
        if op is None:
            raise StructureError(
                f"{method} covers Dense/Conv2D networks with monotone elementwise activations, pooling, Flatten "
                f"and BatchNorm; layer {layer.name!r} ({type(layer).__name__}) is not supported."
            )
        if not any(o.kind in ("dense", "conv") for o in ops):
            raise StructureError(f"{method}: activation layer {layer.name!r} before the first weight layer.")
        if op != "identity":
            ops.append(op)
    weight = [op for op in ops if op.kind in ("dense", "conv")]
    if not weight:
        raise StructureError(f"{method}: model {model.name!r} has no Dense or Conv2D layer.")
    last = len(ops) - 1 - [op.kind for op in ops[::-1]].index(weight[-1].kind)
    if weight[-1].kind != "dense" or last != len(ops) - 1:
        trailing = ops[last + 1].name if last + 1 < len(ops) else weight[-1].name
        raise StructureError(
            f"{method} is stated on logits: the model must end with a Dense layer without activation, but "
            f"layer {trailing!r} follows the last weight layer (remove the output activation; use "
            "from_logits=True losses)."
        )
    return FeedForwardChain(ops)
