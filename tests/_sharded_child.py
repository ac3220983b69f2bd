"""Child process of ``tests/test_scale.py``: data-parallel LFP on 8 host (CPU) devices.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharded_child.py``; the flag
must be set before jax is imported, which the parent test process (whose conftest imports jax) cannot do.
Prints one JSON object of measurements on its last line; ``tests/test_scale.py`` asserts on them.

For each model the batch is split over a ``Mesh`` of the 8 devices (``NamedSharding(mesh, P('batch'))``)
and the parameters are replicated (``P()``). ``jax.jit`` of a function of sharded arrays computes the
same global function as on one device, so the feedback ``F = Σ_batch |θ| ⊙ J_θᵀ s`` (a batch sum, i.e.
an all-reduce over the devices) must equal the one-device feedback up to float32 summation order;
BatchNorm in train mode uses the statistics of the *global* batch. Measured quantities:

- ``rel_err``: per leaf ``max|F_8 − F_1| / max|F_1|``, the largest over leaves;
- ``theorem1_err``: per leaf ``max|F_8 − G| / max|G|`` with ``G = −|θ| ⊙ ∇_θ Σ_batch CE`` computed by
  ``jax.grad`` on one device (Theorem 1 of the LFP paper; ReLU networks, ε = 1e-12);
- ``step_err``: the same measure for the parameters after one optax SGD (momentum, clipping) step;
- the device sets of inputs and outputs.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lfp_jax
from lfp_jax import rewards

N_DEVICES = 8
BATCH = 32  # 4 examples per device


class MLP(nn.Module):
    """Dropout-free ReLU MLP."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(24)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(5)(x)


class ConvBN(nn.Module):
    """Conv, BatchNorm (batch statistics), ReLU, max pool, Dense, BatchNorm, ReLU, Dense.

    No bias before a BatchNorm: its gradient is exactly zero (the normalisation removes it), so its
    float32 values would be rounding noise that no relative tolerance can compare.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Dense(12, use_bias=False)(x)))
        return nn.Dense(5)(x)


def _setup(name: str):
    """Model function ``fun(params, x)``, float32 params, data, and whether ``fun`` has aux output."""
    kx, ky, ki, kt, kb = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(kx, (BATCH, 8, 8, 2), jnp.float32)
    y = jax.random.randint(ky, (BATCH,), 0, 5)
    model = MLP() if name == "mlp" else ConvBN()
    variables = model.init(ki, x)
    params = lfp_jax.nn.torch_init(kt, variables["params"])
    if name == "mlp":
        return (lambda p, x: model.apply({"params": p}, x)), params, x, y, False
    # non-trivial BatchNorm scales and offsets (1 and 0 would hide errors in the normalisation rule)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * jax.random.normal(jax.random.fold_in(kb, len(jax.tree_util.keystr(path))),
                                                    a.shape, a.dtype)
        if "BatchNorm" in jax.tree_util.keystr(path) else a, params)
    stats = variables["batch_stats"]

    def fun(p, x):
        return model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

    return fun, params, x, y, True


def _tree_rel(a, b) -> float:
    """Largest over leaves of ``max|a − b| / max|b|`` (float64), the scale floored at 1e-6 of the largest
    ``|b|`` of all leaves."""
    pairs = [(np.asarray(u, np.float64), np.asarray(v, np.float64))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    floor = 1e-6 * max(float(np.max(np.abs(v))) for _, v in pairs)
    return max(float(np.max(np.abs(u - v))) / max(float(np.max(np.abs(v))), floor) for u, v in pairs)


def run(name: str, mesh: Mesh) -> dict:
    fun, params, x, y, has_aux = _setup(name)
    one = jax.devices()[0]
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, y))
    ps = jax.device_put(params, NamedSharding(mesh, P()))
    x1, y1, p1 = jax.device_put((x, y, params), one)

    # ε = 1e-12 so that Theorem 1 can be checked on the same feedback
    lfp = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,), has_aux=has_aux,
                                         allow_frozen=True, composite=lfp_jax.lfp_epsilon(1e-12))
    opt = optax.chain(optax.clip_by_global_norm(3.0), optax.sgd(0.01, momentum=0.9))

    @jax.jit
    def step(p, s, x, y):
        """One LFP training step; returns the new parameters, the model outputs and the feedback."""
        out, fb = lfp(p, x, y)
        updates, s = opt.update(jax.tree.map(jnp.negative, fb), s, p)
        return optax.apply_updates(p, updates), out, fb

    new8, out8, fb8 = step(ps, opt.init(ps), xs, ys)
    new1, out1, fb1 = step(p1, opt.init(p1), x1, y1)
    logits8, logits1 = (out8[0], out1[0]) if has_aux else (out8, out1)

    def ce_sum(p, x, y):
        z = fun(p, x)
        z = z[0] if has_aux else z
        return optax.softmax_cross_entropy_with_integer_labels(z, y).sum()

    grads = jax.jit(jax.grad(ce_sum))(p1, x1, y1)  # one device: the independent reference
    theorem1 = jax.tree.map(lambda p, gr: -jnp.abs(p) * gr, p1, grads)
    res = {
        "input_devices": len(xs.sharding.device_set),
        "input_shard_rows": sorted({s.data.shape[0] for s in xs.addressable_shards}),
        "reference_devices": len(x1.sharding.device_set),
        "feedback_devices": min(len(a.sharding.device_set) for a in jax.tree.leaves(fb8)),
        "feedback_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(fb8)),
        "feedback_dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(fb8)}),
        "leaves": len(jax.tree.leaves(fb8)),
        "rel_err": _tree_rel(fb8, fb1),
        "logits_err": _tree_rel(logits8, logits1),
        "theorem1_err": _tree_rel(fb8, theorem1),
        "theorem1_err_one_device": _tree_rel(fb1, theorem1),
        "step_err": _tree_rel(new8, new1),
        "step_moved": _tree_rel(new1, p1),  # > 0: the step changed the parameters
        "step_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(new8)),
    }
    if has_aux:  # running statistics, from the global batch
        res["batch_stats_err"] = _tree_rel(out8[1], out1[1])
    return res


def main() -> None:
    devices = jax.devices()
    if len(devices) != N_DEVICES:
        sys.exit(f"expected {N_DEVICES} devices, got {len(devices)}: set "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES} before importing jax")
    mesh = Mesh(np.array(devices), ("batch",))
    result = {"devices": len(devices), "x64": bool(jax.config.jax_enable_x64),
              "models": {name: run(name, mesh) for name in ("mlp", "conv_bn")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
