"""Composites: which rule applies at which site.

A :class:`Composite` is an ordered tuple of ``(Match, Rule)`` pairs; for each site the *last* matching
pair wins, so a preset can be refined by appending pairs::

    composite = lfp_jax.lfp_epsilon().with_rules(
        (Match(path="*/Dense_0"), rules.ZPlus()),    # first Dense layer of a linen model
        (Match(label="tanh"), rules.Gradient()),     # plain gradient through tanh
    )

``lfp_jax.describe(fun, *args, composite=...)`` prints the resolved table.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

from lfp_jax import rules as R
from lfp_jax.errors import NoRuleError


@dataclasses.dataclass(frozen=True)
class Match:
    """Selects sites. Every given criterion must hold.

    Args:
      kind: site kind (``"linear"``, ``"activation"``, ``"normalization"``, ``"sum"``, ``"pool"``,
        ``"max_pool"``, ``"max"``, ``"dropout"``, ``"spiking"``, ``"softmax"``, ``"bilinear"``,
        ``"nonlinear"``).
      label: what the site computes (``"dense"``, ``"conv"``, ``"relu"``, ``"tanh"``, ``"silu"``,
        ``"gelu"``, ``"step"``, ``"batch_norm"``, ...); glob patterns allowed.
      path: glob over the site's module path (:attr:`lfp_jax.sites.Site.path`): a linen module
        path such as ``"MLP/Dense_0"``, an nnx attribute path such as ``"layers/0/linear"``, an
        equinox field path such as ``"layers/0"``, or a ``jax.named_scope``.
      where: any predicate ``site -> bool``.
    """

    kind: str | None = None
    label: str | None = None
    path: str | None = None
    where: Callable[[Any], bool] | None = None

    def __call__(self, site: Any) -> bool:
        if self.kind is not None and site.kind != self.kind:
            return False
        if self.label is not None and not fnmatch.fnmatchcase(site.label, self.label):
            return False
        if self.path is not None and not fnmatch.fnmatchcase(site.path, self.path):
            return False
        return self.where is None or bool(self.where(site))


@dataclasses.dataclass(frozen=True)
class Composite:
    """Ordered ``(Match, Rule)`` pairs; the last pair matching a site gives its rule.

    Attributes:
      entries: the pairs.
      name: shown by :func:`lfp_jax.describe`.
    """

    entries: tuple[tuple[Match, R.Rule], ...]
    name: str = "custom"

    def with_rules(self, *pairs: tuple[Match, R.Rule]) -> Composite:
        """A copy with ``pairs`` appended (they take precedence)."""
        return dataclasses.replace(self, entries=self.entries + tuple(pairs))

    def lookup(self, site: Any) -> tuple[R.Rule | None, str | None]:
        """The rule of ``site``: ``(rule, None)``, or ``(None, why)`` when no pair gives one."""
        for match, rule in reversed(self.entries):
            if match(site):
                if site.kind not in rule.kinds:
                    return None, (
                        f"rule {rule!r} was selected for this {site.kind!r} site, but it only applies "
                        f"to {sorted(rule.kinds)}. Narrow the Match (e.g. Match(kind=...)) so it "
                        f"selects sites of those kinds.")
                return rule, None
        return None, f"no rule in composite {self.name!r} matches this {site.kind!r} site."

    def resolve(self, site: Any) -> R.Rule:
        """The rule of ``site``; raises :class:`~lfp_jax.errors.NoRuleError` when there is none."""
        rule, problem = self.lookup(site)
        if rule is None:
            raise NoRuleError(f"{site.kind!r} site ({site.label}) at {site.source_line}: {problem}")
        return rule


def lfp_epsilon(epsilon: float = 1e-6, *, dropout_rescale: bool = True) -> Composite:
    """The reference LFP-ε composite (lfprop's ``LFPEpsilonComposite``).

    Dense/Conv (with bias), residual sums, average pooling, means and normalisations (one block, exact
    Jacobian, batch statistics included) use :class:`~lfp_jax.rules.Epsilon`; every activation uses
    :class:`~lfp_jax.rules.Identity`; max pooling and the elementwise max/min of two input-dependent
    values (maxout) :class:`~lfp_jax.rules.WinnerTakeAll`; dropout
    :class:`~lfp_jax.rules.Dropout` (``dropout_rescale=False`` conserves reward instead); LIF neurons
    :class:`~lfp_jax.rules.SpikingEpsilon`.

    Args:
      epsilon: ε of every ε rule; 1e-6 in the reference (1.0 for its transformers).
      dropout_rescale: reproduce the reference's ``1/(1-p)`` rescaling of reward at dropout layers.
    """
    eps = R.Epsilon(epsilon)
    return Composite(
        entries=(
            (Match(kind="linear"), eps),
            (Match(kind="sum"), eps),
            (Match(kind="pool"), eps),
            (Match(kind="normalization"), eps),
            (Match(kind="activation"), R.Identity()),
            (Match(kind="max_pool"), R.WinnerTakeAll()),
            (Match(kind="max"), R.WinnerTakeAll()),
            (Match(kind="dropout"), R.Dropout(rescale=dropout_rescale)),
            (Match(kind="spiking"), R.SpikingEpsilon(epsilon)),
        ),
        name=f"lfp_epsilon(epsilon={epsilon:g})",
    )
