"""Installs keras_wssi: `pip install .` (library) or `pip install ".[test]"` (with what the tests need)."""

import setuptools

setuptools.setup(
    name="keras_wssi",
    version="0.1.0",
    description=(
        "Weight-scale-shift-invariant, Jacobian, curvature, weight-perturbation and slope regularizers "
        "for Keras 3, with cleverhans-based robustness evaluation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_wssi", "keras_wssi.*"]),
    python_requires=">=3.11",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets 4.9.x imports importlib_resources without declaring it.
        "importlib_resources",
        "absl-py",
        # TensorBoard logging (TensorFlow 2.21 no longer installs it).
        "tensorboard",
        "cleverhans>=4.0.0",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        # The JAX backend (KERAS_BACKEND=jax); CPU wheels. On GPU/TPU install JAX for the accelerator first
        # (e.g. `pip install "jax[cuda12]"`), then this extra.
        "jax": ["jax>=0.4.30"],
        # CW-L2 and the gradient-free Square attack (cleverhans 4.0.0's own crash on Keras 3).
        "attacks": ["adversarial-robustness-toolbox>=1.20"],
        "test": [
            "adversarial-robustness-toolbox>=1.20",
            "jax>=0.4.30",
            "pytest>=7",
            "pytest-xdist",
            "hypothesis",
            "scipy",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
    license="Apache-2.0",
)
