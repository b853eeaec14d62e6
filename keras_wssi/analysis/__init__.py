"""Analysis tools: functions of a trained model and data, used by tests, experiments and reports.

Analysis only reads models: it imports the tensor math (`linalg`, `labels`, `validation`, `margin_bounds`), the
model reader (`structure`) and the step context (`context`), never the training side (`penalties`, `models`, `callbacks`,
`data`, `architectures`) — a test checks this.
"""

from keras_wssi.analysis.bounds import input_gradient_bound
from keras_wssi.analysis.bounds import input_jacobian_spectral_norms
from keras_wssi.analysis.bounds import layer_operator_norm_bounds
from keras_wssi.analysis.invariance import scale_shift
from keras_wssi.analysis.jacobian import centered_jacobian
from keras_wssi.analysis.jacobian import input_jacobian
from keras_wssi.analysis.jacobian import jacobian_identities
from keras_wssi.analysis.jacobian import jacobian_penalty_report
from keras_wssi.analysis.jacobian import jacobian_spectral_norm_estimates
from keras_wssi.analysis.jacobian import layerwise_spectral_norms
from keras_wssi.analysis.slope import slope
from keras_wssi.analysis.slope import slope_distribution
from keras_wssi.analysis.weight_perturbation import certified_accuracy
from keras_wssi.analysis.weight_perturbation import certified_accuracy_curve
from keras_wssi.analysis.weight_perturbation import certified_margins
from keras_wssi.analysis.weight_perturbation import certified_radius
from keras_wssi.analysis.weight_perturbation import generalization_bound
from keras_wssi.analysis.weight_perturbation import margin_change_bounds

__all__ = [
    "centered_jacobian",
    "certified_accuracy",
    "certified_margins",
    "generalization_bound",
    "input_gradient_bound",
    "input_jacobian",
    "input_jacobian_spectral_norms",
    "jacobian_identities",
    "jacobian_penalty_report",
    "jacobian_spectral_norm_estimates",
    "layer_operator_norm_bounds",
    "layerwise_spectral_norms",
    "margin_change_bounds",
    "scale_shift",
    "slope",
    "slope_distribution",
]
