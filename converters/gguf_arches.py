"""What each GGUF architecture is, declared once: fixed ModelConfig fields, fields read from the file, and the key
map from llama.cpp's tensor names to canonical params.

The facts come from the writer and the two readers of these files: llama.cpp's `convert_hf_to_gguf.py` (which
Hugging Face tensors become which GGUF tensors, in which layout), the `gguf` package (`MODEL_TENSORS` lists the
tensor names each architecture may have) and transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`, how
it turns them back into Hugging Face weights). Dequantized GGUF tensors are in torch's `[out, in]` layout, so
the usual transforms of converters/keymap.py apply. Layout facts an architecture's rules rely on:

- llama: the convert script permutes q/k rows for llama.cpp's adjacent-pair rope; undone here (`unpermute`). The
  other rope architectures use llama.cpp's "neox" rope, which is the canonical rotate-half: no permutation.
- gemma, gemma2: the convert script stores RMSNorm weights plus one (Gemma computes `x * (1 + w)`), which is
  the canonical `x * scale` already, so they are kept (transformers' gemma2 loader subtracts 1 to get HF
  weights back; it does not read gemma files at all). Neither writes an LM head: the embedding is tied.
- gpt2: Conv1D weights are transposed by the convert script, so `attn_qkv` is `[3D, D]`, q/k/v stacked on rows.
- falcon: the convert script reorders `query_key_value` from per-KV-group `[q.., k, v]` to all q rows, then all
  k, then all v ("jploski" layout). With two norms per layer (Falcon-40B), `ln_attn` becomes `attn_norm_2` and
  `ln_mlp` becomes `attn_norm`: llama.cpp's attention reads `attn_norm_2`, its MLP `attn_norm`.
- phi3: `attn_qkv` is q, k, v stacked on rows; `ffn_up` is Phi-3's `gate_up_proj`, gate rows first.
- gemma3: norms plus one like gemma2's, the q/k norms (`attn_q_norm`, `attn_k_norm`, one `[head_dim]` each)
  included. llama.cpp fixes what the file may leave out: 5 sliding layers to 1 global, 10000 as the sliding
  layers' RoPE theta, and gemma2's query scale (hidden / heads for the 62-layer 27B model, head_dim otherwise).
- qwen3, olmo2: q/k norms as Hugging Face stores them (`[head_dim]`; olmo2's `[heads * head_dim]`, over all heads).
- granite: the Llama layout (q/k rows permuted) with four multipliers in the metadata; llama.cpp divides the
  logits by `logit_scale` as transformers divides by `logits_scaling`.
- command-r: Cohere's q/k are written as Hugging Face has them (llama.cpp's "normal" rope turns adjacent pairs, as
  Cohere does), so they are reordered for rotate-half as cohere.py does; the LayerNorms have no bias, the head is
  tied, the logits are multiplied by `logit_scale`.

Biases, a separate LM head and (falcon) a second norm are read from which tensors the file holds, as llama.cpp
does: the metadata does not record them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.errors import CheckpointError
from converters.families.cohere import to_rotate_half
from converters.keymap import (
    Rule,
    Transform,
    compose,
    keep,
    kv_bias,
    kv_in,
    kv_scales,
    o_out,
    q_bias,
    q_in,
    q_scales,
    transpose,
)
from hdex_jax.config import ModelConfig

_LAYER = r"blk\.(?P<layer>\d+)\."


class GGUFMeta:
    """One file's metadata (keys relative to its architecture) and tensor names, for the declarations below."""

    def __init__(self, reader: gguf.GGUFReader, arch: str, path: Path) -> None:
        self._reader = reader
        self.tensor_names = {t.name for t in reader.tensors}
        self.arch = arch
        self.path = path

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        """`<arch>.<key>`, or `default`; a CheckpointError naming the file and key if `required` and absent."""
        return self.general(f"{self.arch}.{key}", default, required)

    def general(self, key: str, default: Any = None, required: bool = False) -> Any:
        """The absolute metadata `key` (e.g. `tokenizer.ggml.eos_token_id`), or `default`."""
        field = self._reader.get_field(key)
        if field is None:
            if required:
                raise CheckpointError(f"{self.path} has no metadata key {key!r}, which a {self.arch} GGUF needs")
            return default
        return field.contents()

    def count(self, key: str) -> int | None:
        """The number of elements of the array `key` (e.g. the vocabulary), without reading them; None if absent."""
        field = self._reader.get_field(key)
        return None if field is None else len(field.data)

    def values(self, tensor: str) -> np.ndarray:
        """The float32 values of tensor `tensor` (a small one, such as rope scaling factors), dequantized."""
        found = next(t for t in self._reader.tensors if t.name == tensor)
        return np.asarray(gguf.quants.dequantize(found.data, found.tensor_type), np.float32).reshape(-1)

    def has(self, tensor: str) -> bool:
        """Whether the file holds tensor `tensor` (a full name, e.g. `blk.0.attn_q.bias`)."""
        return tensor in self.tensor_names


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """One GGUF architecture (`general.architecture`).

    Attributes:
        fixed: ModelConfig fields every file of the architecture has (norm kind, activation, positions, ...).
        key_map: the unpadded ModelConfig -> rules from GGUF tensor names to canonical names.
        from_file: ModelConfig fields this architecture reads from the file beyond the common ones
            (sizes, epsilon, rope, biases and tying, which config_from_gguf reads for every architecture).
        permuted_qk: llama.cpp permuted q/k rows for its adjacent-pair rope. The inverse permutation covers whole
            heads, so a partial rotary dimension is refused for such files.
        limits: what of the architecture is refused, for users.
    """

    fixed: Mapping[str, Any]
    key_map: Callable[[ModelConfig], list[Rule]]
    from_file: Callable[[GGUFMeta], dict[str, Any]] = lambda meta: {}
    permuted_qk: bool = False
    limits: str = ""


