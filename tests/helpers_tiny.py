"""Tiny random checkpoints for tests: Hugging Face models saved with transformers' own classes, and
llama-architecture GGUF files written with gguf's writer.

Sizes are multiples of 32 so that every 2-D weight can be block-quantized (Q4_0/Q4_1/Q8_0 blocks of 32).
Layer norms and biases get random values, because their defaults (ones, zeros) would hide a
converter that drops, swaps or mis-shapes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, PretrainedConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "opt", "opt350m")

VOCAB = 128
_LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_OPT_SIZES = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def tiny_hf_config(family: str) -> PretrainedConfig:
    """A tiny transformers config of `family` (one of FAMILIES)."""
    if family == "llama":
        return LlamaConfig(**_LLAMA_SIZES, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "llama3":
        # Llama 3.x: llama3 rope scaling (short original context so the scaling changes frequencies here),
        # several eos ids, tied embeddings as in Llama-3.2-1B.
        sizes = {**_LLAMA_SIZES, "eos_token_id": [2, 3]}
        return LlamaConfig(**sizes, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "mistral":
        return MistralConfig(**_LLAMA_SIZES, sliding_window=32, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 10000.0})
    if family == "qwen2":
        return Qwen2Config(**_LLAMA_SIZES, use_sliding_window=False, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 1e6})
    if family == "opt":
        return OPTConfig(**_OPT_SIZES, word_embed_proj_dim=64, do_layer_norm_before=True)
    if family == "opt350m":
        return OPTConfig(**_OPT_SIZES, word_embed_proj_dim=32, do_layer_norm_before=False)
    raise ValueError(f"unknown tiny family {family!r} (known: {FAMILIES})")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The transformers model of `tiny_hf_config(family)`, float32, seeded, with random norms and biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # exactly the norm scales/biases and the linear biases
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn_like(param))
    return model.eval()


def save_tiny_model(family: str, directory: str | Path, seed: int = 0, shards: bool = False) -> Path:
    """Save `tiny_model(family, seed)` with save_pretrained (safetensors) to `directory` and return it.

    `shards=True` uses a small max_shard_size so that several shard files and an index.json are written.
    """
    directory = Path(directory)
    tiny_model(family, seed).save_pretrained(directory, max_shard_size="40KB" if shards else "1GB")
    return directory


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """A GPT-2 style byte-level vocabulary of VOCAB tokens: specials, printable ASCII bytes and a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    singles = [spelled[b] for b in range(32, 127)]  # 95 tokens, "Ġ" (space) included
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("Ġ", "a"),
              ("r", "e"), ("a", "t"), ("e", "n"), ("o", "r"), ("Ġ", "s"), ("Ġ", "w"), ("i", "s"), ("Ġ", "o"),
              ("e", "s"), ("Ġ", "b"), ("l", "l"), ("Ġ", "c"), ("i", "t"), ("Ġ", "h"), ("Ġ", "m"), ("Ġ", "f"),
              ("o", "u"), ("Ġ", "p"), ("e", "d"), ("Ġ", "i"), ("n", "d")]
    tokens = specials + singles + ["".join(m) for m in merges]
    assert len(tokens) == VOCAB, len(tokens)
    return tokens, [" ".join(m) for m in merges]


