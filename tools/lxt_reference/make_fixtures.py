"""Generate reference AttnLRP input relevance with LXT 0.6 (PyTorch), the AttnLRP authors' library.

This script is NOT part of lfp_jax and is never imported by it or by the test suite. It needs a
separate virtual environment with CPU PyTorch and LXT; neither is a dependency of lfp_jax. Only the
``.npz`` files it writes are used by the tests (``tests/data/lxt/<case>.npz``).

Recreate the environment and run it (from the repository root)::

    python3.11 -m venv /tmp/vref
    /tmp/vref/bin/pip install torch==2.13.0           # CPU wheel
    /tmp/vref/bin/pip install --no-deps "lxt>=0.6.1,<0.7"
    /tmp/vref/bin/pip install numpy "transformers<5"
    /tmp/vref/bin/python tools/lxt_reference/make_fixtures.py [OUTDIR [CASE ...]]

With case names, only those files are written (the others are still computed, so each case gets
the same weights as in a full run). On another machine the first two cases come out with the same
weights and inputs but may differ in the last bits of ``logits`` and ``relevance`` (seen: 3e-16).

Three small models are written with LXT's explicit-mode functions (``lxt.functional``): relevance is
what travels backwards through autograd, and ``x.grad`` after ``logits.backward(R)`` is the input
relevance. Every function takes an explicit ε (1e-6), so the fixtures do not depend on LXT's
defaults. Float64 throughout, ``torch.manual_seed(0)``, PyTorch's default initialisation.

* ``encoder``: a pre-LN transformer encoder, 2 blocks: LayerNorm (LXT: ``1/σ`` detached, ε rule),
  multi-head self-attention (linear q/k/v/out: ε rule; ``q·kᵀ`` and attention · values:
  ``lf.matmul``, ε rule with the uniform split; scaling by ``1/√d``: identity via ``lf.mul2`` with a
  constant; softmax: ``lf.softmax``, the Taylor rule), residual adds (``lf.add2``, ε rule), a GELU MLP
  (GELU: identity rule), a final LayerNorm, mean pooling over tokens (``lf.mean``, ε rule), a linear
  head.
* ``llama_block``: one LLaMA-style decoder block: RMSNorm (LXT: identity on the whole layer), causal
  self-attention with an additive mask (``finfo.min`` above the diagonal, added with ``lf.add2``), a
  gated SiLU MLP (SiLU: identity; the gate product: ``lf.mul2``, the uniform rule without ε), residual
  adds, a final RMSNorm, the last token's state into a linear head.
* ``token_lm``: a language model on integer token ids (vocabulary 13, 6 tokens, batch 3, own seeds:
  ``torch.manual_seed(0)`` for the weights, ``1`` for the ids). A word-embedding table ``embed``
  (13, 8) is looked up by id and a learned position table ``pos`` (6, 8), indexed by ``arange(6)``,
  is added with ``lf.add2`` (ε rule; the position rows are broadcast over the batch before the add, so
  their relevance is per sample). Then one pre-LN causal block (LayerNorm, the causal attention above,
  a GELU MLP 8 → 16 → 8, residual adds), a final LayerNorm, and a head tied to the embedding table:
  ``logits = h · embedᵀ`` (``lf.linear_epsilon`` with the table as weight, no bias; LXT hands the
  table no relevance there), logits (3, 6, 13). Output relevance: zero except the logit of token
  ``k[b]`` at position ``t[b]`` (``t = [5, 3, 4]``, ``k`` the highest logit there; with the tied head
  that is the token at ``t`` itself in all three samples). The token relevance is read where LXT's
  ``inputs_embeds`` convention reads it: at the output of the lookup, before the position embeddings
  are added (``retain_grad`` on the looked-up rows).

Written for ``encoder`` and ``llama_block``: ``x`` (batch, tokens, features), ``y`` labels, ``logits``,
``relevance`` (input relevance for the output relevance ``one_hot(y) ⊙ logits``). Written for
``token_lm``: ``ids`` (int32, batch × tokens), ``t``, ``k``, ``logits``, ``relevance_embedding``
(batch, tokens, features: at the lookup's output), ``relevance_tokens`` (its sum over features),
``relevance_position`` (batch, tokens, features: at the position rows, per sample). Every case also has
``param/<name>`` (torch layout: linear weights are ``(out, in)``; the tables are ``(rows, features)``),
``epsilon``, ``case``, ``lxt_version``, ``torch_version``.
"""

from __future__ import annotations

import importlib.metadata as md
import math
import os
import sys

import lxt.functional as lf  # noqa: E402
import lxt.rules as lr  # noqa: E402
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
DTYPE = torch.float64
BATCH, TOKENS, FEATURES, HEADS, CLASSES = 3, 5, 8, 2, 4
VOCAB, LM_TOKENS, LM_TARGET_POSITIONS = 13, 6, (5, 3, 4)


class Linear(nn.Linear):
    def forward(self, x):
        return lf.linear_epsilon(x, self.weight, self.bias, epsilon=EPS)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return lf.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features) + 0.1 * torch.randn(features))
        self.eps = eps

    def forward(self, x):
        return lf.rms_norm_identity(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.q, self.k, self.v, self.o = (Linear(FEATURES, FEATURES) for _ in range(4))
        self.causal = causal

    def forward(self, x):
        b, t, d = x.shape
        dh = d // HEADS

        def heads(h):
            return h.view(b, t, HEADS, dh).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=EPS), 1 / math.sqrt(dh))
        if self.causal:
            mask = torch.triu(torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype), diagonal=1)
            scores = lf.add2(scores, mask, epsilon=EPS)
        attn = lf.softmax(scores, -1)
        out = lf.matmul(attn, v, epsilon=EPS).transpose(1, 2).reshape(b, t, d)
        return self.o(out)


class EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn = LayerNorm(FEATURES), Attention(causal=False)
        self.ln2, self.fc1, self.fc2 = LayerNorm(FEATURES), Linear(FEATURES, 16), Linear(16, FEATURES)

    def forward(self, x):
        x = lf.add2(x, self.attn(self.ln1(x)), epsilon=EPS)
        h = lr.identity(F.gelu, self.fc1(self.ln2(x)))
        return lf.add2(x, self.fc2(h), epsilon=EPS)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([EncoderBlock(), EncoderBlock()])
        self.ln, self.head = LayerNorm(FEATURES), Linear(FEATURES, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(lf.mean(self.ln(x), 1, False, epsilon=EPS))


class LlamaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = RMSNorm(FEATURES), Attention(causal=True)
        self.norm2 = RMSNorm(FEATURES)
        self.gate, self.up, self.down = (Linear(FEATURES, 16, bias=False), Linear(FEATURES, 16, bias=False),
                                         Linear(16, FEATURES, bias=False))
        self.norm, self.head = RMSNorm(FEATURES), Linear(FEATURES, CLASSES)

    def forward(self, x):
        x = lf.add2(x, self.attn(self.norm1(x)), epsilon=EPS)
        h = self.norm2(x)
        h = self.down(lf.mul2(lr.identity(F.silu, self.gate(h)), self.up(h)))
        x = lf.add2(x, h, epsilon=EPS)
        return self.head(self.norm(x)[:, -1])


class TokenLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(VOCAB, FEATURES) * 0.5)
        self.pos = nn.Parameter(torch.randn(LM_TOKENS, FEATURES) * 0.1)
        self.ln1, self.attn = LayerNorm(FEATURES), Attention(causal=True)
        self.ln2, self.fc1, self.fc2 = LayerNorm(FEATURES), Linear(FEATURES, 16), Linear(16, FEATURES)
        self.ln = LayerNorm(FEATURES)

    def forward(self, ids):
        """Logits, and the two tensors whose ``.grad`` is read: the looked-up word rows and the
        position rows (broadcast over the batch, so their relevance is per sample)."""
        b, t = ids.shape
        words = self.embed[ids]
        words.retain_grad()
        positions = self.pos[torch.arange(t)].expand(b, t, FEATURES)
        positions.retain_grad()
        x = lf.add2(words, positions, epsilon=EPS)
        x = lf.add2(x, self.attn(self.ln1(x)), epsilon=EPS)
        h = lr.identity(F.gelu, self.fc1(self.ln2(x)))
        x = lf.add2(x, self.fc2(h), epsilon=EPS)
        return lf.linear_epsilon(self.ln(x), self.embed, None, epsilon=EPS), words, positions


def _token_lm_case() -> dict:
    torch.manual_seed(0)
    model = TokenLM().to(DTYPE)
    torch.manual_seed(1)
    ids = torch.randint(VOCAB, (BATCH, LM_TOKENS))
    logits, words, positions = model(ids)
    rows = torch.arange(BATCH)
    t = torch.tensor(LM_TARGET_POSITIONS)
    k = logits[rows, t].argmax(-1)
    relevance_out = torch.zeros_like(logits)
    relevance_out[rows, t, k] = logits.detach()[rows, t, k]
    logits.backward(relevance_out.detach())
    out = {"ids": ids.numpy().astype(np.int32), "t": t.numpy(), "k": k.numpy(),
           "logits": logits.detach().numpy(), "relevance_embedding": words.grad.numpy(),
           "relevance_tokens": words.grad.sum(-1).numpy(), "relevance_position": positions.grad.numpy(),
           "epsilon": EPS, "case": "token_lm", "lxt_version": md.version("lxt"),
           "torch_version": torch.__version__}
    for key, value in model.state_dict().items():
        out[f"param/{key}"] = value.numpy()
    return out


def _case(name: str, model: nn.Module) -> dict:
    torch.manual_seed(1)
    x = torch.randn(BATCH, TOKENS, FEATURES, dtype=DTYPE, requires_grad=True)
    y = torch.tensor([0, 2, 3])
    logits = model(x)
    relevance_out = F.one_hot(y, CLASSES).to(DTYPE) * logits
    logits.backward(relevance_out.detach())
    out = {"x": x.detach().numpy(), "y": y.numpy(), "logits": logits.detach().numpy(),
           "relevance": x.grad.numpy(), "epsilon": EPS, "case": name,
           "lxt_version": md.version("lxt"), "torch_version": torch.__version__}
    for key, value in model.state_dict().items():
        out[f"param/{key}"] = value.numpy()
    return out


def main(outdir: str, cases: list[str]) -> None:
    os.makedirs(outdir, exist_ok=True)
    data = {}
    torch.manual_seed(0)   # encoder and llama_block share one stream: the second depends on the first
    for name, cls in (("encoder", Encoder), ("llama_block", LlamaBlock)):
        data[name] = _case(name, cls().to(DTYPE))
    data["token_lm"] = _token_lm_case()
    unknown = set(cases) - set(data)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {sorted(data)}")
    for name in cases or data:
        np.savez(os.path.join(outdir, f"{name}.npz"), **data[name])
        d = data[name]
        if name == "token_lm":
            rows = np.arange(BATCH)
            print(f"{name}: token relevance sum {d['relevance_tokens'].sum(1)}, position relevance sum "
                  f"{d['relevance_position'].sum(axis=(1, 2))}, "
                  f"target logits {d['logits'][rows, d['t'], d['k']]}")
        else:
            print(f"{name}: relevance sum {d['relevance'].sum(axis=(1, 2))}, "
                  f"target logits {d['logits'][np.arange(BATCH), d['y']]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/lxt", sys.argv[2:])
