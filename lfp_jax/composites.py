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
import functools
from collections.abc import Callable
from typing import Any

from lfp_jax import rules as R
from lfp_jax._report import rule_name
from lfp_jax.errors import NoRuleError


@dataclasses.dataclass(frozen=True)
class Match:
    """Selects sites. Every given criterion must hold.

    Args:
      kind: site kind (``"linear"``, ``"activation"``, ``"normalization"``, ``"sum"``, ``"pool"``,
        ``"max_pool"``, ``"max"``, ``"dropout"``, ``"spiking"``, ``"softmax"``, ``"bilinear"``,
        ``"embedding"``, ``"nonlinear"``).
      label: what the site computes (``"dense"``, ``"conv"``, ``"relu"``, ``"tanh"``, ``"silu"``,
        ``"gelu"``, ``"step"``, ``"batch_norm"``, ...); glob patterns allowed.
      path: glob over the site's module path (:attr:`lfp_jax.sites.Site.path`): a linen module
        path such as ``"MLP/Dense_0"``, an nnx attribute path such as ``"layers/0/linear"``, an
        equinox field path such as ``"layers/0"``, or a ``jax.named_scope``.
      first: ``True`` selects only the *first layer*, a linear site that reads a model input (through
        moves and elementwise affine operations only, such as a reshape or an input normalisation),
        ``False`` only the others; zennit's special first layer, with no module path needed.
      where: any predicate ``site -> bool``.
    """

    kind: str | None = None
    label: str | None = None
    path: str | None = None
    first: bool | None = None
    where: Callable[[Any], bool] | None = None

    def __call__(self, site: Any) -> bool:
        if self.kind is not None and site.kind != self.kind:
            return False
        if self.first is not None and bool(getattr(site, "first", False)) != self.first:
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
      preset: how many leading entries are a preset's defaults. A pair after them that selects no site
        of a model is most likely a mistake (a misspelt path or label), so the transformation warns
        (:class:`~lfp_jax.errors.UnmatchedRuleWarning`); a preset's own pairs (rules for spiking or
        attention sites a model may not have) are exempt.
    """

    entries: tuple[tuple[Match, R.Rule], ...]
    name: str = "custom"
    preset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.entries, (tuple, list)):
            raise TypeError(f"Composite(entries=...) takes a tuple of (Match, Rule) pairs, got "
                            f"{type(self.entries).__name__}: {self.entries!r}")
        for pair in self.entries:
            _check_pair(pair, "Composite(entries=...)")
        object.__setattr__(self, "entries", tuple(tuple(p) for p in self.entries))

    def with_rules(self, *pairs: tuple[Match, R.Rule], name: str | None = None) -> Composite:
        """A copy with ``pairs`` appended (they take precedence).

        Args:
          name: the new composite's name; by default the old name followed by the pairs, e.g.
            ``lfp_epsilon(epsilon=1e-06).with_rules(Match(kind='linear') -> ZPlus(1e-06))``, so that
            :func:`lfp_jax.describe` shows what was changed.
        """
        for pair in pairs:
            _check_pair(pair, "with_rules")
        if name is None:
            name = f"{self.name}.with_rules({', '.join(f'{_show(m)} -> {_show(r)}' for m, r in pairs)})"
        return dataclasses.replace(self, entries=self.entries + tuple(pairs), name=name)

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


_PAIR_FORM = "(Match(...), Rule) pairs such as (Match(kind='linear'), rules.ZPlus())"


def _check_pair(pair: Any, where: str) -> None:
    """``pair`` is ``(selector, rule)``: a :class:`Match` (or any ``site -> bool``) and a rule."""
    if isinstance(pair, tuple) and len(pair) == 2:
        sel, rule = pair
        if isinstance(sel, R.Rule) and (isinstance(rule, Match) or callable(rule)):
            raise TypeError(f"{where} takes {_PAIR_FORM}; got ({_show(sel)}, {_show(rule)}): the "
                            f"order is (Match, Rule), swap the two")
        if callable(sel) and not isinstance(sel, (R.Rule, type)) and isinstance(rule, R.Rule):
            return
        if isinstance(rule, type) and issubclass(rule, R.Rule):
            raise TypeError(f"{where} takes {_PAIR_FORM}; got the class {rule.__name__} in "
                            f"({_show(sel)}, {rule.__name__}): pass an instance, {rule.__name__}()")
    shown = f"({', '.join(map(_show, pair))})" if isinstance(pair, tuple) else _show(pair)
    raise TypeError(f"{where} takes {_PAIR_FORM}; got {shown} ({type(pair).__name__})")


def check_composite(composite: Any) -> Composite:
    """``composite`` itself when it is a :class:`Composite`, else a ``TypeError`` that says how to make
    one (used by every transformation before it traces the model)."""
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str):
        fix = (f"lfp_jax.composites.{composite}()" if composite in PRESETS
               else f"a preset such as lfp_jax.lfp_epsilon() (presets: {', '.join(PRESETS)})")
        raise TypeError(f"composite must be a Composite, got the string {composite!r}: call {fix}")
    if callable(composite) and getattr(composite, "__name__", "") in PRESETS:
        raise TypeError(f"composite must be a Composite, got the function {composite.__name__}: call it, "
                        f"composite={composite.__name__}()")
    if isinstance(composite, R.Rule):
        raise TypeError(f"composite must be a Composite, got the rule {_show(composite)}: give it the sites "
                        f"it applies to, e.g. lfp_jax.lfp_epsilon().with_rules((Match(kind=...), "
                        f"{_show(composite)}))")
    if isinstance(composite, (list, tuple)):
        raise TypeError(f"composite must be a Composite, got a {type(composite).__name__}: wrap the pairs, "
                        f"lfp_jax.lfp_epsilon().with_rules(*pairs) (the preset's rules, refined) or "
                        f"Composite(entries=tuple(pairs)) (only these rules)")
    raise TypeError(f"composite must be a Composite (e.g. lfp_jax.lfp_epsilon()), got {composite!r} "
                    f"({type(composite).__name__})")


def unmatched(composite: Composite, sites: list) -> list[tuple[Match, R.Rule]]:
    """The pairs of ``composite`` after its preset entries that select none of ``sites``."""
    return [(m, r) for m, r in composite.entries[composite.preset:] if not any(m(s) for s in sites)]


def _preset(fn: Callable[..., Composite]) -> Callable[..., Composite]:
    """Mark every entry of the composite ``fn`` returns as a preset default (see ``Composite.preset``)."""

    @functools.wraps(fn)
    def make(*args: Any, **kwargs: Any) -> Composite:
        composite = fn(*args, **kwargs)
        return dataclasses.replace(composite, preset=len(composite.entries))

    return make


def _show(obj: Any) -> str:
    """``Match(kind='linear')`` or ``ZPlus(1e-06)``: only the fields that are set."""
    if isinstance(obj, Match):
        fields = [f"{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj)
                  if getattr(obj, f.name) is not None and f.name != "where"]
        if obj.where is not None:
            fields.append(f"where={getattr(obj.where, '__name__', 'fn')}")
        return f"Match({', '.join(fields)})"
    return rule_name(obj) if isinstance(obj, R.Rule) else repr(obj)


@_preset
def lfp_epsilon(epsilon: float = 1e-6, *, dropout_rescale: bool = True,
                products: str = "uniform") -> Composite:
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

    ``products="gradient"`` is a variant for training: products of two input-dependent values get the
    plain gradient (:class:`~lfp_jax.rules.Gradient`) instead of the uniform split. For ``y = a ⊙ b``
    the uniform rule hands each factor half the reward, ``c_a = ½ b ⊙ c_y`` in normalised form (the
    relevance is conserved, which an explanation needs); the gradient hands each the whole,
    ``c_a = b ⊙ c_y``. With it, every rule of a ReLU transformer is the gradient in normalised form as
    ε → 0 (the softmax rule is its VJP), so Theorem 1 holds there too, ``F_θ = −|θ| ⊙ ∇_θ Σ CE``
    (tested). Relevance is not conserved at products (a product's two factors get ``2 R_y`` between
    them); use it to train, and the default to explain. RESULTS.md ("Where LFP trails gradient
    descent") measures it on the character language model.

    Args:
      epsilon: ε of every ε rule; 1e-6 in the reference (1.0 for its transformers).
      dropout_rescale: reproduce the reference's ``1/(1-p)`` rescaling of reward at dropout layers.
      products: ``"uniform"`` (AttnLRP's rule, the default) or ``"gradient"`` at products of two
        input-dependent values (``q·kᵀ``, attention · values, gates).
    """
    if products not in ("uniform", "gradient"):
        raise ValueError(f"products must be 'uniform' (AttnLRP's rule, the default) or 'gradient', "
                         f"got {products!r}")
    eps = R.Epsilon(epsilon)
    variant = ", products='gradient'" if products == "gradient" else ""
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
            (Match(kind="bilinear"), R.UniformProduct(epsilon) if products == "uniform" else R.Gradient()),
            (Match(kind="embedding"), R.Embedding()),
        ),
        name=f"lfp_epsilon(epsilon={epsilon:g}{variant})",
    )