# ------------------------------------------------------------------------------------------------ transforms


def unpermute(x: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp writes `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`:
    within each head, rows (first half, second half) are interleaved into pairs. This is its inverse.
    """
    return x.reshape(num_heads, x.shape[0] // num_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _unpermute_q(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return unpermute(x, cfg.num_heads)


def _unpermute_k(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return unpermute(x, cfg.num_kv_heads)


def _split_qkv(x: np.ndarray, cfg: ModelConfig) -> list[np.ndarray]:
    """Rows (or bias entries) `[q (H*hd); k (KV*hd); v (KV*hd)]` -> the three parts, in the fused layout."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if x.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(f"a fused q/k/v of {cfg.num_heads} + 2 x {cfg.num_kv_heads} heads of {cfg.head_dim} has "
                         f"{q_rows + 2 * kv_rows} rows, not {x.shape[0]}")
    return np.split(x, [q_rows, q_rows + kv_rows])


def _qkv_weight(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    q, k, v = _split_qkv(x, cfg)
    return q_in(q, cfg), kv_in(k, cfg), kv_in(v, cfg)


def _qkv_bias(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    q, k, v = _split_qkv(x, cfg)
    return q_bias(q, cfg), kv_bias(k, cfg), kv_bias(v, cfg)


def _gate_up(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Phi-3's fused `[gate (F); up (F)]` rows -> (gate, up) in `[D, F]`."""
    gate, up = np.split(x, 2)
    return gate.T, up.T


# ---------------------------------------------------------------------------------------------- rule groups


def _norm(name: str, target: str, per_layer: bool = True) -> list[Rule]:
    """A norm's weight (scale) and bias; the bias rule matters only for LayerNorm files."""
    prefix = _LAYER if per_layer else ""
    return [Rule(prefix + name + r"\.weight", f"{target}/scale", keep),
            Rule(prefix + name + r"\.bias", f"{target}/bias", keep)]


def _linear(name: str, target: str | tuple[str, ...], weight: Transform, bias: Transform) -> list[Rule]:
    """A per-layer projection's weight and (optional) bias; a tuple `target` is a fused tensor split in order."""

    def leaf(kind: str) -> str | tuple[str, ...]:
        return f"{target}/{kind}" if isinstance(target, str) else tuple(f"{t}/{kind}" for t in target)

    return [Rule(_LAYER + name + r"\.weight", leaf("w"), weight), Rule(_LAYER + name + r"\.bias", leaf("b"), bias)]


def _embeddings(lm_head: bool = True) -> list[Rule]:
    """Token embedding, final norm and (absent when tied; gemma never has one) the LM head."""
    rules = [Rule(r"token_embd\.weight", "embed", keep), *_norm("output_norm", "final_norm", per_layer=False)]
    if lm_head:
        rules += [Rule(r"output\.weight", "lm_head/w", transpose), Rule(r"output\.bias", "lm_head/b", keep)]
    return rules


def _attention(permuted: bool = False, interleaved: bool = False) -> list[Rule]:
    """Separate q/k/v projections and the output projection. `permuted`: llama.cpp permuted the q/k rows (of the
    weights and of the biases alike), which is undone first. `interleaved`: q/k rotate adjacent pairs (Cohere),
    reordered for rotate-half."""
    q_w, q_b, k_w, k_b = q_in, q_bias, kv_in, kv_bias
    if permuted:
        q_w, q_b = compose(_unpermute_q, q_in), compose(_unpermute_q, q_bias)
        k_w, k_b = compose(_unpermute_k, kv_in), compose(_unpermute_k, kv_bias)
    if interleaved:
        q_w, q_b, k_w, k_b = (compose(t, to_rotate_half) for t in (q_w, q_b, k_w, k_b))
    return [
        *_linear("attn_q", "layers/attn/q", q_w, q_b),
        *_linear("attn_k", "layers/attn/k", k_w, k_b),
        *_linear("attn_v", "layers/attn/v", kv_in, kv_bias),
        *_linear("attn_output", "layers/attn/o", o_out, keep),
    ]


def _qk_norms(then: Transform = keep) -> list[Rule]:
    """`attn_q_norm` and `attn_k_norm` -> per-head scales (see keymap.q_scales), then mapped by `then`."""
    return [Rule(_LAYER + r"attn_q_norm\.weight", "layers/attn/q_norm/scale", compose(q_scales, then)),
            Rule(_LAYER + r"attn_k_norm\.weight", "layers/attn/k_norm/scale", compose(kv_scales, then))]


def _post_norms() -> list[Rule]:
    """The norms of the attention's and the MLP's outputs (gemma2, gemma3, olmo2)."""
    return [*_norm("post_attention_norm", "layers/ln1_post"), *_norm("post_ffw_norm", "layers/ln2_post")]


_QKV = ("layers/attn/q", "layers/attn/k", "layers/attn/v")


def _fused_attention() -> list[Rule]:
    """One `attn_qkv` (q, k, v stacked on rows) and the output projection."""
    return [*_linear("attn_qkv", _QKV, _qkv_weight, _qkv_bias),
            *_linear("attn_output", "layers/attn/o", o_out, keep)]


def _mlp(gated: bool) -> list[Rule]:
    """up and down projections, and gate for a gated MLP."""
    rules = [*_linear("ffn_up", "layers/mlp/up", transpose, keep),
             *_linear("ffn_down", "layers/mlp/down", transpose, keep)]
    if gated:
        rules += _linear("ffn_gate", "layers/mlp/gate", transpose, keep)
    return rules


def _sequential_norms() -> list[Rule]:
    """The norm before attention and the norm before the MLP."""
    return [*_norm("attn_norm", "layers/ln1"), *_norm("ffn_norm", "layers/ln2")]


def _rules(*groups: list[Rule]) -> Callable[[ModelConfig], list[Rule]]:
    """A key map that does not depend on the config."""
    rules = [rule for group in groups for rule in group]
    return lambda cfg: list(rules)


def _falcon_rules(cfg: ModelConfig) -> list[Rule]:
    """Falcon: one norm shared by the parallel attention and MLP, or (Falcon-40B) `attn_norm_2` before the
    attention and `attn_norm` before the MLP (see the module docstring)."""
    norms = _norm("attn_norm", "layers/ln1") if cfg.shared_norm else \
        [*_norm("attn_norm_2", "layers/ln1"), *_norm("attn_norm", "layers/ln2")]
    return [*_embeddings(), *norms, *_fused_attention(), *_mlp(gated=False)]


def _falcon_fields(meta: GGUFMeta) -> dict[str, Any]:
    layout = meta.get("tensor_data_layout")
    if layout not in (None, "jploski"):
        raise CheckpointError(f"{meta.path}: falcon.tensor_data_layout={layout!r} is not supported (supported: "
                              f"'jploski', the q/k/v order llama.cpp's convert script writes)")
    return {"shared_norm": not meta.has("blk.0.attn_norm_2.weight")}


def _phi3_fields(meta: GGUFMeta) -> dict[str, Any]:
    # llama.cpp writes Phi-3's sliding_window (0 when the model has none, as Phi-4); transformers' Phi-3 attends
    # within it, so it is kept (llama.cpp itself currently ignores it).
    return {"sliding_window": int(meta.get("attention.sliding_window", 0)) or None}


def _gemma_fields(meta: GGUFMeta) -> dict[str, Any]:
    # Gemma multiplies embeddings by sqrt(hidden_size); llama.cpp hard-codes the same.
    return {"embed_scale": float(meta.get("embedding_length", required=True)) ** 0.5}


# Gemma 2's values llama.cpp assumes when a file leaves them out: soft-caps of scores and logits, the window.
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention.sliding_window": 4096}
# Gemma-2-27B's layer count: the one size whose query scale is (hidden / heads) ** -0.5 instead of head_dim ** -0.5.
_GEMMA2_27B_LAYERS = 46


def _gemma2_fields(meta: GGUFMeta) -> dict[str, Any]:
    """Gemma 2: the embedding scale, soft-caps, a sliding window on even layers (layers 0, 2, ...) and the query
    scale. GGUF does not store query_pre_attn_scalar; as llama.cpp does, it is hidden / heads for the 27B model
    (recognised by its layer count) and head_dim for the others."""

    def get(key: str) -> Any:
        return meta.get(key, _GEMMA2_DEFAULTS[key])

    hidden = int(meta.get("embedding_length", required=True))
    heads = int(meta.get("attention.head_count", required=True))
    layers = int(meta.get("block_count", required=True))
    return {
        **_gemma_fields(meta),
        "attn_softcap": float(get("attn_logit_softcapping")),
        "final_softcap": float(get("final_logit_softcapping")),
        "sliding_window": int(get("attention.sliding_window")),
        "sliding_layers": tuple(i % 2 == 0 for i in range(layers)),
        "attention_scale": (hidden / heads) ** -0.5 if layers == _GEMMA2_27B_LAYERS else None,
    }


# Gemma 3's values llama.cpp assumes when a file leaves them out: the layer pattern and the sliding layers' theta.
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_THETA = 10000.0
# Gemma-3-27B's layer count: the one size whose query scale is (hidden / heads) ** -0.5 instead of head_dim ** -0.5.
_GEMMA3_27B_LAYERS = 62


def _gemma3_fields(meta: GGUFMeta) -> dict[str, Any]:
    """Gemma 3: the embedding scale, the sliding layers (`attention.sliding_window_pattern`, a count or one flag
    per layer, else every sixth layer global) and their theta, the query scale (as for gemma2, see above)."""
    hidden = int(meta.get("embedding_length", required=True))
    heads = int(meta.get("attention.head_count", required=True))
    layers = int(meta.get("block_count", required=True))
    pattern = meta.get("attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
    sliding = tuple(bool(p) for p in pattern) if isinstance(pattern, list) else \
        tuple((i + 1) % int(pattern) != 0 for i in range(layers))
    window = meta.get("attention.sliding_window")
    return {
        **_gemma_fields(meta),
        "sliding_window": int(window) if window and any(sliding) else None,
        "sliding_layers": sliding if window and any(sliding) else (),
        "rope_local_theta": float(meta.get("rope.freq_base_swa", _GEMMA3_LOCAL_THETA)),
        "attention_scale": (hidden / heads) ** -0.5 if layers == _GEMMA3_27B_LAYERS else None,
    }


def _granite_fields(meta: GGUFMeta) -> dict[str, Any]:
    """Granite's multipliers; llama.cpp's defaults (1, and head_dim ** -0.5 for attention) when absent."""
    attention = meta.get("attention.scale")
    return {"embed_scale": float(meta.get("embedding_scale", 1.0)),
            "residual_scale": float(meta.get("residual_scale", 1.0)),
            "attention_scale": None if attention is None else float(attention),
            "logit_scale": 1.0 / float(meta.get("logit_scale", 1.0))}


def _command_r_fields(meta: GGUFMeta) -> dict[str, Any]:
    return {"logit_scale": float(meta.get("logit_scale", 1.0)),
            "qk_norm": "head" if meta.has("blk.0.attn_q_norm.weight") else "none"}


def _command_r_rules(cfg: ModelConfig) -> list[Rule]:
    qk_norms = _qk_norms(to_rotate_half) if cfg.qk_norm != "none" else []
    return [*_embeddings(lm_head=False), *_norm("attn_norm", "layers/ln1"), *_attention(interleaved=True),
            *qk_norms, *_mlp(gated=True)]


_ROPE_SILU = {"norm": "rmsnorm", "positions": "rope", "activation": "silu", "gated_mlp": True}

ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(
        fixed=_ROPE_SILU,
        key_map=_rules(_embeddings(), _sequential_norms(), _attention(permuted=True), _mlp(gated=True)),
        permuted_qk=True,
        limits="rope scaling: linear, yarn and rope_freqs (llama3); a rope_freqs tensor with another scaling is "
               "refused"),
    "qwen2": GGUFArch(
        fixed=_ROPE_SILU,
        key_map=_rules(_embeddings(), _sequential_norms(), _attention(), _mlp(gated=True)),
        limits="rope scaling: linear and yarn"),
    "phi3": GGUFArch(
        fixed=_ROPE_SILU,
        key_map=_rules(_embeddings(), _sequential_norms(), _fused_attention(),
                       _linear("ffn_up", ("layers/mlp/gate", "layers/mlp/up"), _gate_up, keep),
                       _linear("ffn_down", "layers/mlp/down", transpose, keep)),
        from_file=_phi3_fields,
        limits="longrope scaling from the rope_factors_long/short tensors, switched at the original length as "
               "transformers does (llama.cpp picks them by its context size)"),
    "gemma": GGUFArch(
        fixed={**_ROPE_SILU, "activation": "gelu_tanh"},
        key_map=_rules(_embeddings(lm_head=False), _sequential_norms(), _attention(), _mlp(gated=True)),
        from_file=_gemma_fields),
    "gemma2": GGUFArch(
        fixed={**_ROPE_SILU, "activation": "gelu_tanh", "post_norms": True},
        key_map=_rules(_embeddings(lm_head=False), _sequential_norms(), _attention(), _mlp(gated=True),
                       _post_norms()),
        from_file=_gemma2_fields,
        limits="the query scale is not in GGUF files: head_dim ** -0.5, or (hidden / heads) ** -0.5 for 46 layers "
               "(Gemma-2-27B), as llama.cpp assumes"),
    "gemma3": GGUFArch(
        fixed={**_ROPE_SILU, "activation": "gelu_tanh", "post_norms": True, "qk_norm": "head"},
        key_map=_rules(_embeddings(lm_head=False), _sequential_norms(), _attention(), _qk_norms(), _mlp(gated=True),
                       _post_norms()),
        from_file=_gemma3_fields,
        limits="the layer pattern, the sliding layers' theta and the query scale are llama.cpp's fixed values "
               "unless the file gives them (see gguf_arches)"),
    "qwen3": GGUFArch(
        fixed={**_ROPE_SILU, "qk_norm": "head"},
        key_map=_rules(_embeddings(), _sequential_norms(), _attention(), _qk_norms(), _mlp(gated=True))),
    "olmo2": GGUFArch(
        fixed={**_ROPE_SILU, "qk_norm": "all", "input_norms": False, "post_norms": True},
        key_map=_rules(_embeddings(), _attention(), _qk_norms(), _mlp(gated=True), _post_norms())),
    "granite": GGUFArch(
        fixed=_ROPE_SILU,
        key_map=_rules(_embeddings(), _sequential_norms(), _attention(permuted=True), _mlp(gated=True)),
        from_file=_granite_fields,
        permuted_qk=True),
    "command-r": GGUFArch(
        fixed={"norm": "layernorm", "norm_bias": False, "positions": "rope", "activation": "silu",
               "gated_mlp": True, "parallel_residual": True, "shared_norm": True},
        key_map=_command_r_rules,
        from_file=_command_r_fields),
    "starcoder2": GGUFArch(
        fixed={"norm": "layernorm", "positions": "rope", "activation": "gelu_tanh", "gated_mlp": False},
        key_map=_rules(_embeddings(), _sequential_norms(), _attention(), _mlp(gated=False))),
    "gpt2": GGUFArch(
        fixed={"norm": "layernorm", "positions": "learned", "activation": "gelu_tanh", "gated_mlp": False},
        key_map=_rules(_embeddings(), [Rule(r"position_embd\.weight", "pos_embed", keep)], _sequential_norms(),
                       _fused_attention(), _mlp(gated=False))),
    "falcon": GGUFArch(
        fixed={"norm": "layernorm", "positions": "rope", "activation": "gelu", "gated_mlp": False,
               "parallel_residual": True},
        key_map=_falcon_rules,
        from_file=_falcon_fields,
        limits="only the rope Falcons llama.cpp converts (7B/40B/180B style); Falcon-RW (ALiBi) has no GGUF form"),
}
