"""What a penalty may read during one step: `PenaltyContext`.

The training loop (`keras_wssi.Model`), the functional entry point (`keras_wssi.penalty_loss`) and the analysis
functions that replay a penalty on data all build the same context: the model, the batch, the logits of the
step's own forward pass and, when a penalty needs them, products with the input Jacobian of that pass. The
products come from `keras_wssi.backend`, the only place where they depend on the Keras backend.
"""

from keras import ops

from keras_wssi import backend

__all__ = ["PenaltyContext"]


class PenaltyContext:
    """What a penalty may read during one step.

    Attributes:
        model: the model being trained (a `keras.Model`).
        x: the input batch, as fed to the model.
        y: the targets (may be None).
        sample_weight: per-example weights (may be None).
        logits: the model's output on `x`, cast to float32.
        y_pred: the same output in the model's own dtype.
        training: whether this is a training step (stateful penalties update their state only then).

    Args:
        input_jacobian: a `keras_wssi.backend.InputJacobian` of the forward pass that produced `logits`, or
            None when no penalty needs Jacobian products.
        input_tape: alternatively (TensorFlow only), a persistent `tf.GradientTape` that watched `x` while
            `logits` were computed.
    """

    def __init__(self, model, x, y, sample_weight, logits, training, input_tape=None, input_jacobian=None):
        self.model = model
        self.x = x
        self.y = y
        self.sample_weight = sample_weight
        self.logits = ops.cast(logits, "float32") if logits is not None else None
        # The output as the model produced it (e.g. float16 under mixed precision).
        self.y_pred = self._raw_logits = logits
        self.training = training
        if input_jacobian is None and input_tape is not None:
            input_jacobian = backend.InputJacobian(input_tape, x, logits)
        self._input_jacobian = input_jacobian

    @property
    def batch_size(self):
        return ops.shape(self.logits)[0]

    def _require_jacobian(self):
        if self._input_jacobian is None:
            raise ValueError(
                "This penalty uses input-Jacobian products but does not declare 'input_jacobian' in its "
                "`requires`; the training loop only watches the inputs for penalties that ask for it."
            )
        if isinstance(self.x, (list, tuple, dict)) or not hasattr(self.x, "dtype"):
            raise ValueError(
                "Input-Jacobian penalties need a model with a single tensor input; got inputs of type "
                f"{type(self.x).__name__}."
            )

    def vjp(self, cotangent):
        """Per-example vector-Jacobian product `cᵀ J` with `J = ∂logits/∂x`.

        Args:
            cotangent: `(batch, C)` tensor, one vector per example.

        Returns:
            A float32 tensor shaped like `x`: row `i` is `c_iᵀ J(x_i)`. It is differentiable with respect to the
            weights (double backprop), and reuses the forward pass of the step: no extra forward.
        """
        self._require_jacobian()
        return self._input_jacobian.vjp(cotangent)

    def jvp(self, tangent):
        """Per-example Jacobian-vector product `J u` (`u` shaped like `x`), `(batch, C)` float32."""
        self._require_jacobian()
        return self._input_jacobian.jvp(tangent)

    def forward(self, x, training=None):
        """Runs the model on other inputs (for penalties that probe nearby points), logits as float32."""
        if training is None:
            training = self.training
        return ops.cast(self.model(x, training=training), "float32")

    def compiled_loss(self, y_pred):
        """The loss given to `compile` (without `model.losses`) of predictions `y_pred` against this step's
        targets and sample weights, as a float32 scalar. Lets a penalty evaluate the training loss at other
        weights (e.g. sharpness-aware minimization) with the loss the user chose."""
        compiled = getattr(self.model, "_compile_loss", None)
        if compiled is None:
            raise ValueError("This penalty needs the compiled loss: pass `loss=` to `model.compile`.")
        # Keras scales the compiled loss by 1/replicas under tf.distribute; penalties are scaled once, by the
        # training loop, so return the per-replica loss unscaled.
        loss = backend.unscale_loss_for_distribution(compiled(self.y, y_pred, self.sample_weight))
        return ops.cast(loss, "float32")

    def reduce_per_example(self, values):
        """Mean of per-example values, weighted by `sample_weight` when one is given."""
        values = ops.cast(values, "float32")
        if self.sample_weight is None:
            return ops.mean(values)
        weights = ops.reshape(ops.cast(self.sample_weight, "float32"), [-1])
        values = ops.reshape(values, [-1])
        return ops.divide_no_nan(ops.sum(values * weights), ops.sum(weights))