@_preset
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


@_preset
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


# -- zennit's LRP presets -----------------------------------------------------------------------------

_CONV = Match(kind="linear", label="conv")
_DENSE = Match(kind="linear", label="dense")
_FIRST = Match(kind="linear", first=True)
_FIRST_CONV = Match(kind="linear", label="conv", first=True)


def _lrp_base(epsilon: float, stabilizer: float, zero_bias: bool, conv: R.Rule, name: str,
              first: tuple = ()) -> Composite:
    r"""AttnLRP's rules at every site (ε at pooling and sums, identity at activations, ...), the ε rule at
    dense layers, ``conv`` at convolutions and ``first`` pairs for the first layer."""
    dense = R.LinearRule(epsilon, zero_bias=True) if zero_bias else R.Epsilon(epsilon)
    base = attn_lrp(stabilizer).with_rules((Match(kind="linear"), dense), (_CONV, conv), *first)
    return dataclasses.replace(base, name=name)


def _args(**kwargs) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, float) else f"{k}={v:g}" for k, v in kwargs.items())


@_preset
def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, *, zero_bias: bool = False) -> Composite:
    r"""zennit's ``EpsilonPlus``: z⁺ (:class:`~lfp_jax.rules.ZPlus`) at convolutions, the ε rule at dense
    layers; ε (``stabilizer``) at average pooling and sums, identity at activations, winner-takes-all at
    max pooling. Biases and eval-mode BatchNorms are merged into their layer (see :mod:`lfp_jax.rules.lrp`).

    Args:
      epsilon: ε of the dense layers' ε rule.
      stabilizer: ε of every other rule.
      zero_bias: leave biases out of every rule (zennit's ``zero_params="bias"``).
    """
    return _lrp_base(epsilon, stabilizer, zero_bias, R.ZPlus(stabilizer, zero_bias=zero_bias),
                     f"epsilon_plus({_args(epsilon=epsilon, stabilizer=stabilizer, zero_bias=zero_bias)})")


