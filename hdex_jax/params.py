"""The canonical parameter pytree, declared once per weight.

`param_specs(cfg)` is the single declaration of every weight: its shape, dtype and logical axes. Random
init for tests, the converters' shape checks, the sharding rules and loading are all derived from it.
Per-layer weights are declared and stored stacked on a leading "layers" axis (one tensor per name in the
checkpoints); the forward pass reads them per layer, with fused matrices (`runtime_specs`, `runtime_layout`).

Names are '/'-joined paths into a nested dict, e.g. "layers/attn/q/w".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hdex_jax import quant
from hdex_jax.config import ModelConfig
from hdex_jax.quant import QuantArray

Init = Literal["normal", "ones", "zeros"]
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, dtype, logical axis names (one per dim) and how tests initialise it.

    A matrix names its input (contracted) axes in `inputs`; with a `format` (`quant.FORMATS`) it is stored as a
    `QuantArray` packed along the last of them, and `dtype` is then the dtype it computes in.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: str = "float32"
    init: Init = "normal"
    inputs: tuple[int, ...] = ()
    format: str | None = None

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)
        assert self.format is None or self.inputs, f"a {self.format} weight needs its input axes"

    @property
    def packed_axis(self) -> int:
        """The axis a quantized form packs and groups its values along (the innermost input axis)."""
        return self.inputs[-1]

    def field_specs(self) -> QuantArray:
        """The `values`, `scale` and `offset` of the quantized form, each a ParamSpec (axes of size 1 that a
        group spans are not split over devices)."""
        values, scale = quant.field_shapes(self.shape, self.packed_axis, self.inputs, self.format)
        value_dtype = "int8" if quant.FORMATS[self.format].bits == 8 else "uint8"
        scale_axes = tuple(a if n == size or n > 1 else None for a, n, size in zip(self.axes, scale, self.shape))
        scale_spec = ParamSpec(scale, scale_axes, "float16")
        offset = scale_spec if quant.FORMATS[self.format].affine else None
        return QuantArray(ParamSpec(values, self.axes, value_dtype), scale_spec, offset, self.format,
                          self.packed_axis)

    @property
    def nbytes(self) -> int:
        if self.format is not None:
            return sum(spec.nbytes for spec in jax.tree.leaves(self.field_specs(), is_leaf=is_spec))
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _norm_specs(cfg: ModelConfig, lead: tuple[int, ...], lead_axes: tuple[str, ...],
                features: tuple[str, int] | None = None) -> dict[str, ParamSpec]:
    """The learned parts of one norm: a scale and (LayerNorm) a bias, each only if the family has it, over
    `features` (logical axis, size), by default the hidden size."""
    axis, size = features or ("embed", cfg.hidden_size)
    shape, axes = (*lead, size), (*lead_axes, axis)
    specs = {}
    if cfg.norm_scale:
        specs["scale"] = ParamSpec(shape, axes, cfg.dtype, "ones")
    if cfg.norm == "layernorm" and cfg.norm_bias:
        specs["bias"] = ParamSpec(shape, axes, cfg.dtype, "zeros")
    return specs


def _linear(w_shape: tuple[int, ...], w_axes: tuple[str | None, ...], bias: bool, b_shape: tuple[int, ...],
            b_axes: tuple[str | None, ...], dtype: str, inputs: tuple[int, ...] = (1,)) -> dict[str, ParamSpec]:
    """A per-layer projection [L, *in, *out] (input axes `inputs`) and its bias."""
    specs = {"w": ParamSpec(w_shape, w_axes, dtype, inputs=inputs)}
    if bias:
        specs["b"] = ParamSpec(b_shape, b_axes, dtype)
    return specs


def _mlp_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The dense MLP, or with `num_experts` Mixtral's router and expert stacks (block "moe")."""
    L, D, F, dt = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.dtype
    if cfg.num_experts:
        E = cfg.num_experts
        expert_in = ParamSpec((L, E, D, F), ("layers", "experts", "embed", "ffn"), dt, inputs=(2,))
        return {"moe": {
            "router": {"w": ParamSpec((L, D, E), ("layers", "embed", None), dt)},
            "gate": {"w": expert_in},
            "up": {"w": expert_in},
            "down": {"w": ParamSpec((L, E, F, D), ("layers", "experts", "ffn", "embed"), dt, inputs=(2,))},
        }}
    mlp = {
        "up": _linear((L, D, F), ("layers", "embed", "ffn"), cfg.mlp_bias, (L, F), ("layers", "ffn"), dt),
        "down": _linear((L, F, D), ("layers", "ffn", "embed"), cfg.mlp_bias, (L, D), ("layers", "embed"), dt),
    }
    if cfg.gated_mlp:
        mlp["gate"] = _linear((L, D, F), ("layers", "embed", "ffn"), cfg.mlp_bias, (L, F), ("layers", "ffn"), dt)
    return {"mlp": mlp}


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The nested dict of `ParamSpec` for `cfg`: the one declaration of every weight.

    A norm without learned parts (OLMo's) declares nothing, so it has no entry at all.
    """
    L, D, E = cfg.num_layers, cfg.hidden_size, cfg.embed_dim
    H, KV, hd, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.stored_vocab_size
    dt = cfg.dtype
    lyr = ("layers",)

    def proj(heads: int, head_axis: str, bias: bool) -> dict[str, ParamSpec]:
        return _linear((L, D, heads, hd), ("layers", "embed", head_axis, "head_dim"), bias,
                       (L, heads, hd), ("layers", head_axis, "head_dim"), dt)

    attn = {
        "q": proj(H, "heads", cfg.qkv_bias),
        "k": proj(KV, "kv_heads", cfg.qkv_bias),
        "v": proj(KV, "kv_heads", cfg.qkv_bias),
        "o": _linear((L, H, hd, D), ("layers", "heads", "head_dim", "embed"), cfg.o_bias,
                     (L, D), ("layers", "embed"), dt, inputs=(1, 2)),
    }
    norms = (["ln1"] if cfg.input_norms else []) + (["ln2"] if cfg.has_ln2 else []) \
        + (["ln1_post", "ln2_post"] if cfg.post_norms else [])
    layer = {name: _norm_specs(cfg, (L,), lyr) for name in norms}
    if cfg.qk_norm != "none":
        # Per-head scales (a family that shares one over the heads has it repeated by its converter), so that head
        # padding and sharding treat them like the heads of q and k.
        for name, heads, axis in (("q_norm", H, "heads"), ("k_norm", KV, "kv_heads")):
            attn[name] = _norm_specs(cfg, (L, heads), ("layers", axis), ("head_dim", hd))
    specs: dict[str, Any] = {
        "embed": ParamSpec((V, E), ("vocab", "embed_in"), dt, inputs=(1,)),
        "layers": {**layer, "attn": attn, **_mlp_specs(cfg)},
    }
    if cfg.positions == "learned":
        specs["pos_embed"] = ParamSpec((cfg.max_position_embeddings + cfg.position_offset, D),
                                       ("positions", "embed"), dt)
    if cfg.positions == "alibi":
        # Derived from the head count by the converter, stored like a weight so that head padding and
        # sharding treat it like every other per-head array.
        specs["alibi_slopes"] = ParamSpec((H,), ("heads",), dt)
    if cfg.embed_norm:
        specs["embed_norm"] = _norm_specs(cfg, (), ())
    if cfg.projects_embeddings:
        specs["project_in"] = ParamSpec((E, D), ("embed_in", "embed"), dt, inputs=(0,))
        specs["project_out"] = ParamSpec((D, E), ("embed", "embed_in"), dt, inputs=(0,))
    if cfg.final_norm:
        specs["final_norm"] = _norm_specs(cfg, (), ())
    head = {} if cfg.tie_embeddings else {"w": ParamSpec((E, V), ("embed_in", "vocab"), dt, inputs=(0,))}
    if cfg.lm_head_bias:
        head["b"] = ParamSpec((V,), ("vocab",), dt)
    if head:
        specs["lm_head"] = head
    return _with_formats(_drop_empty(specs), cfg)


def _with_formats(specs: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """`specs` with the stored format of every weight `cfg.weight_formats` names (the rest stay in cfg.dtype)."""
    flat = flatten(specs)
    for name, fmt in cfg.weight_formats:
        spec = flat.get(name)
        if spec is None or not spec.inputs:
            raise ValueError(f"ModelConfig.weight_formats names {name!r}, which is not a weight matrix of this "
                             f"{cfg.model_type} configuration")
        if fmt not in quant.FORMATS:
            raise ValueError(f"ModelConfig.weight_formats gives {name!r} the format {fmt!r}; expected one of "
                             f"{', '.join(quant.FORMATS)}")
        flat[name] = dataclasses.replace(spec, format=fmt)
    return unflatten(flat)


def _drop_empty(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` without empty sub-dicts: a pytree node with no leaves would not survive flatten/unflatten."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _drop_empty(value)
            if not value:
                continue
        out[key] = value
    return out


# Weights the runtime form fuses into one matrix, so that one matmul reads them: (fused name, its parts).
FUSED = {"attn": ("qkv", ("q", "k", "v")), "mlp": ("gate_up", ("gate", "up"))}


def _fuse_blocks(layer: dict[str, Any], combine: Callable[[str, list[Any]], Any]) -> dict[str, Any]:
    """`layer` with each group of `FUSED` parts replaced by `combine(key, parts)` for their "w" (and "b")."""
    out = dict(layer)
    for block, (fused, names) in FUSED.items():
        if all(n in layer.get(block, {}) for n in names):
            group = {key: combine(key, [layer[block][n][key] for n in names]) for key in layer[block][names[0]]}
            out[block] = {fused: group, **{k: v for k, v in layer[block].items() if k not in names}}
    return out


def runtime_specs(cfg: ModelConfig, num_device: int) -> dict[str, Any]:
    """The declaration in the form the forward pass reads on `num_device` devices (`cfg` laid out for them).

    "layers" is a list of per-layer trees, each weight without its leading layer axis, and q/k/v (and gate/up
    when the MLP is gated) fused per device into "qkv" ("gate_up"): weights [D, N, F/N], biases [N, F/N], where
    device d's slice holds its own slice of every part side by side, so one matmul reads them. Everything is
    derived from `param_specs`.
    """
    def fused_spec(key: str, parts: list[ParamSpec]) -> ParamSpec:
        lead = parts[0].shape[:1] if key == "w" else ()
        features = sum(int(np.prod(p.shape[len(lead):])) for p in parts)
        return ParamSpec((*lead, num_device, features // num_device), ("embed",) * len(lead) + ("devices", None),
                         parts[0].dtype, inputs=parts[0].inputs, format=parts[0].format)

    def one_layer(s: ParamSpec) -> ParamSpec:
        return dataclasses.replace(s, shape=s.shape[1:], axes=s.axes[1:], inputs=tuple(a - 1 for a in s.inputs))

    specs = param_specs(cfg)
    layer = jax.tree.map(one_layer, specs["layers"], is_leaf=is_spec)
    return {**specs, "layers": [_fuse_blocks(layer, fused_spec)] * cfg.num_layers}


def runtime_layout(params: Mapping[str, Any], num_device: int) -> dict[str, Any]:
    """Stacked params (`param_specs` form) -> the `runtime_specs` form. Jittable (numpy or JAX arrays).

    The unrolled forward pass then reads each weight as it is stored (a slice of a stacked weight inside the
    decode program would copy it every step) and q/k/v and gate/up with one matmul each.
    """
    def fuse(key: str, parts: list[Any]) -> Any:
        lead = 1 if key == "w" else 0
        return quant.map_fields(lambda *fields: jnp.concatenate(
            [f.reshape(*f.shape[:lead], num_device, -1) for f in fields], axis=-1), *parts)

    def layer(x: Any, i: int) -> Any:
        return quant.map_fields(lambda a: a[i], x, axis=x.axis - 1 if quant.is_quant(x) else None)

    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [_fuse_blocks(jax.tree.map(lambda x, i=i: layer(x, i), layers,
                                                           is_leaf=quant.is_quant), fuse)
                                 for i in range(num_layers)]}


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; a list (per-layer weights) contributes its indices: "layers/0/attn/q/w"."""
    flat: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, list)):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *path, last = name.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> Params:
    """Random parameters following the declarations (for tests and the performance model's examples)."""
    flat = flatten(param_specs(cfg))
    keys = jax.random.split(key, len(flat))
    out = {}
    for k, (name, spec) in zip(keys, sorted(flat.items())):
        if spec.init == "ones":
            out[name] = jnp.ones(spec.shape, spec.dtype)
        elif spec.init == "zeros":
            out[name] = jnp.zeros(spec.shape, spec.dtype)
        elif spec.format is not None:
            values = scale * np.asarray(jax.random.normal(k, spec.shape, jnp.float32))
            out[name] = quant.quantize(values, spec.format, spec.packed_axis, spec.inputs)
        else:
            out[name] = scale * jax.random.normal(k, spec.shape, spec.dtype)
    return unflatten(out)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
    """The declared pytree as `jax.ShapeDtypeStruct`s, a QuantArray of them for each quantized weight."""
    def abstract(spec: ParamSpec) -> Any:
        stored = spec.field_specs() if spec.format is not None else spec
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), stored, is_leaf=is_spec)

    return jax.tree.map(abstract, param_specs(cfg), is_leaf=is_spec)


