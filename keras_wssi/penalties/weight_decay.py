"""The "ineffective family" of baselines: `Σ_l Σ |W_l|^p` (L2 weight decay, L1, general Lp).

Liu et al. (arXiv 2008.02965) show these are not invariant under the weight scale shift: an optimizer can
lower them by rebalancing layers without changing the function, down to `L · (∏ ||W_l||²)^{1/L}` for L2.
They are kept as baselines for the WEISSI penalties.
"""

from keras import ops

from keras_wssi import structure
from keras_wssi import validation
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_alias
from keras_wssi.penalties.base import register_penalty

__all__ = ["WeightDecay"]


@register_penalty("lp")
class WeightDecay(Penalty):
    """`Σ_l Σ_ij |W_l,ij|^p` over every kernel of the model (biases and normalization parameters are not decayed).

    Every trainable weight matrix counts: Dense and convolution kernels, recurrent kernels (LSTM, GRU), embedding
    tables and attention projections (`structure.other_kernels`); `penalty.coverage` lists what is regularized and
    what is left out, after `build`.

    Args:
        strength: λ.
        p: the exponent, `p >= 1` (2 is weight decay, 1 is L1).
        name: metric name; defaults to `"l2"`, `"l1"` or `"lp"`.

    Example:

    ```python
    model.compile("adam", loss, regularizers=[keras_wssi.penalties.WeightDecay(1e-4, p=2)])
    ```
    """

    requires = frozenset({"weights"})

    def __init__(self, strength=1e-4, p=2.0, name=None):
        self.p = validation.finite_float(p, "p", minimum=1.0)
        if name is None:
            name = {2.0: "l2", 1.0: "l1"}.get(self.p, "lp")
        super().__init__(strength=strength, name=name)

    def build(self, model):
        try:
            layer_kernels = [k for w in structure.weight_layers(model) for k in w.kernels]
        except structure.StructureError:
            layer_kernels = []
        # Every kernel a user would expect decayed: Dense and convolution kernels, and the other trainable weight
        # matrices (recurrent kernels, embedding tables, attention projections). Biases and normalization
        # parameters (rank 1) are not decayed, as is standard.
        self._kernels = layer_kernels + structure.other_kernels(model)
        if not self._kernels:
            raise structure.StructureError(f"{self.name}: the model has no trainable kernel (rank >= 2) to decay.")
        left_out = [v for v in structure.unwrap(model).trainable_variables if len(v.shape) < 2]
        self.coverage = {
            "regularized": [getattr(v, "path", v.name) for v in self._kernels],
            "left_out": {getattr(v, "path", v.name): "bias or normalization parameter (rank 1): not decayed" for v in left_out},
        }
        super().build(model)

    def call(self, context):
        total = 0.0
        for kernel in self._kernels:
            kernel = ops.cast(kernel, "float32")
            if self.p == 2.0:
                total += ops.sum(ops.square(kernel))
            elif self.p == 1.0:
                total += ops.sum(ops.abs(kernel))
            else:
                total += ops.sum(ops.power(ops.abs(kernel), self.p))
        return total

    def get_config(self):
        return {**super().get_config(), "p": self.p}


register_alias("l2", WeightDecay, p=2.0)
register_alias("weight_decay", WeightDecay, p=2.0)
register_alias("l1", WeightDecay, p=1.0)