@_preset
def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, *,
                      zero_bias: bool = False) -> Composite:
    r""":func:`epsilon_plus` with the flat rule (:class:`~lfp_jax.rules.Flat`) at the first layer
    (``Match(first=True)``: a dense or convolutional layer reading the model input), zennit's
    ``EpsilonPlusFlat``."""
    return _lrp_base(epsilon, stabilizer, zero_bias, R.ZPlus(stabilizer, zero_bias=zero_bias),
                     f"epsilon_plus_flat("
                     f"{_args(epsilon=epsilon, stabilizer=stabilizer, zero_bias=zero_bias)})",
                     ((_FIRST, R.Flat(stabilizer)),))


@_preset
def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, *,
                         zero_bias: bool = False) -> Composite:
    r"""zennit's ``EpsilonAlpha2Beta1``: α-β with α = 2, β = 1 (:class:`~lfp_jax.rules.AlphaBeta`) at
    convolutions, the ε rule at dense layers (otherwise as :func:`epsilon_plus`)."""
    return _lrp_base(epsilon, stabilizer, zero_bias,
                     R.AlphaBeta(stabilizer, zero_bias=zero_bias, alpha=2.0, beta=1.0),
                     f"epsilon_alpha2_beta1("
                     f"{_args(epsilon=epsilon, stabilizer=stabilizer, zero_bias=zero_bias)})")


@_preset
def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, *,
                              zero_bias: bool = False) -> Composite:
    r""":func:`epsilon_alpha2_beta1` with the flat rule at the first layer, zennit's
    ``EpsilonAlpha2Beta1Flat``."""
    return _lrp_base(epsilon, stabilizer, zero_bias,
                     R.AlphaBeta(stabilizer, zero_bias=zero_bias, alpha=2.0, beta=1.0),
                     f"epsilon_alpha2_beta1_flat("
                     f"{_args(epsilon=epsilon, stabilizer=stabilizer, zero_bias=zero_bias)})",
                     ((_FIRST, R.Flat(stabilizer)),))


@_preset
def epsilon_gamma_box(low: Any = 0.0, high: Any = 1.0, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6, *, zero_bias: bool = False) -> Composite:
    r"""zennit's ``EpsilonGammaBox``: z^B (:class:`~lfp_jax.rules.ZBox`) with the input bounds
    ``low ≤ x ≤ high`` at the first convolution, the generalised γ rule (:class:`~lfp_jax.rules.Gamma`)
    at the other convolutions, the ε rule at dense layers.

    Args:
      low, high: the lowest and highest possible input values (scalars, or arrays broadcasting against
        the input, e.g. per channel for normalised images).
      epsilon: ε of the dense layers' ε rule.
      gamma: γ of the convolutions' γ rule.
      stabilizer: ε of every other rule.
      zero_bias: leave biases out of every rule.
    """
    box = R.ZBox(stabilizer, zero_bias=zero_bias, low=low, high=high)
    bounds = _args(low=low, high=high) if all(isinstance(v, (int, float)) for v in (low, high)) \
        else "low=<array>, high=<array>"
    return _lrp_base(epsilon, stabilizer, zero_bias, R.Gamma(stabilizer, zero_bias=zero_bias, gamma=gamma),
                     f"epsilon_gamma_box({bounds}, "
                     f"{_args(epsilon=epsilon, gamma=gamma, stabilizer=stabilizer, zero_bias=zero_bias)})",
                     ((_FIRST_CONV, box),))


#: Names of the preset composites (functions of this module that return a :class:`Composite`).
PRESETS = ("lfp_epsilon", "attn_lrp", "reference_vit", "epsilon_plus", "epsilon_plus_flat",
           "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat", "epsilon_gamma_box")

__all__ = ["Match", "Composite", "PRESETS", "lfp_epsilon", "attn_lrp", "reference_vit", "epsilon_plus",
           "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat", "epsilon_gamma_box"]
