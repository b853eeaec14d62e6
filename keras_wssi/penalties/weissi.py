"""Weight-scale-shift-invariant (WEISSI) norm penalties.

Liu, Cui, Chan, "Improve Generalization and Robustness of Neural Networks via Weight Scale Shifting
Invariant Regularizations" (arXiv 2008.02965). For a network with positively homogeneous activations the
scale shift `W_l → γ_l W_l` (`∏ γ_l = 1`, biases scaled by the cumulative product) leaves the function
unchanged. Weight decay is not invariant under it; the penalties here are, because they depend on the
weights only through `∏_l ||W_l||`, which upper-bounds the input-gradient norm `||J||_2` of a ReLU network.
"""

import warnings

from keras import ops

from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi import validation
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_alias
from keras_wssi.penalties.base import register_penalty

__all__ = ["FORMS", "WEISSI"]

FORMS = ("log_product", "product", "geometric_mean")
_DEFAULT_NAMES = {"log_product": "weissi", "product": "weissi_product", "geometric_mean": "weissi_geometric_mean"}


@register_penalty("weissi")
class WEISSI(Penalty):
    """A weight-scale-shift-invariant penalty on the product of the layers' kernel norms.

    With `n_l = ||W_l||` (one factor per kernel; a separable convolution contributes two):

    - `form="log_product"` (default): `Σ_l log(n_l + ε)`; its gradient `W/||W||²` is an adaptive weight decay.
    - `form="product"`: `∏_l n_l`, the input-gradient bound itself.
    - `form="geometric_mean"`: `L (∏_l n_l²)^{1/L}`, the minimum of weight decay over the shift orbit.

    For residual networks (`residual="auto"` detects `Add` blocks in functional models) each block `h + g(h)`
    contributes `log(1 + ∏_{k∈g} n_k)` instead of `Σ_{k∈g} log n_k`, following the bound
    `||J|| ≤ ∏_blocks (1 + ∏_{k∈block} ||W_k||) ∏_others ||W||` (a projection shortcut counts as a branch:
    `log(∏_skip + ∏_g)`). This residual form is our reconstruction (DESIGN.md §1.1).

    Kernels followed by BatchNorm/LayerNorm are excluded by default: the function does not depend on their
    scale, so `log ||W||` could decrease forever; they are listed in a warning when the penalty is built.

    Args:
        strength: λ.
        form: `"log_product"`, `"product"` or `"geometric_mean"`.
        norm: `"frobenius"` (default), `"spectral"` (power iteration on the reshaped kernel, warm-started
            across steps) or a number `p >= 1` (entrywise p-norm).
        direction_weight: weight of the optional scale-invariant sparsity term `Σ_l ||W_l / ||W_l|| ||_1`,
            added to the value (and so multiplied by `strength` too). 0 disables it.
        residual: `"auto"`, True or False.
        exclude_normalized: leave out kernels that feed a normalization layer.
        epsilon: the guard in `log(n + ε)` and in the norms: a zero kernel gives a finite value and gradient.
        power_iterations: power-iteration rounds per step for `norm="spectral"`.
        name: metric name; defaults to `weissi`, `weissi_product` or `weissi_geometric_mean`.

    Example:

    ```python
    model = keras_wssi.architectures.mlp()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  regularizers=[keras_wssi.penalties.WEISSI(1e-3)])
    ```
    """

    requires = frozenset({"weights"})

    def __init__(
        self,
        strength=1e-3,
        form="log_product",
        norm="frobenius",
        direction_weight=0.0,
        residual="auto",
        exclude_normalized=True,
        epsilon=1e-8,
        power_iterations=1,
        name=None,
    ):
        validation.choice(form, FORMS, "form")
        if residual not in ("auto", True, False):
            raise ValueError(f"residual must be 'auto', True or False, got {residual!r}.")
        if residual is True and form == "geometric_mean":
            raise ValueError("residual=True is defined for form='log_product' and 'product', not 'geometric_mean'.")
        self.form = form
        self.norm = linalg.validate_norm(norm)
        self.direction_weight = validation.non_negative_float(direction_weight, "direction_weight")
        epsilon = validation.positive_float(epsilon, "epsilon")
        power_iterations = validation.positive_int(power_iterations, "power_iterations")
        self.residual = residual
        self.exclude_normalized = bool(exclude_normalized)
        self.epsilon = float(epsilon)
        self.power_iterations = power_iterations
        super().__init__(strength=strength, name=name if name is not None else _DEFAULT_NAMES[form])

    def build(self, model):
        layers = structure.weight_layers(model)
        excluded = [w for w in layers if self.exclude_normalized and w.normalized]
        if excluded:
            warnings.warn(
                f"{self.name}: kernels of {', '.join(w.name for w in excluded)} feed a normalization layer, so "
                "the function does not depend on their scale and log||W|| could shrink forever; they are left "
                "out of the penalty (pass exclude_normalized=False to keep them).",
                stacklevel=2,
            )
        included = [w for w in layers if w not in excluded]
        if not included:
            raise structure.StructureError(
                f"{self.name}: every weight layer feeds a normalization layer; there is no kernel to penalize."
            )
        try:
            structure.check_homogeneous(model, method=f"The WEISSI penalty {self.name!r}", error=False)
        except structure.StructureError:
            pass  # Subclassed model: the graph is unknown, nothing to check.
        left_out = structure.other_kernels(model)
        if left_out:
            warnings.warn(
                f"{self.name}: leaves {structure.describe_variables(left_out)} out of the penalty: only Dense and "
                "convolution kernels enter the product of layer norms (the weight scale shift is defined for them). "
                "Add `l2` to regularize the others.",
                stacklevel=2,
            )

        # Each entry: (kernel variable, kind, index of its start-vector variable or None).
        self._kernels = []
        self._start_vectors = []
        index_of_layer = {}
        for weight_layer in included:
            index_of_layer[id(weight_layer.layer)] = []
            for kernel in weight_layer.kernels:
                kind = "dense" if weight_layer.kind == "separable_conv" and kernel is weight_layer.kernels[1] else (
                    "depthwise_conv" if weight_layer.kind == "separable_conv" else weight_layer.kind
                )
                vector_index = None
                if self.norm == "spectral":
                    batch, fan_in = linalg.kernel_matrices(kernel, kind).shape[:2]
                    initial = linalg.random_unit_rows((batch, fan_in), [len(self._start_vectors), 17])
                    self._start_vectors.append(self.add_state(f"u_{len(self._start_vectors)}", (batch, fan_in), initial))
                    vector_index = len(self._start_vectors) - 1
                index_of_layer[id(weight_layer.layer)].append(len(self._kernels))
                self._kernels.append((kernel, kind, vector_index))

        # Terms of the log-value: ("single", kernel index) or ("block", [[kernel indices] per branch]).
        blocks = []
        use_residual = self.residual is True or (self.residual == "auto" and self.form != "geometric_mean")
        if use_residual:
            try:
                blocks = structure.residual_blocks(model)
            except structure.StructureError:
                if self.residual is True:
                    raise
                blocks = []
        in_block = {}
        for block in blocks:
            for weight_layer in block.weight_layers:
                if id(weight_layer.layer) in in_block:
                    raise structure.StructureError(
                        f"{self.name}: layer {weight_layer.name!r} belongs to nested or overlapping residual "
                        "blocks; the residual form supports chains of blocks. Pass residual=False."
                    )
                in_block[id(weight_layer.layer)] = block
        self._terms = []
        emitted_blocks = set()
        for weight_layer in included:
            block = in_block.get(id(weight_layer.layer))
            if block is None:
                self._terms.extend(("single", i) for i in index_of_layer[id(weight_layer.layer)])
            elif id(block) not in emitted_blocks:
                emitted_blocks.add(id(block))
                branches = [
                    [i for w in branch if id(w.layer) in index_of_layer for i in index_of_layer[id(w.layer)]]
                    for branch in block.branches
                ]
                self._terms.append(("block", branches))
        self.residual_blocks_used = len(emitted_blocks)
        super().build(model)

    def _log_norms(self):
        log_norms = []
        for kernel, kind, vector_index in self._kernels:
            kernel = ops.cast(kernel, "float32")
            if vector_index is None:
                value, _ = linalg.matrix_norm(kernel, self.norm, kind, epsilon=self.epsilon)
            else:
                state = self._start_vectors[vector_index]
                value, new_u = linalg.matrix_norm(
                    kernel, "spectral", kind, u=state.value, iterations=self.power_iterations, epsilon=self.epsilon
                )
                state.assign(new_u)
            log_norms.append(ops.log(value + self.epsilon))
        return log_norms

    def call(self, context):
        log_norms = self._log_norms()
        total_log = 0.0
        for kind, payload in self._terms:
            if kind == "single":
                total_log += log_norms[payload]
            else:
                # log Σ_branches ∏_{k∈branch} n_k; an empty (identity) branch contributes exp(0) = 1.
                branch_logs = [sum(log_norms[i] for i in branch) if branch else ops.zeros(()) for branch in payload]
                total_log += ops.logsumexp(ops.stack(branch_logs))
        if self.form == "log_product":
            value = total_log
        elif self.form == "product":
            value = ops.exp(total_log)
        else:
            count = float(len(self._kernels))
            value = count * ops.exp(2.0 * total_log / count)
        if self.direction_weight:
            direction = 0.0
            for kernel, _, _ in self._kernels:
                kernel = ops.cast(kernel, "float32")
                direction += ops.sum(ops.abs(kernel)) / linalg.safe_norm(kernel, epsilon=self.epsilon)
            value += self.direction_weight * direction
        return value

    def get_config(self):
        return {
            **super().get_config(),
            "form": self.form,
            "norm": self.norm,
            "direction_weight": self.direction_weight,
            "residual": self.residual,
            "exclude_normalized": self.exclude_normalized,
            "epsilon": self.epsilon,
            "power_iterations": self.power_iterations,
        }


register_alias("weissi_product", WEISSI, form="product")
register_alias("weissi_geometric_mean", WEISSI, form="geometric_mean")
