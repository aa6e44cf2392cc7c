"""Transformers configs of the three families, from a `ZooSpec`.

* ``llama``: `LlamaForCausalLM`: RMSNorm, RoPE, grouped-query attention without bias,
  gated SiLU FFN (``gate_proj``/``up_proj``/``down_proj``), untied output head.
* ``qwen2``: `Qwen2ForCausalLM`: as llama but with a bias on ``q/k/v_proj`` and tied
  input/output embeddings (like the small Qwen2 checkpoints).
* ``gpt2``: `GPT2LMHeadModel`: LayerNorm, learned positions, fused ``c_attn`` Conv1D
  (weights stored ``(in, out)``), non-gated GELU FFN ``c_fc``/``c_proj``, tied head.
"""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from .spec import ZooSpec


def make_config(spec: ZooSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The model config of ``spec`` with the special-token ids of ``tokenizer``.

    Raises:
        ValueError: The tokenizer has more tokens than ``spec.vocab`` embedding rows.
    """
    if len(tokenizer) > spec.vocab:
        raise ValueError(
            f"tokenizer of {spec.name} has {len(tokenizer)} tokens but the spec has vocab={spec.vocab} rows; "
            "raise ZooSpec.vocab to at least the tokenizer length"
        )
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.family == "gpt2":
        return GPT2Config(
            vocab_size=spec.vocab,
            n_positions=spec.seq_len,
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.intermediate,
            # No dropout: tiny models on a small corpus underfit before they overfit.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.seq_len,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **ids,
    )
    if spec.family == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if spec.family == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    raise ValueError(f"unknown family {spec.family!r}; expected one of 'llama', 'qwen2', 'gpt2'")


def make_model(spec: ZooSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of ``spec`` (seed the RNG first for determinism)."""
    config = make_config(spec, tokenizer)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
