r"""AttnLRP rules (Achtibat et al., *AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers*, ICML 2024; the PyTorch reference is LXT): softmax, products of input-dependent values,
and normalisations with ``1/σ`` held constant.

Each rule is given in the relevance form and in the engine's normalised form ``c = R / value`` (the
engine carries ``c`` backwards, see :mod:`lfp_jax.rules`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lfp_jax.rules._base import Array, Rule, SiteCall, stabilizer_factor, with_backward
from lfp_jax.rules.core import Epsilon


@dataclasses.dataclass(frozen=True)
class SoftmaxTaylor(Rule):
    r"""AttnLRP's softmax rule: the first-order Taylor decomposition of ``y = softmax(x)`` at ``x``.

    .. math::

        R_x = x \odot \big(R_y - y \odot \textstyle\sum_j R_{y,j}\big)
        \qquad\Longleftrightarrow\qquad
        c_x = y \odot \big(c_y - \textstyle\sum_j y_j\, c_{y,j}\big),

    the sums along the softmax axis. ``x`` are the raw scores: ``jax.nn.softmax`` first subtracts the
    row maximum (stopped, or ``max(-inf, max x)`` since jax 0.12.1, transposed where the softmax axis
    is not last), and the site includes that shift, so the rule (and the ε of the block that produced
    the scores) applies to the scores themselves. Masked scores (``-inf``) receive 0. In the
    normalised form the rule is the plain VJP of the softmax, so it costs what a gradient costs. It
    does not conserve reward: ``Σ R_x = Σ x ⊙ R_y − (Σ x ⊙ y)(Σ R_y)`` differs from ``Σ R_y``. No
    stabiliser at the output (as in LXT).

    The ε of the block that produced the scores (``q·kᵀ``, scaled and masked) is applied here, in the
    same backward pass, ``c_x ← c_x ⊙ x / (x + ε·sign(x))`` (0 at masked ``-inf`` scores), rather
    than by a separate stabiliser: the same numbers, with one pass less over the ``(…, T, T)``
    scores and no second copy of them kept for the backward pass.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"softmax"})
    absorbs_input_epsilon: ClassVar[bool] = True

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        site = call.site
        if site.label != "softmax":
            raise ValueError(f"SoftmaxTaylor applies to softmax sites, not to a {site.label} site "
                             f"at {site.source_line}")
        eps = call.input_epsilon
        if eps is None:
            return call.fn(*operands)
        axes = [p["axes"] for name, p in zip(site.primitives, site.params) if name == "reduce_sum"]
        explicit = tuple(site.primitives) in _PLAIN_SOFTMAX and not any(call.carries_reward[1:])

        def backward(ops, outs, ct):
            x = ops[0]
            if explicit:  # jax.nn.softmax: the VJP from the saved output, no second forward pass
                y = outs[0]
                cts = [y * (ct - jnp.sum(y * ct, axis=axes[0], keepdims=True))] + [None] * (len(ops) - 1)
            else:  # any other softmax site (a mask in the normaliser, ...): its exact VJP
                cts = list(jax.vjp(lambda *o: call.fn(*o)[0], *ops)[1](ct))
            # c_x ⊙ x / stab(x); 0 at masked (-inf) and at non-finite scores
            cts[0] = jnp.where(jnp.isfinite(x), stabilizer_factor(cts[0], x, eps), 0)
            return cts

        return with_backward(call, operands, backward)


# exp(x − c) / Σ exp(x − c) and nothing else (c a stopped or unstopped row maximum, or no shift):
# sites whose VJP is y ⊙ (c_y − Σ y ⊙ c_y) along the summed axes
_PLAIN_SOFTMAX = {("sub", "exp", "reduce_sum", "broadcast_in_dim", "div"),
                  ("reduce_max", "broadcast_in_dim", "sub", "exp", "reduce_sum", "broadcast_in_dim", "div"),
                  ("reduce_max", "max", "broadcast_in_dim", "sub", "exp", "reduce_sum", "broadcast_in_dim",
                   "div"),   # jax >= 0.12.1: the maximum as max(-inf, reduce_max x)
                  ("exp", "reduce_sum", "broadcast_in_dim", "div")}


