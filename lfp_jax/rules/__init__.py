r"""Feedback rules: how reward crosses one site of a model.

The engine carries the *normalised reward* ``c`` backwards instead of the reward ``R`` itself, with
``R = value ⊙ c`` at every value. In this form the LFP-ε rule of a layer ``y = f(x; θ)``,

.. math::

    s = \frac{R_y}{y + \varepsilon\,\mathrm{sign}(y)}, \qquad
    R_x = x \odot J_x^\top s, \qquad F_\theta = |\theta| \odot J_\theta^\top s,

is exactly the ordinary vector-Jacobian product ``c_x = J_xᵀ c_y`` plus a factor ``y / stab(y)`` at the
block output, so most sites run at the cost of a gradient. Every rule is a small frozen dataclass
(hashable, hence static under ``jax.jit``). A rule is called with a :class:`SiteCall` and the site's
operands and returns the site's outputs; rules that change the backward pass wrap the site in a
``jax.custom_vjp`` whose backward works in the ``c`` form above: it receives the cotangent ``c_y`` of the
site output and returns ``c`` for every operand (``None`` for operands that carry no reward).

Rules and where they apply (site kinds are listed in :mod:`lfp_jax.sites`):

.. list-table::
   :header-rows: 1
   :widths: 22 22 56

   * - rule
     - site kinds
     - backward
   * - :class:`Epsilon`
     - linear, sum, pool, normalization
     - ε rule (the LFP default); exact Jacobian of the block, ``y/stab(y)`` at its output
   * - :class:`Identity`
     - activation
     - ``R_x = R_y``:  ``c_x = c_y · φ(x) / stab(x)``
   * - :class:`Gradient`
     - any
     - the plain VJP (explicit opt-in, never a default)
   * - :class:`WinnerTakeAll`
     - max_pool, max
     - reward to the arg-max / the larger operand
   * - :class:`Dropout`
     - dropout
     - the reference's VJP on ``R`` (rescales by 1/(1-p)), or the conservative ``R_x = mask ⊙ R_y``
   * - :class:`SpikingEpsilon`
     - spiking (LIF step)
     - membrane-based normaliser, reward handed to the previous membrane, Heaviside bypassed
   * - :class:`SoftmaxTaylor`
     - softmax
     - AttnLRP's first-order Taylor rule at the raw scores: ``c_x = y ⊙ (c_y − Σ y ⊙ c_y)``
   * - :class:`UniformProduct`
     - bilinear
     - AttnLRP's uniform rule: each of the ``n`` input-dependent factors gets ``1/n`` of the reward
   * - :class:`ConstantStd`
     - normalization
     - LayerNorm / RMSNorm with ``1/σ`` held constant (AttnLRP)
   * - :class:`Embedding`
     - embedding
     - where reward enters a model of token ids: ``F_E = |E| ⊙`` the rows' summed ``c``; the
       relevance of a token is ``Σ_d e ⊙ c`` at its lookup
   * - :class:`LinearRule`, :class:`ZPlus`, :class:`Gamma`, :class:`AlphaBeta`, :class:`Flat`,
       :class:`WSquare`, :class:`ZBox`
     - linear
     - classic LRP rules as zennit 0.5 defines them, on the whole layer (bias and eval-mode BatchNorm
       merged in) as *groups* of a modified forward pass; they receive ``R`` at their output and hand
       ``R`` to their input (:mod:`lfp_jax.rules.lrp`)
"""

from lfp_jax.rules._base import ABSOLUTE, Rule, SiteCall, safe_divide, stabilize, with_backward
from lfp_jax.rules.attention import ConstantStd, SoftmaxTaylor, UniformProduct
from lfp_jax.rules.core import Dropout, Epsilon, Gradient, Identity, WinnerTakeAll
from lfp_jax.rules.embedding import Embedding
from lfp_jax.rules.lrp import AlphaBeta, Flat, Gamma, LinearRule, WSquare, ZBox, ZPlus
from lfp_jax.rules.spiking import SpikingEpsilon

__all__ = [
    "ABSOLUTE", "AlphaBeta", "ConstantStd", "Dropout", "Embedding", "Epsilon", "Flat", "Gamma", "Gradient",
    "Identity", "LinearRule", "Rule", "SiteCall", "SoftmaxTaylor", "SpikingEpsilon", "UniformProduct",
    "WSquare", "WinnerTakeAll", "ZBox", "ZPlus",
    "safe_divide", "stabilize", "with_backward",
]
