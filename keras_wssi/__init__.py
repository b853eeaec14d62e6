"""keras_wssi: weight-scale-shift-invariant, Jacobian, curvature, weight-perturbation and slope
regularizers for Keras 3, with the evaluation that checks what they buy.

Layers of the package, lowest first (nothing imports a module above it; `tests/test_import_layering.py` derives
this order from the imports and fails on a cycle or an upward import):

1. tensor math, arguments and autodiff: `validation`, `labels`, `backend` (the primitives that differ per Keras
   backend: training step, VJP/JVP, compiled functions, random draws; one module per backend), `linalg`;
2. reading models: `structure`, `margin_bounds`, `context`, `xla` (when to compile with XLA);
3. training side: `penalties`, `regularizers`, then `models` (the training step, with `distribute`'s multi-worker
   fix), `architectures`, `data`, `callbacks`, `experiments`;
4. reading side: `analysis` (bounds, identities, slope, certificates), then `evaluation` (attacks, noise, weight
   perturbations, reports). Neither imports the training side.
"""

from keras_wssi import analysis
from keras_wssi import architectures
from keras_wssi import backend
from keras_wssi import callbacks
from keras_wssi import data
from keras_wssi import distribute
from keras_wssi import evaluation
from keras_wssi import experiments
from keras_wssi import labels
from keras_wssi import linalg
from keras_wssi import penalties
from keras_wssi import regularizers
from keras_wssi import structure
from keras_wssi import validation
from keras_wssi import xla
from keras_wssi.models import FunctionalModel
from keras_wssi.models import Model
from keras_wssi.models import WrappedModel
from keras_wssi.models import wrap
from keras_wssi.penalties import penalty_loss
from keras_wssi.version import __version__


__all__ = [
    "FunctionalModel",
    "Model",
    "WrappedModel",
    "analysis",
    "architectures",
    "backend",
    "callbacks",
    "data",
    "distribute",
    "evaluation",
    "experiments",
    "labels",
    "linalg",
    "penalties",
    "penalty_loss",
    "regularizers",
    "structure",
    "validation",
    "xla",
    "wrap",
]
