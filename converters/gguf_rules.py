"""What the GGUF form of a family (`GGUFArch`, declared beside its `Family` in converters/families/) is made of:
the metadata of a file, llama.cpp's layout transforms, and the rules of the tensor names the architectures share.

The facts come from the writer and the two readers of these files: llama.cpp's `convert_hf_to_gguf.py` (which
Hugging Face tensors become which GGUF tensors, in which layout), the `gguf` package (`MODEL_TENSORS` lists the
tensor names each architecture may have) and transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`, how
it turns them back into Hugging Face weights). Dequantized GGUF tensors are in torch's `[out, in]` layout, so
the usual transforms of converters/keymap.py apply. Layout facts the shared rules rely on:

- llama, granite: the convert script permutes q/k rows for llama.cpp's adjacent-pair rope; undone here
  (`attention(permuted=True)`). The other rope architectures use llama.cpp's "neox" rope, which is the canonical
  rotate-half: no permutation.
- `attn_qkv` (gpt2, falcon, phi3) is q, k, v stacked on rows.

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
from converters.keymap import (
    QKV,
    Rule,
    Transform,
    compose,
    keep,
    kv_bias,
    kv_in,
    kv_scales,
    linear,
    norm,
    o_out,
    q_bias,
    q_in,
    q_scales,
    transpose,
)
from hdex_jax.config import ModelConfig

# The per-layer prefix of llama.cpp's tensor names.
LAYER = r"blk\.(?P<layer>\d+)\."
# The fixed fields of the Llama-like architectures: RMSNorm, rope, a gated SiLU MLP.
ROPE_SILU = {"norm": "rmsnorm", "positions": "rope", "activation": "silu", "gated_mlp": True}


class GGUFMeta:
    """One file's metadata (keys relative to its architecture) and tensor names, for the declarations."""

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
    """One GGUF architecture (`general.architecture`) a family reads.

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


# ---------------------------------------------------------------------------------------------- rule groups


def layer_norm(name: str, target: str) -> list[Rule]:
    """A per-layer norm's weight (scale) and bias; the bias rule matters only for LayerNorm files."""
    return norm(LAYER + name, target)


def layer_linear(name: str, target: str | tuple[str, ...], weight: Transform, bias: Transform) -> list[Rule]:
    """A per-layer projection's weight and (optional) bias; a tuple `target` is a fused tensor split in order."""
    return linear(LAYER + name, target, weight, bias)


def embeddings(lm_head: bool = True) -> list[Rule]:
    """Token embedding, final norm and (absent when tied; gemma never has one) the LM head."""
    rules = [Rule(r"token_embd\.weight", "embed", keep), *norm("output_norm", "final_norm")]
    if lm_head:
        rules += [Rule(r"output\.weight", "lm_head/w", transpose), Rule(r"output\.bias", "lm_head/b", keep)]
    return rules


def attention(permuted: bool = False, then: Transform | None = None) -> list[Rule]:
    """Separate q/k/v projections and the output projection. `permuted`: llama.cpp permuted the q/k rows (of the
    weights and of the biases alike), which is undone first. `then`: a reordering of q and k applied last (Cohere's
    interleaved rope to rotate-half)."""
    q_w, q_b, k_w, k_b = q_in, q_bias, kv_in, kv_bias
    if permuted:
        q_w, q_b = compose(_unpermute_q, q_in), compose(_unpermute_q, q_bias)
        k_w, k_b = compose(_unpermute_k, kv_in), compose(_unpermute_k, kv_bias)
    if then is not None:
        q_w, q_b, k_w, k_b = (compose(t, then) for t in (q_w, q_b, k_w, k_b))
    return [
        *layer_linear("attn_q", "layers/attn/q", q_w, q_b),
        *layer_linear("attn_k", "layers/attn/k", k_w, k_b),
        *layer_linear("attn_v", "layers/attn/v", kv_in, kv_bias),
        *layer_linear("attn_output", "layers/attn/o", o_out, keep),
    ]


def qk_norms(then: Transform = keep) -> list[Rule]:
    """`attn_q_norm` and `attn_k_norm` -> per-head scales (see keymap.q_scales), then mapped by `then`."""
    return [Rule(LAYER + r"attn_q_norm\.weight", "layers/attn/q_norm/scale", compose(q_scales, then)),
            Rule(LAYER + r"attn_k_norm\.weight", "layers/attn/k_norm/scale", compose(kv_scales, then))]


def post_norms() -> list[Rule]:
    """The norms of the attention's and the MLP's outputs (gemma2, gemma3, olmo2)."""
    return [*layer_norm("post_attention_norm", "layers/ln1_post"), *layer_norm("post_ffw_norm", "layers/ln2_post")]


def fused_attention() -> list[Rule]:
    """One `attn_qkv` (q, k, v stacked on rows) and the output projection."""
    return [*layer_linear("attn_qkv", QKV, _qkv_weight, _qkv_bias),
            *layer_linear("attn_output", "layers/attn/o", o_out, keep)]


def mlp(gated: bool) -> list[Rule]:
    """up and down projections, and gate for a gated MLP."""
    rules = [*layer_linear("ffn_up", "layers/mlp/up", transpose, keep),
             *layer_linear("ffn_down", "layers/mlp/down", transpose, keep)]
    if gated:
        rules += layer_linear("ffn_gate", "layers/mlp/gate", transpose, keep)
    return rules


def sequential_norms() -> list[Rule]:
    """The norm before attention and the norm before the MLP."""
    return [*layer_norm("attn_norm", "layers/ln1"), *layer_norm("ffn_norm", "layers/ln2")]


def rules(*groups: list[Rule]) -> Callable[[ModelConfig], list[Rule]]:
    """A key map that does not depend on the config."""
    flat = [rule for group in groups for rule in group]
    return lambda cfg: list(flat)

