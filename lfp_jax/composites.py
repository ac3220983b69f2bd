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
    """The reference LFP-ε composite (lfprop's ``LFPEpsilonComposite``), with AttnLRP's rules where the
    reference has none.

    Dense/Conv (with bias), residual sums, average pooling, means and normalisations (one block, exact
    Jacobian, batch statistics included) use :class:`~lfp_jax.rules.Epsilon`; every activation uses
    :class:`~lfp_jax.rules.Identity`; max pooling and the elementwise max/min of two input-dependent
    values (maxout) :class:`~lfp_jax.rules.WinnerTakeAll`; dropout
    :class:`~lfp_jax.rules.Dropout` (``dropout_rescale=False`` conserves reward instead); LIF neurons
    :class:`~lfp_jax.rules.SpikingEpsilon`. Transformers and gated recurrent cells train with no opt-in:
    softmax sites get AttnLRP's :class:`~lfp_jax.rules.SoftmaxTaylor` and products of input-dependent
    values (``q·kᵀ``, attention · values, gates) AttnLRP's :class:`~lfp_jax.rules.UniformProduct` with
    the same ε. (The reference's ViT gives these sites the plain gradient: :func:`reference_vit`.)

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
            (Match(kind="softmax", label="softmax"), R.SoftmaxTaylor()),
            (Match(kind="bilinear"), R.UniformProduct(epsilon)),
        ),
        name=f"lfp_epsilon(epsilon={epsilon:g})",
    )


def attn_lrp(epsilon: float = 1e-6) -> Composite:
    r"""AttnLRP (Achtibat et al., ICML 2024) for explanations, as LXT applies it.

    Linear layers, residual sums and means: :class:`~lfp_jax.rules.Epsilon`; LayerNorm and RMSNorm
    (any normalisation): :class:`~lfp_jax.rules.ConstantStd` (``1/σ`` held constant, then the ε rule;
    for RMSNorm the identity up to ε); activations (GELU, SiLU, ...):
    :class:`~lfp_jax.rules.Identity`; softmax: :class:`~lfp_jax.rules.SoftmaxTaylor`; matrix
    products of two input-dependent values (``q·kᵀ``, attention · values):
    :class:`~lfp_jax.rules.UniformProduct` with ε; elementwise products (gates):
    ``UniformProduct(None)``, the reward split equally with no stabiliser; max pooling and maxout:
    :class:`~lfp_jax.rules.WinnerTakeAll`; dropout conserves reward. LXT's stabiliser is a plain
    ``+ε``; lfp_jax's is ``ε·sign(z)``: the two agree for small ε.

    Args:
      epsilon: ε of every ε rule (LXT uses 1e-6 to 1e-8).
    """
    base = lfp_epsilon(epsilon, dropout_rescale=False)
    return dataclasses.replace(
        base.with_rules((Match(kind="normalization"), R.ConstantStd(epsilon)),
                        (Match(kind="bilinear", label="mul"), R.UniformProduct(None))),
        name=f"attn_lrp(epsilon={epsilon:g})")


def reference_vit(epsilon: float = 1.0) -> Composite:
    """The reference implementation's ViT behaviour, for comparison: LFP-ε with ε = 1 on linear layers
    and LayerNorms, identity on activations, and the plain gradient at softmax sites, products and
    residual sums, where the reference meant AttnLRP's rules but they are not applied.

    Args:
      epsilon: ε of the ε rules (the reference's ViT uses 1.0).
    """
    base = lfp_epsilon(epsilon)
    grad = R.Gradient()
    return dataclasses.replace(
        base.with_rules((Match(kind="softmax"), grad), (Match(kind="bilinear"), grad),
                        (Match(kind="sum"), grad)),
        name=f"reference_vit(epsilon={epsilon:g})")
