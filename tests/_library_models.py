"""Language models from third-party JAX libraries, used as published (no edits, no patches), in small
random configurations: each builder returns ``(fun, params, ids)`` with ``fun(params, ids) -> logits``
of shape ``(batch, tokens, vocabulary)``. Used by tests/_library_child.py (the slow suite).

Libraries (install with ``pip install -e ".[models]"``): transformers 4.x (its Flax GPT-2, Llama and
BERT; transformers 5 dropped Flax), penzai 0.2.5 (its llamalike Llama and Gemma), gemma 3.3.0
(``gm.nn.Transformer``, Gemma 3; Python 3.11, it pulls TensorFlow). Importing ``gemma`` changes
``flax.linen.Module.param`` for every model in the process (Hugging Face's Llama then fails to
initialise), so every model runs in a process of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

VOCAB, WIDTH, LAYERS, HEADS, BATCH, TOKENS = 96, 32, 2, 4, 2, 8


def token_ids(seed: int = 0):
    """Token ids in [1, VOCAB): 0 is gemma's padding id."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(1, VOCAB, size=(BATCH, TOKENS)), dtype=jnp.int32)


def hf_gpt2():
    """``FlaxGPT2LMHeadModel``: learned positions, LayerNorm, GELU, a head tied to ``wte``."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS)
    model = FlaxGPT2LMHeadModel(config, seed=0, dtype=jnp.float32)
    return (lambda p, ids: model(ids, params=p, train=False).logits), model.params, token_ids()


def hf_llama():
    """``FlaxLlamaForCausalLM``: RoPE, RMSNorm, SwiGLU, grouped-query attention, an untied head."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = FlaxLlamaForCausalLM(config, seed=0, dtype=jnp.float32)
    return (lambda p, ids: model(ids, params=p, train=False).logits), model.params, token_ids()


def hf_bert():
    """``FlaxBertForMaskedLM``: word, position and token-type embeddings, the decoder tied to the words."""
    from transformers import BertConfig, FlaxBertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=2 * WIDTH, max_position_embeddings=64)
    model = FlaxBertForMaskedLM(config, seed=0, dtype=jnp.float32)
    return (lambda p, ids: model(ids, params=p, train=False).logits), model.params, token_ids()


def _penzai(variant: str, layer_stack: bool = False):
    from penzai import pz
    from penzai.models.transformer.variants import llamalike_common as llamalike

    config = llamalike.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=2, embedding_dim=WIDTH, projection_dim=WIDTH // 4,
        mlp_hidden_dim=2 * WIDTH, num_decoder_blocks=LAYERS, vocab_size=VOCAB,
        parameter_dtype=jnp.float32, activation_dtype=jnp.float32, use_layer_stack=layer_stack,
        mlp_variant="swiglu" if variant == "llama" else "geglu_approx",
        tie_embedder_and_logits=variant == "gemma")
    model = llamalike.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    unbound, frozen = pz.unbind_params(model, freeze=True)
    slots = {p.label: p for p in frozen}
    params = {p.label: p.value.data_array for p in frozen}   # named by penzai's labels

    def fun(p, ids):
        values = [dataclasses.replace(slot, value=dataclasses.replace(slot.value, data_array=p[label]))
                  for label, slot in slots.items()]
        bound = pz.bind_variables(unbound, values, unfreeze_as_copy=True)
        return bound(pz.nx.wrap(ids).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")

    return fun, params, token_ids()


def penzai_llama():
    """penzai's llamalike Llama (SwiGLU, untied head)."""
    return _penzai("llama")


def penzai_gemma_stacked():
    """penzai's llamalike Gemma (GeGLU, tied head, √d scaling) with its blocks in a layer stack (a
    ``scan`` over stacked parameters)."""
    return _penzai("gemma", layer_stack=True)


def gm_gemma3():
    """``gemma.gm.nn.Transformer``, Gemma 3: query/key norms, sliding and global attention, RMSNorms
    computing ``x · (1 + scale)`` with the scales initialised to 0, a head tied to the embedder."""
    from gemma import gm
    from gemma.gm.nn import _modules

    kinds = _modules.AttentionType
    config = gm.nn.config.TransformerConfig(
        num_embed=VOCAB, embed_dim=WIDTH, hidden_dim=2 * WIDTH, num_heads=HEADS, head_dim=8,
        num_kv_heads=2, final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        use_qk_norm=True, sliding_window_size=4, transpose_gating_einsum=True,
        attention_types=gm.nn.config.make_attention_layers_types((kinds.LOCAL_SLIDING, kinds.GLOBAL),
                                                                 num_layers=LAYERS),
        local_base_frequency=10_000, global_base_frequency=1_000_000)
    model = gm.nn.Transformer(config=config, dtype=jnp.float32)   # the default parameters are bfloat16
    ids = token_ids()
    params = model.init(jax.random.key(0), ids)["params"]
    return (lambda p, ids: model.apply({"params": p}, ids).logits), params, ids


BUILDERS = {"hf_gpt2": hf_gpt2, "hf_llama": hf_llama, "hf_bert": hf_bert, "penzai_llama": penzai_llama,
            "penzai_gemma_stacked": penzai_gemma_stacked, "gm_gemma3": gm_gemma3}
LIBRARY = {"hf_gpt2": "transformers", "hf_llama": "transformers", "hf_bert": "transformers",
           "penzai_llama": "penzai", "penzai_gemma_stacked": "penzai", "gm_gemma3": "gemma"}
