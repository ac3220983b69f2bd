"""The spiking rule: LFP for a LIF neuron step (see :mod:`lfp_jax.nn.spiking`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lfp_jax.rules._base import ABSOLUTE, Array, Rule, SiteCall, stabilize


@dataclasses.dataclass(frozen=True)
class SpikingEpsilon(Rule):
    r"""LFP for a LIF neuron step (the reference's spiking rule); see :mod:`lfp_jax.nn.spiking`.

    At one time step, with current ``I_t`` (from the parameterised layer before the neuron), membrane
    ``u_t`` before and ``u_{t+1}`` after the step, and the reset ``ρ_t = H(u_t - ϑ)``:

    .. math::

        R &= R_{\text{spikes}} + R_{u_{t+1}} \quad\text{(reward on the spikes, plus the reward that
             step } t+1 \text{ handed back to this membrane)}\\
        s &= R \,/\, \mathrm{stab}\big(|u_t| + |u_{t+1} + ρ_t ϑ - u_t|\big),\qquad
        R_{u_t} = u_t ⊙ β s,\qquad c_{I_t} = s .

    The spike's Heaviside is bypassed (reward on a spike counts as reward on the membrane) and the reset
    is not differentiated. ``c_{I_t} = s`` goes on into the layer that produced the current, whose own
    VJP then gives the feedback ``|θ| ⊙ J_θᵀ s`` and the input reward ``x ⊙ J_xᵀ s``: the ε of that
    layer is replaced by this membrane-based normaliser. Over a ``lax.scan`` in time, feedback of the
    same parameters adds up over steps (and over the batch).

    With ``normalizer="epsilon"`` the neuron step is treated as a plain LFP-ε block instead (for
    comparison): ``s = R / (u_{t+1} + ε·sign(u_{t+1}))``, the ε rule of ``u_{t+1} = β u_t + I_t − ρ_t ϑ``
    with the reset as a constant bias.

    Args:
      epsilon: the stabiliser of the denominator (``"membrane"``: the denominator is ``>= 0`` and
        ``stab(d) = d + ε``).
      normalizer: ``"membrane"`` (the reference) or ``"epsilon"``.
    """

    epsilon: float = 1e-6
    normalizer: str = "membrane"
    kinds: ClassVar[frozenset[str]] = frozenset({"spiking"})

    def __post_init__(self):
        super().__post_init__()
        if self.normalizer not in ("membrane", "epsilon"):
            raise ValueError(f"SpikingEpsilon: normalizer must be 'membrane' or 'epsilon', got "
                             f"{self.normalizer!r}")

    @property
    def output_epsilon(self):
        return ABSOLUTE

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        site = call.site
        if site.operand_positions is None or sorted(site.operand_positions) != [0, 1]:
            raise ValueError(f"SpikingEpsilon needs a lif_step site with a current and a membrane operand, "
                             f"got the {site.kind!r} site ({site.label}) at {site.source_line}")
        params = site.params[0]
        beta, threshold = params["beta"], params["threshold"]
        i_cur, i_mem = site.operand_positions.index(0), site.operand_positions.index(1)
        outs_at = {p: k for k, p in enumerate(site.output_positions)}  # primitive output -> output
        eps, membrane_form = self.epsilon, self.normalizer == "membrane"
        normalized = site.normalized_output  # the engine left converting c to R = spikes ⊙ c to us

        def _in_order(current, membrane):
            ops = [None, None]
            ops[i_cur], ops[i_mem] = current, membrane
            return ops

        @jax.custom_vjp
        def step(*ops):
            return tuple(call.fn(*ops))

        def fwd(*ops):
            # keep the membrane and the current (a constant current, as in direct encoding, is then
            # one array for all steps) and recompute the new membrane in the backward pass
            return tuple(call.fn(*ops)), (ops[i_mem], ops[i_cur])

        def bwd(res, cts):
            membrane, current = res
            reset = (membrane > threshold).astype(current.dtype) * threshold
            new = beta * membrane + current - reset
            reward = jnp.zeros_like(new)
            if 0 in outs_at:  # reward on the spikes: absolute (ABSOLUTE), or c with R = spikes ⊙ c
                ct = cts[outs_at[0]]
                if normalized:  # the spikes again, by the same primitive as in the forward pass
                    ct = ct * call.fn(*_in_order(current, membrane))[0]
                reward = reward + ct
            if 1 in outs_at:
                reward = reward + new * cts[outs_at[1]]  # handed back from step t+1 (normalised)
            if membrane_form:
                s = reward / (jnp.abs(membrane) + jnp.abs(new + reset - membrane) + eps)
            else:
                s = reward / stabilize(new, eps)
            grads: list = [None, None]
            grads[i_cur] = s
            grads[i_mem] = (beta * s).astype(membrane.dtype)
            return tuple(grads)

        step.defvjp(fwd, bwd)
        return step(*operands)
