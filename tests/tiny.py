"""Tiny random-weight models of every supported family, for fast unit tests."""

from __future__ import annotations

import torch

from prune.models import LoadedModel
from prune.roles import role_map

VOCAB = 128


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(**common, intermediate_size=96, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "qwen3":
        return tf.Qwen3Config(
            **common, intermediate_size=96, num_key_value_heads=2, head_dim=16, max_position_embeddings=256
        )
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(
            **common,
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=32,
        )
    if arch == "phi":
        return tf.PhiConfig(**common, intermediate_size=96, max_position_embeddings=256)
    if arch == "phi3":
        return tf.Phi3Config(
            **common, intermediate_size=96, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0
        )
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256)
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            ffn_dim=96,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        )
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi", "phi3", "gpt2", "opt"]


def tiny_model(arch: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    return LoadedModel(arch, model, None, role_map(model), torch.device("cpu"), torch.float32, "random")


def random_ids(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
