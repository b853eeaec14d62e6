"""The "ineffective family" of baselines: `Σ_l Σ |W_l|^p` (L2 weight decay, L1, general Lp).

Liu et al. (arXiv 2008.02965) show these are not invariant under the weight scale shift: an optimizer can
lower them by rebalancing layers without changing the function, down to `L · (∏ ||W_l||²)^{1/L}` for L2.
They are kept as baselines for the WEISSI penalties.
"""

import tensorflow as tf

from keras_wssi import structure
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_alias
from keras_wssi.penalties.base import register_penalty

__all__ = ["WeightDecay"]


@register_penalty("lp")
class WeightDecay(Penalty):
    """`Σ_l Σ_ij |W_l,ij|^p` over the kernels of every weight layer (biases are not decayed).

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
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not float(p) >= 1.0:
            raise ValueError(f"p must be a number >= 1, got {p!r}.")
        self.p = float(p)
        if name is None:
            name = {2.0: "l2", 1.0: "l1"}.get(self.p, "lp")
        super().__init__(strength=strength, name=name)

    def build(self, model):
        self._kernels = [k for w in structure.weight_layers(model) for k in w.kernels]
        super().build(model)

    def call(self, context):
        total = 0.0
        for kernel in self._kernels:
            kernel = tf.cast(kernel, tf.float32)
            if self.p == 2.0:
                total += tf.reduce_sum(tf.square(kernel))
            elif self.p == 1.0:
                total += tf.reduce_sum(tf.abs(kernel))
            else:
                total += tf.reduce_sum(tf.pow(tf.abs(kernel), self.p))
        return total

    def get_config(self):
        return {**super().get_config(), "p": self.p}


register_alias("l2", WeightDecay, p=2.0)
register_alias("weight_decay", WeightDecay, p=2.0)
register_alias("l1", WeightDecay, p=1.0)
