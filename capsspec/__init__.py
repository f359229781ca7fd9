"""capsspec: the capsule network of "Dynamic Routing Between Capsules" as a specification.

The reference is plain NumPy (capsspec.ops, capsspec.model, capsspec.optim). Backends for
PyTorch, TensorFlow, CuPy, JAX and onnxruntime implement the same names and are found by name through
get_backend. Importing capsspec imports no framework: a framework is imported only when its
backend is used.
"""

from __future__ import annotations


def _find_checkout_subpackages() -> None:
    """Run from a source checkout (PYTHONPATH=the repository, nothing installed), find backends/ and
    conformance/ one folder up: an install maps them to capsspec.backends and capsspec.conformance
    (pyproject.toml's package-dir), a checkout alone does not. Only a checkout that has them and
    that no installed finder already serves gets the repository root added to this package's path."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "backends", "__init__.py")) and importlib.util.find_spec(
            __name__ + ".backends") is None:
        __path__.append(root)  # noqa: F821 (a package's __path__)


_find_checkout_subpackages()

from .backend import Availability, Backend, BackendUnavailable
from .config import AdamConfig, CapsNetConfig
from .model import forward, init_params, loss, predict, value_and_grad
from .optim import adam_init, adam_update, train_step
from .registry import available_backends, backend_names, describe_backends, get_backend
from .spec import OPS, SPEC_NAMES, CapsNetOutput, LossParts, StepMetrics
from . import ops

from .version import __version__

__all__ = [
    "AdamConfig", "Availability", "Backend", "BackendUnavailable", "CapsNetConfig", "CapsNetOutput",
    "LossParts", "OPS", "SPEC_NAMES", "StepMetrics", "adam_init", "adam_update", "available_backends",
    "backend_names", "describe_backends", "forward", "get_backend", "init_params", "loss", "ops", "predict",
    "train_step", "value_and_grad", "__version__",
]
