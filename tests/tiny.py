"""Tiny random-weight models of every supported family, for fast unit tests."""

from __future__ import annotations

import torch

from prune.roles import role_map
from runtime.models import LoadedModel

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
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],  # both kinds
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
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common, intermediate_size=96, max_position_embeddings=256)
    if arch.startswith("falcon"):  # falcon: multi_query (the default); -new: grouped; -classic
        extra = {"falcon_new": dict(new_decoder_architecture=True, num_kv_heads=2)}.get(arch, {})
        if arch == "falcon_classic":
            extra = dict(multi_query=False)
        return tf.FalconConfig(**common, max_position_embeddings=256, **extra)
    moe = dict(intermediate_size=96, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, **moe, num_local_experts=4, num_experts_per_tok=2)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, **moe, num_experts=4, num_experts_per_tok=2)
    if arch in ("qwen2_moe", "qwen3_moe"):
        cls = {"qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig}[arch]
        extra = {"shared_expert_intermediate_size": 80} if arch == "qwen2_moe" else {"head_dim": 16}
        return cls(
            **common,
            **moe,
            moe_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],  # a dense MLP between expert layers, as some Qwen MoE checkpoints
            **extra,
        )
    if arch == "llama_named":  # a model_type the table does not know, with Llama's module names
        config = tf.LlamaConfig(
            **common, intermediate_size=96, num_key_value_heads=2, max_position_embeddings=256
        )
        config.model_type = "llama_named"
        return config
    raise ValueError(arch)


ARCHS = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "opt",
    "gpt_neox",
    "falcon",
    "falcon_new",
    "falcon_classic",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
NO_GATE = ("phi", "gpt2", "opt", "gpt_neox", "falcon", "falcon_new", "falcon_classic")


def tiny_model(arch: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    return LoadedModel(arch, model, None, role_map(model), torch.device("cpu"), torch.float32, "random")


def streamed_tiny(arch: str, folder, store: str) -> tuple[LoadedModel, LoadedModel]:
    """A tiny random model, and the same saved as safetensors in ``folder``, loaded back with its
    decoder layers streamed from ``store`` ("cpu" or "disk")."""
    from runtime.models import _load_streamed

    tiny = tiny_model(arch)
    tiny.model.save_pretrained(folder, safe_serialization=True)
    kwargs = dict(revision=None, trust_remote_code=False)
    cpu = torch.device("cpu")
    model, stream = _load_streamed(str(folder), torch.float32, cpu, store, "cpu", kwargs, True)
    model.config.use_cache = False
    return tiny, LoadedModel(arch, model, None, stream.roles, cpu, torch.float32, "x", stream)


def random_ids(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def save_tiny_chat_model(folder, seed: int = 0):
    """A random-weight 2-layer Llama with SmolLM2's tokenizer, saved as a local model folder: a
    second model the app loads in about a second (tests of per-session model choice)."""
    from pathlib import Path

    import transformers as tf

    from runtime.models import DEFAULT_MODEL, OFFLINE_MODELS, _converted_dir

    tokenizer_source = _converted_dir(OFFLINE_MODELS[DEFAULT_MODEL], lambda message: None)
    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def word_tokenizer():
    """A word-level tokenizer for the tiny models: ``w0 .. w{VOCAB-1}`` split on spaces (no
    download, no SmolLM2 needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1", pad_token="w1")