def check_params(params: Mapping[str, Any], cfg: ModelConfig, source: str = "params") -> None:
    """Raise `ValueError` naming every missing, unexpected or mis-shaped weight."""
    expected = flatten(param_specs(cfg))
    got = flatten(params)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = [f"{n}: expected {expected[n].shape}, got {tuple(got[n].shape)}"
           for n in sorted(set(expected) & set(got)) if tuple(got[n].shape) != expected[n].shape]
    bad += [f"{n}: expected the {expected[n].format or expected[n].dtype} format, got "
            f"{got[n].format if quant.is_quant(got[n]) else 'floats'}"
            for n in sorted(set(expected) & set(got))
            if quant.is_quant(got[n]) != (expected[n].format is not None)
            or (quant.is_quant(got[n]) and got[n].format != expected[n].format)]
    problems = []
    if missing:
        problems.append(f"missing weights {missing}")
    if extra:
        problems.append(f"unexpected weights {extra}")
    if bad:
        problems.append("wrong shapes: " + "; ".join(bad))
    if problems:
        raise ValueError(f"{source} does not match the {cfg.model_type} declaration: " + ", ".join(problems))


def total_bytes(cfg: ModelConfig) -> int:
    """Bytes of all declared weights."""
    return sum(spec.nbytes for spec in flatten(param_specs(cfg)).values())