@dataclasses.dataclass(frozen=True)
class UniformProduct(Rule):
    r"""AttnLRP's rule for a product of ``n`` input-dependent factors (``q·kᵀ``, attention · values, a
    gate ``silu(x W₁) ⊙ x W₃``, an LSTM's ``σ(·) ⊙ tanh(·)``): the ε rule, the reward split equally.

    For ``z = f(a_1, …, a_n)`` multilinear (an elementwise product, a matrix product), with
    ``s = R_z / (z + ε·sign(z))``:

    .. math::

        R_{a_i} = \tfrac{1}{n}\, a_i \odot J_{a_i}^\top s
        \qquad\Longleftrightarrow\qquad
        c_{a_i} = \tfrac{1}{n}\, J_{a_i}^\top c_z ,

    where ``c_z`` carries the stabiliser ``z / stab(z)`` placed at the product's output. Each factor
    alone would receive the whole reward (``Σ a_i ⊙ J_{a_i}ᵀ s = Σ R_z`` for a product that is linear
    in each factor), so the split conserves it at ε → 0. ``n`` counts the factors of the whole site: a
    chain of elementwise products ``a * b * c`` is one site with ``n = 3``, so the result does not
    depend on how the expression is grouped; a factor used twice (``a * a * b``) counts twice.

    Args:
      epsilon: the stabiliser at the product's output; ``None``: none (LXT's elementwise products,
        ``R_{a_i} = R_z / n``).
    """

    epsilon: float | None = 1e-6
    kinds: ClassVar[frozenset[str]] = frozenset({"bilinear"})
    conservative: ClassVar[bool] = True

    @property
    def output_epsilon(self) -> float | None:
        return self.epsilon

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        site = call.site
        if not set(site.primitives) <= {"mul", "dot_general", "conv_general_dilated"}:
            raise ValueError(f"UniformProduct applies to products, not to {'+'.join(site.primitives)} "
                             f"at {site.source_line}")
        reward = [k for k, c in enumerate(call.carries_reward) if c]
        n = site.factors or len(reward)

        def backward(ops, outs, ct):
            def product(*factors):
                full = list(ops)
                for k, f in zip(reward, factors):
                    full[k] = f
                return call.fn(*full)[0]

            _, vjp = jax.vjp(product, *(ops[k] for k in reward))
            cts = vjp(ct / n)
            grads: list = [None] * len(ops)
            for k, g in zip(reward, cts):
                grads[k] = g
            return grads

        return with_backward(call, operands, backward)


@dataclasses.dataclass(frozen=True)
class ConstantStd(Epsilon):
    r"""AttnLRP's rule for LayerNorm and RMSNorm: the ε rule of the block with ``1/σ`` held constant.

    For LayerNorm ``y = γ ⊙ (x − μ(x)) / σ + β`` the block is then the affine map
    ``x ↦ γ ⊙ (x − μ(x)) / σ + β`` (centring included, the offset absorbs reward), and with
    ``s = R_y / (y + ε·sign(y))``:

    .. math::

        R_x = x \odot J_x^\top s,\quad
        J_x = \operatorname{diag}(γ/σ)\,(I - \tfrac{1}{d}\mathbf{1}\mathbf{1}^\top)
        \qquad\Longleftrightarrow\qquad c_x = J_x^\top c_y .

    For RMSNorm ``y = γ ⊙ x / σ`` this is the identity rule up to the stabiliser (``R_x = R_y ⊙
    y/stab(y)``), as LXT applies it. The engine evaluates the site with ``stop_gradient`` on its
    ``rsqrt``/``sqrt`` primitives; the forward values are unchanged. :class:`~lfp_jax.rules.Epsilon`
    at a normalisation site differentiates through ``σ`` instead (the exact Jacobian, the reference
    LFP's choice). Parameter feedback (``γ``, ``β``) follows the same Jacobian.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"normalization"})
    detach: ClassVar[frozenset[str]] = frozenset({"rsqrt", "sqrt"})

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        if call.detached is None:  # pragma: no cover - every engine site call provides it
            raise ValueError("ConstantStd needs a site call that can hold 1/σ constant")
        return call.detached(self.detach)(*operands)