# A chat template in SmolLM2's form, with the bos/eos tokens both tiny vocabularies have ("<s>", "</s>").
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A llama (sentencepiece BPE) vocabulary of VOCAB tokens as llama.cpp writes it: tokens, scores, token types.

    unk/bos/eos first, byte-fallback tokens for the control bytes (tab and newline among them), "▁" and single
    characters, then pieces that merge two of those; a higher score merges first, as in sentencepiece.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(16)]
    singles = ["\u2581", *"abcdefghijklmnopqrstuvwxyz", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", *"0123456789", *".,!?'"]
    pieces = ["\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "on", "re", "at", "en", "or", "is", "\u2581s",
              "\u2581w", "es", "\u2581b", "ll", "\u2581c", "it", "\u2581h", "\u2581m", "\u2581f", "ou", "\u2581p",
              "ed", "\u2581i", "nd", "\u2581o", "an", "\u2581in", "\u2581is", "\u2581an", "ing", "\u2581and",
              "\u2581of", "\u2581to", "ar", "le", "al", "ro", "st"]
    tokens = specials + byte_tokens + singles + pieces
    assert len(tokens) == VOCAB, len(tokens)
    scores = [0.0] * (len(specials) + len(byte_tokens)) + [-1000.0 - i for i in range(len(singles))] \
        + [-float(i) for i in range(len(pieces))]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * len(byte_tokens) \
        + [gguf.TokenType.NORMAL] * (len(singles) + len(pieces))
    return tokens, scores, [int(t) for t in types]


def save_tiny_checkpoint(family: str, directory: str | Path, seed: int = 0) -> Path:
    """`save_tiny_model` and `save_tiny_tokenizer` into `directory`: a checkpoint hdex_jax compiles and generates
    text with; returns the directory."""
    save_tiny_tokenizer(save_tiny_model(family, directory, seed=seed))
    return Path(directory)


def save_tiny_tokenizer(directory: str | Path) -> Path:
    """Save a tiny byte-level BPE tokenizer (VOCAB tokens, ids 1/2/3 = bos/eos/pad) to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = _byte_level_vocab()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    return Path(directory)


def llamacpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert-script permutation of q/k rows (rotate-half -> adjacent pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name llama.cpp gives an HF llama tensor."""
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{suffix}"


def _ggml_type(name: gguf.GGMLQuantizationType | str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name] if isinstance(name, str) else name


def _encode(value: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`value` as GGUF stores it in `qtype`. A type gguf cannot quantize is written as zero bytes, so that
    tests can make files with types a reader has to refuse."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return value.astype(np.float32)
    try:
        return gguf.quants.quantize(value, qtype)
    except NotImplementedError:
        return np.zeros(gguf.quants.quant_shape_to_byte_shape(value.shape, qtype), np.uint8)


def write_tiny_gguf(path: str | Path, tensor_type: gguf.GGMLQuantizationType | str = "F32", seed: int = 0, *,
                    tied: bool = False, architecture: str = "llama",
                    tensor_types: Mapping[str, gguf.GGMLQuantizationType | str] | None = None,
                    extra_tensors: Mapping[str, np.ndarray] | None = None,
                    rope_scaling: tuple[str, float] | None = None, tokenizer_model: str = "gpt2",
                    chat_template: str | None = None) -> dict[str, np.ndarray]:
    """Write a tiny random llama (the "llama" tiny config) as a GGUF file, the way llama.cpp does.

    2-D weights are stored as `tensor_type` (F32, F16, BF16 or a type gguf can quantize, e.g. Q8_0, Q4_0,
    Q4_1); norms stay F32 as in llama.cpp files. q/k rows are permuted as llama.cpp's convert script does.
    `tied` leaves out output.weight. For error tests: `tensor_types` overrides the type of single tensors
    (by GGUF name), `extra_tensors` adds F32 tensors, `rope_scaling` = (type, factor) adds rope scaling
    metadata, `architecture` changes general.architecture and the metadata prefix.
    The tokenizer is `tokenizer_model` "gpt2" (byte-level BPE with merges; ids 1/2/3 = bos/eos/pad, ids 0-3
    control tokens) or "llama" (sentencepiece with scores and byte tokens; ids 0/1/2 = unk/bos/eos), with
    `chat_template` if given.
    Returns the float32 weights it was written from, by HF name, in HF layout (unpermuted, unquantized).
    """
    qtype = _ggml_type(tensor_type)
    hf = tiny_hf_config("llama")
    weights = {name: t.detach().numpy().copy() for name, t in tiny_model("llama", seed).state_dict().items()}
    if tied:
        del weights["lm_head.weight"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-random")  # not "mistral": transformers would then read it as a mistral model
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(hf.num_attention_heads)
    writer.add_head_count_kv(hf.num_key_value_heads)
    writer.add_rope_dimension_count(hf.head_dim)
    writer.add_rope_freq_base(hf.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_tokenizer_model(tokenizer_model)
    if tokenizer_model == "gpt2":
        tokens, merges = _byte_level_vocab()
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(tokens) - 4))
        writer.add_token_merges(merges)
        writer.add_pad_token_id(3)
    elif tokenizer_model == "llama":
        tokens, scores, types = _sentencepiece_vocab()
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        raise ValueError(f"unknown tiny tokenizer model {tokenizer_model!r} (known: gpt2, llama)")
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        writer.add_rope_scaling_factor(rope_scaling[1])
    for name, value in weights.items():
        if name.endswith("q_proj.weight"):
            value = llamacpp_permute(value, hf.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = llamacpp_permute(value, hf.num_key_value_heads)
        name = gguf_name(name)
        ttype = _ggml_type((tensor_types or {}).get(name, qtype if value.ndim == 2 else "F32"))
        writer.add_tensor(name, _encode(value, ttype), raw_dtype=ttype)
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
