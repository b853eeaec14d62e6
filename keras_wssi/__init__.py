"""keras_wssi: weight-scale-shift-invariant, Jacobian, curvature, weight-perturbation and slope
regularizers for Keras 3, with the evaluation that checks what they buy."""

from keras_wssi import analysis
from keras_wssi import architectures
from keras_wssi import callbacks
from keras_wssi import data
from keras_wssi import evaluation
from keras_wssi import linalg
from keras_wssi import penalties
from keras_wssi import regularizers
from keras_wssi import structure
from keras_wssi.models import FunctionalModel
from keras_wssi.models import Model
from keras_wssi.models import WrappedModel
from keras_wssi.models import wrap

__version__ = "0.1.0"

__all__ = [
    "FunctionalModel",
    "Model",
    "WrappedModel",
    "analysis",
    "architectures",
    "callbacks",
    "data",
    "evaluation",
    "linalg",
    "penalties",
    "regularizers",
    "structure",
    "wrap",
]
