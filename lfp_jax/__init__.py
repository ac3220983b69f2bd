"""lfp_jax: Layer-wise Feedback Propagation as a JAX function transformation.

``lfp_value_and_feedback`` is to LFP what ``jax.value_and_grad`` is to gradient descent.
"""

from lfp_jax import composites, errors, metrics, nn, rewards, rules, sites, targets
from lfp_jax.api import (
    check_params,
    describe,
    find_sites,
    lfp_grad,
    lfp_value_and_feedback,
    lfp_value_and_grad,
    lfp_vjp,
    lrp,
)
from lfp_jax.composites import Composite, Match, lfp_epsilon
from lfp_jax.conservation import ConservationReport, conservation
from lfp_jax.errors import LFPError

__version__ = "0.1.0"  # the one version number: pyproject.toml reads it (dynamic version)

__all__ = [
    "Composite",
    "LFPError",
    "Match",
    "check_params",
    "composites",
    "conservation",
    "ConservationReport",
    "describe",
    "errors",
    "find_sites",
    "lfp_epsilon",
    "lfp_grad",
    "lfp_value_and_feedback",
    "lfp_value_and_grad",
    "lfp_vjp",
    "lrp",
    "metrics",
    "nn",
    "rewards",
    "rules",
    "sites",
    "targets",
]
