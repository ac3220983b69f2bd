"""Errors raised by lfp_jax. All of them say what is wrong and how to fix it."""

from __future__ import annotations


class LFPError(ValueError):
    """Base class: the model, its inputs or the reward cannot be handled as given."""


class NoRuleError(LFPError):
    """An input-dependent operation that no feedback rule covers.

    LFP must never silently fall back to the plain gradient, so the engine refuses a model in which
    reward would cross an operation it has no rule for.
    """


class UnsupportedControlFlowError(LFPError):
    """Control flow that reward cannot be propagated back through (a data-dependent while loop)."""


class RewardError(LFPError):
    """A reward whose structure, shape or dtype does not match the model outputs."""


class FrozenParameterError(LFPError):
    """Parameters that are exactly zero: LFP feedback is proportional to ``|θ|`` and can never move them."""


class FrozenParameterWarning(UserWarning):
    """Parameters that are exactly zero and will never move under LFP (see FrozenParameterError)."""


class UnmatchedRuleWarning(UserWarning):
    """A ``(Match, Rule)`` pair added to a composite selects no site of the model (it has no effect)."""


class ConservationError(LFPError):
    """A site whose rule should conserve relevance loses more than the tolerance (strict
    :func:`lfp_jax.conservation`)."""

__all__ = ["LFPError", "NoRuleError", "UnsupportedControlFlowError", "RewardError", "FrozenParameterError",
           "FrozenParameterWarning", "UnmatchedRuleWarning", "ConservationError"]
