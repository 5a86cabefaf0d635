"""`ModelConfig`: the one static description of a decoder that every part of hdex_jax reads.

Families (Llama, Mistral, Qwen2, OPT, ...) differ only in the values of these fields; the forward pass,
the weight declarations, the sharding and the performance model are all driven by this object.
It is frozen and hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from hdex_jax import rope
from hdex_jax.activations import ACTIVATIONS

# Each enumerated field's kinds are listed once, in its type; validation reads them from there.
Norm = Literal["rmsnorm", "layernorm"]
Positions = Literal["rope", "learned", "alibi", "none"]
QKNorm = Literal["none", "head", "all"]
# The shape of a layer's residual stream and norms (`ModelConfig.layer`), one function each in hdex_jax.forward:
# "pre_norm" h + attn(ln1 h), then + mlp(ln2 h) (most families); "post_norm" the norm after each residual add
# (OPT-350m); "sandwich" pre-norm with each sublayer's output normed too (Gemma 2, Gemma 3); "output_norm" only the
# outputs normed (OLMo 2, EXAONE 4); "parallel" h + attn(ln1 h) + mlp(ln2 h) (GPT-NeoX, Falcon-40B);
# "parallel_shared_norm" both sublayers reading ln1 h (GPT-J, Phi, Falcon-7B, Cohere, StableLM).
Layer = Literal["pre_norm", "post_norm", "sandwich", "output_norm", "parallel", "parallel_shared_norm"]
# A key of hdex_jax.activations.ACTIVATIONS, which holds each activation's function and Hugging Face names.
Activation = str

CONFIG_FILE = "hdex_config.json"
# The activation/KV dtypes the datapath computes in: float32 (the reference), float16 (the LPU's), bfloat16.
DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer.

    Sizes follow Hugging Face names. `embed_dim` is the width of the token embedding, which differs from
    `hidden_size` only when the model projects in and out (opt-350m's `word_embed_proj_dim`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    embed_dim: int
    # Norms: kind, epsilon, and whether a norm precedes the LM head.
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-6
    final_norm: bool = True
    # Whether norms carry a learned scale, and (LayerNorm only) a learned bias: OLMo's LayerNorm has neither,
    # MPT's no bias.
    norm_scale: bool = True
    norm_bias: bool = True
    # A norm of q and k (kind `norm`) before RoPE: "head" normalises each head over head_dim (Qwen3, Gemma 3,
    # EXAONE 4, Cohere), "all" a token's q (and its k) over all heads of the layer at once (OLMo 2). Either way
    # the learned scales are per head ([heads, head_dim]).
    qk_norm: QKNorm = "none"
    # For "all" on N devices: the stored q and k features the statistic averages over (set by the N-device
    # layout, replicated KV heads counted each time); empty means every head's, num_heads * head_dim and
    # num_kv_heads * head_dim.
    qk_norm_features: tuple[int, ...] = ()
    # Granite: each sublayer's output is multiplied by this before it joins the residual stream.
    residual_scale: float | None = None
    # Bloom: a LayerNorm right after the token embedding.
    embed_norm: bool = False
    # Gemma: the embedding is multiplied by this (sqrt(hidden_size)) before the first layer.
    embed_scale: float | None = None
    # The layer's kind (`layer`, see `Layer`), as converters set it and hdex_config.json keeps it: whether the
    # norms sit before the sublayers (pre-LN) or after the residual add (OPT-350m);
    pre_norm: bool = True
    # whether the sublayers' inputs are normed (ln1, ln2): OLMo 2 and EXAONE 4 norm only their outputs;
    input_norms: bool = True
    # Gemma 2, Gemma 3, OLMo 2, EXAONE 4: a norm on each sublayer's output, before it joins the residual stream;
    post_norms: bool = False
    # parallel residual (GPT-J, GPT-NeoX, Falcon, Phi): h + attn(ln1(h)) + mlp(ln2(h)), and with
    # `shared_norm` (GPT-J, Phi, Falcon-7B) both sublayers read ln1(h) and there is no ln2.
    parallel_residual: bool = False
    shared_norm: bool = False
    # Positions.
    positions: Positions = "rope"
    position_offset: int = 0
    rope_theta: float = 10000.0
    # Hashable form of the HF rope parameters beyond theta, e.g. (("rope_type", "llama3"), ("factor", 8.0), ...),
    # lists as tuples; the kinds and what they compute are in hdex_jax.rope.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    partial_rotary_factor: float = 1.0
    # Which layers rotate q and k (SmolLM3's `no_rope_layers`, EXAONE 4's global layers do not); empty means all.
    rope_layers: tuple[bool, ...] = ()
    # Gemma 3: the RoPE theta of the sliding-window layers (unscaled), the global layers using `rope_theta`.
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    # Which layers use `sliding_window` (Gemma 2 alternates); empty means every layer does.
    sliding_layers: tuple[bool, ...] = ()
    # Attention: the score scale (None is head_dim ** -0.5), and tanh soft-capping of scores and final logits
    # (Gemma 2): x -> cap * tanh(x / cap).
    attention_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Final logits multiplied by this (Cohere's logit_scale, Granite's 1 / logits_scaling).
    logit_scale: float | None = None
    # MLP.
    activation: Activation = "silu"
    gated_mlp: bool = True
    # Mixture of experts (Mixtral): each token's MLP is the router-weighted sum of its top-k experts' MLPs.
    num_experts: int = 0
    experts_per_token: int = 0
    # Whether the top-k routing weights are renormalised to sum to one (Mixtral; Qwen3-MoE's norm_topk_prob).
    moe_renormalize: bool = True
    # Which projections carry biases.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The number format (hdex_jax.formats): activations, the KV cache and every weight not named in
    # `weight_formats` in this dtype; those weights in a quantized format, ((weight name, format), ...).
    dtype: str = "float32"
    weight_formats: tuple[tuple[str, str], ...] = ()
    # Zero rows appended to the embedding and LM head so the vocabulary splits evenly over devices; the
    # logits of these rows are dropped, never sampled.
    vocab_padding: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        _check_kind("norm", self.norm, get_args(Norm))
        _check_kind("positions", self.positions, get_args(Positions))
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"ModelConfig.sliding_layers has {len(self.sliding_layers)} entries for "
                             f"{self.num_layers} layers")
        if self.rope_layers and len(self.rope_layers) != self.num_layers:
            raise ValueError(f"ModelConfig.rope_layers has {len(self.rope_layers)} entries for "
                             f"{self.num_layers} layers")
        _check_kind("qk_norm", self.qk_norm, get_args(QKNorm))
        _layer_kind(self)  # refuses a combination of the norm fields that no layer kind has
        if self.qk_norm == "all" and self.norm != "rmsnorm":
            raise ValueError("ModelConfig.qk_norm='all' (a norm over all heads) is implemented for rmsnorm only")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"ModelConfig.experts_per_token must be in [1, num_experts={self.num_experts}], "
                             f"got {self.experts_per_token}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation {self.activation!r} is not supported")
        if self.positions == "rope":
            try:
                rope.check_scaling(dict(self.rope_scaling), self.rope_dim)
            except ValueError as e:
                raise ValueError(f"ModelConfig.rope_scaling: {e}") from e

    @property
    def projects_embeddings(self) -> bool:
        """True when embeddings are narrower than the residual stream (opt-350m's project_in/out)."""
        return self.embed_dim != self.hidden_size

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None when it attends to every earlier position."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def rotates(self, layer: int) -> bool:
        """Whether `layer` applies RoPE to q and k."""
        return self.positions == "rope" and (not self.rope_layers or self.rope_layers[layer])

    def qk_norm_size(self, kv: bool) -> int:
        """Features the "all" q/k norm averages over, for q (or, with `kv`, k) (see `qk_norm_features`)."""
        if self.qk_norm_features:
            return self.qk_norm_features[int(kv)]
        return (self.num_kv_heads if kv else self.num_heads) * self.head_dim

    @property
    def layer(self) -> Layer:
        """The layer's kind (see `Layer`), named by the norm fields the converters set and hdex_config.json keeps."""
        return _layer_kind(self)

    @property
    def has_ln2(self) -> bool:
        """Whether layers have a second norm (before the MLP); not when a parallel block shares ln1, nor when
        sublayer inputs are not normed."""
        return self.input_norms and not (self.parallel_residual and self.shared_norm)

    @property
    def stored_vocab_size(self) -> int:
        """Rows of the embedding and columns of the LM head, padding included."""
        return self.vocab_size + self.vocab_padding

    @property
    def rope_dim(self) -> int:
        """How many leading features of each head are rotated."""
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies of RoPE, `[rope_dim // 2]` float64, with the configured scaling applied (for dynamic
        and longrope scaling, those of a sequence within the original length; `hdex_jax.rope`)."""
        return rope.inv_freq(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        fields = json.loads(text)
        fields["rope_scaling"] = tuple((key, _hashable(value)) for key, value in fields.get("rope_scaling", ()))
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
        for name in ("sliding_layers", "rope_layers", "qk_norm_features"):
            fields[name] = tuple(fields.get(name, ()))
        fields["weight_formats"] = tuple(tuple(item) for item in fields.get("weight_formats", ()))
        return cls(**fields)

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_FILE).write_text(self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory, CONFIG_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: this is not a converted hdex_jax checkpoint")
        return cls.from_json(path.read_text())


def _layer_kind(cfg: ModelConfig) -> Layer:
    """`cfg.layer` from the norm fields; `shared_norm` matters only to a parallel layer."""
    inputs, outputs = cfg.input_norms, cfg.post_norms
    if cfg.parallel_residual and cfg.pre_norm and inputs and not outputs:
        return "parallel_shared_norm" if cfg.shared_norm else "parallel"
    if not cfg.parallel_residual and cfg.pre_norm and (inputs or outputs):
        return ("sandwich" if inputs else "output_norm") if outputs else "pre_norm"
    if not cfg.parallel_residual and not cfg.pre_norm and inputs and not outputs:
        return "post_norm"
    raise ValueError(f"ModelConfig: no layer kind has pre_norm={cfg.pre_norm}, input_norms={inputs}, "
                     f"post_norms={outputs}, parallel_residual={cfg.parallel_residual}")


def _check_kind(field: str, value: str, kinds: tuple[str, ...]) -> None:
    """Raise naming the field and its kinds when `value` is not one of them."""
    if value not in kinds:
        choices = ", ".join(repr(kind) for kind in kinds[:-1]) + f" or {kinds[-1]!r}"
        raise ValueError(f"ModelConfig.{field} must be {choices}, got {value!r}")


def rope_scaling_items(rope_parameters: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The hashable form of HF `rope_parameters`/`rope_scaling`, without the theta it also carries; lists (longrope's
    factors) become tuples."""
    if not rope_parameters:
        return ()
    items = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "type" in items and "rope_type" not in items:
        items["rope_type"] = items.pop("type")
    items.pop("type", None)
    if items.get("rope_type", "default") == "default":
        return ()
    return tuple(sorted((key, _hashable(value)) for key, value in items.items()))


def _hashable(value: Any) -> Any:
    """`value` with lists made tuples, so that a ModelConfig holding it stays hashable."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """HF configs give eos as an int, a list or None; hdex_jax keeps a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
