"""Generic key-map machinery: checkpoint tensors -> canonical flat params.

A key map is a list of `Rule`s: a regex over the checkpoint's tensor name, the canonical name it becomes
(or None to drop it on purpose) and a transform from the checkpoint's layout to the canonical one. A rule
whose regex has a `layer` group maps one layer of a per-layer weight; those are stacked into `[L, ...]`.

The mapping is strict, because a silently skipped or doubled tensor gives a model that runs but is wrong:
every checkpoint tensor must match exactly one rule, every declared weight (and every layer of it) must be
found exactly once, every transformed tensor must have the shape `param_specs` declares, and every value
must be finite (a NaN or inf weight converts and runs, and silently turns every output into garbage).

Mixture-of-experts checkpoints store one tensor per expert (Mixtral's `experts.3.w1.weight`): a rule whose
regex also has an `expert` group maps one expert of one layer of a weight declared `[L, experts, ...]`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from converters.errors import CheckpointError
from hdex_jax import quant
from hdex_jax.config import ModelConfig
from hdex_jax.params import ParamSpec, flatten, is_spec, param_specs

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]

_LAYER_GROUP = r"(?P<layer>\d+)"
_EXPERT_GROUP = r"(?P<expert>\d+)"


def keep(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Checkpoint layout is already canonical (embeddings, norms, output biases)."""
    return x


def transpose(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Torch Linear weight `[out, in]` -> canonical `[in, out]`."""
    return x.T


def q_in(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Query projection `[H*hd, D]` -> `[D, H, hd]`."""
    return x.T.reshape(x.shape[1], cfg.num_heads, cfg.head_dim)


def kv_in(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Key/value projection `[KV*hd, D]` -> `[D, KV, hd]`."""
    return x.T.reshape(x.shape[1], cfg.num_kv_heads, cfg.head_dim)


def q_bias(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Query bias `[H*hd]` -> `[H, hd]`."""
    return x.reshape(cfg.num_heads, cfg.head_dim)


def kv_bias(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Key/value bias `[KV*hd]` -> `[KV, hd]`."""
    return x.reshape(cfg.num_kv_heads, cfg.head_dim)


def o_out(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Output projection `[D, H*hd]` -> `[H, hd, D]`."""
    return x.T.reshape(cfg.num_heads, cfg.head_dim, x.shape[0])


def compose(*transforms: Transform) -> Transform:
    """Apply `transforms` left to right."""

    def composed(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        for transform in transforms:
            x = transform(x, cfg)
        return x

    return composed


@dataclasses.dataclass(frozen=True)
class Rule:
    """One entry of a key map.

    `pattern` must match the whole tensor name; a group written `(?P<layer>\\d+)` carries the layer index, and
    one written `(?P<expert>\\d+)` (with a layer group) the expert index of a per-expert tensor.
    `target` is the canonical name, or None for a tensor that is known and deliberately not used. A fused
    tensor (GPT-2's `c_attn`, Phi-3's `gate_up_proj`, ...) has a tuple of targets, and its transform returns
    one array per target, in order.
    """

    pattern: str
    target: str | tuple[str, ...] | None
    transform: Transform = keep

    @property
    def targets(self) -> tuple[str, ...]:
        """The canonical names this rule provides (none for an ignored tensor)."""
        if self.target is None:
            return ()
        return (self.target,) if isinstance(self.target, str) else self.target

    @property
    def regex(self) -> re.Pattern[str]:
        """The compiled pattern."""
        return re.compile(self.pattern)

    @property
    def per_layer(self) -> bool:
        """Whether the rule maps one layer of a stacked per-layer weight."""
        return _LAYER_GROUP in self.pattern

    @property
    def per_expert(self) -> bool:
        """Whether the rule maps one expert of one layer of a stacked `[L, experts, ...]` weight."""
        return _EXPERT_GROUP in self.pattern

    def example(self, layer: int | None = None) -> str:
        """A readable tensor name this rule expects, for error messages (optional prefixes in brackets)."""
        text = self.pattern.replace(_LAYER_GROUP, str(layer) if layer is not None else "N")
        text = text.replace(_EXPERT_GROUP, "E")
        text = re.sub(r"\(\?:([^()]*)\)\?", r"[\1]", text)
        return text.replace("\\", "")


@dataclasses.dataclass(frozen=True)
class Derived:
    """A declared array that no checkpoint stores, computed from the config (ALiBi's per-head slopes)."""

    target: str
    compute: Callable[[ModelConfig], np.ndarray]


def ignore(pattern: str) -> Rule:
    """A rule for a tensor that is known and dropped (e.g. a rotary inv_freq buffer, a tied lm_head)."""
    return Rule(pattern, None)


class TensorSource(Protocol):
    """A checkpoint's tensors, read lazily one at a time so only the canonical result is fully in memory."""

    @property
    def checkpoint(self) -> str:
        """The checkpoint (directory or file), for error messages."""
        ...

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint (each once)."""
        ...

    def location(self, name: str) -> str:
        """The file holding `name`, for error messages."""
        ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 numpy, in the checkpoint's own layout."""
        ...


@dataclasses.dataclass(frozen=True)
class _Match:
    name: str
    rule: Rule
    layer: int | None
    expert: int | None = None

    @property
    def index(self) -> tuple[int, ...]:
        """Where the tensor goes in its stacked target: (), (layer,) or (layer, expert)."""
        return tuple(i for i in (self.layer, self.expert) if i is not None)


def _match_all(source: TensorSource, rules: Sequence[Rule]) -> list[_Match]:
    """Match every tensor to exactly one rule; raise naming any tensor that matches none or several."""
    compiled = [(rule, rule.regex) for rule in rules]
    matches, unmapped = [], []
    for name in source.names():
        hits = [(rule, m) for rule, regex in compiled if (m := regex.fullmatch(name))]
        if not hits:
            unmapped.append(f"{name} (in {source.location(name)})")
            continue
        if len(hits) > 1:
            raise CheckpointError(f"tensor {name} (in {source.location(name)}) matches several key-map rules: "
                                  f"{[rule.pattern for rule, _ in hits]}")
        rule, m = hits[0]
        layer = int(m.group("layer")) if rule.per_layer else None
        expert = int(m.group("expert")) if rule.per_expert else None
        matches.append(_Match(name, rule, layer, expert))
    if unmapped:
        raise CheckpointError(f"{source.checkpoint} has unmapped tensors (no converter rule for them): "
                              f"{', '.join(unmapped)}")
    return matches


# (canonical name, layer or None, expert or None): one slot a checkpoint tensor fills.
_Key = tuple[str, int | None, int | None]


def _plan(source: TensorSource, rules: Sequence[Rule], cfg: ModelConfig) -> dict[_Key, _Match]:
    """(canonical name, layer, expert) -> the tensor that provides it, checking for extra, duplicate and missing
    ones. The expert is None except for per-expert tensors; a layer of an expert stack comes either whole or
    one tensor per expert."""
    specs = flatten(param_specs(cfg))
    derived = {rule.target for rule in rules if isinstance(rule, Derived)}
    plan: dict[_Key, _Match] = {}
    for match in _match_all(source, [rule for rule in rules if isinstance(rule, Rule)]):
        where = f"{match.name} (in {source.location(match.name)})"
        for target in match.rule.targets:
            if target not in specs:
                raise CheckpointError(f"tensor {where} maps to {target!r}, which this {cfg.model_type} "
                                      f"configuration does not have (config and weights disagree)")
            if (specs[target].axes[0] == "layers") != match.rule.per_layer:
                raise ValueError(f"key-map rule {match.rule.pattern!r} and the declaration of {target!r} disagree "
                                 f"on whether it is per-layer")
            if match.rule.per_expert and specs[target].axes[1] != "experts":
                raise ValueError(f"key-map rule {match.rule.pattern!r} is per-expert, but {target!r} is not "
                                 f"declared with an experts axis")
            if match.layer is not None and match.layer >= cfg.num_layers:
                raise CheckpointError(f"tensor {where} is for layer {match.layer}, but the config has "
                                      f"{cfg.num_layers} layers")
            if match.expert is not None and match.expert >= cfg.num_experts:
                raise CheckpointError(f"tensor {where} is for expert {match.expert}, but the config has "
                                      f"{cfg.num_experts} experts")
            # A whole layer and one of its experts overlap too.
            clashes = [(target, match.layer, match.expert)]
            if match.rule.per_expert:
                clashes.append((target, match.layer, None))
            elif match.layer is not None and specs[target].axes[1:2] == ("experts",):
                clashes += [(target, match.layer, e) for e in range(cfg.num_experts)]
            for key in clashes:
                if key in plan:
                    other = plan[key].name
                    at = "".join(f" {what} {i}" for what, i in (("layer", match.layer), ("expert", match.expert))
                                 if i is not None)
                    raise CheckpointError(f"duplicate tensors for {target!r}{at}: {other} (in "
                                          f"{source.location(other)}) and {where}")
            plan[(target, match.layer, match.expert)] = match

    by_target = {target: rule for rule in reversed(rules) if isinstance(rule, Rule) for target in rule.targets}
    missing = []
    for target, spec in specs.items():
        if target in derived:
            continue
        layers: list[int | None] = list(range(cfg.num_layers)) if spec.axes[0] == "layers" else [None]
        experts = range(cfg.num_experts) if spec.axes[1:2] == ("experts",) else range(0)
        for layer in layers:
            if (target, layer, None) not in plan and not (
                    experts and all((target, layer, e) in plan for e in experts)):
                rule = by_target.get(target)
                missing.append(f"{rule.example(layer) if rule else target} (for {target!r}"
                               f"{'' if layer is None else f' layer {layer}'})")
    if missing:
        raise CheckpointError(f"{source.checkpoint} is missing tensors: {', '.join(missing)}")
    return plan


def _check_value(value: Any, expected: tuple[int, ...], target: str, raw: np.ndarray | None, where: str) -> None:
    if tuple(value.shape) != expected:
        raise CheckpointError(f"tensor {where} has shape {value.shape if raw is None else raw.shape}; as "
                              f"{target!r} it should be {expected} but is {value.shape}")
    if quant.is_quant(value):  # the integers are finite; its scales and offsets may not be
        value = np.concatenate([np.ravel(f).astype(np.float32) for f in (value.scale, value.offset)
                                if f is not None])
    if not np.isfinite(value).all():
        raise CheckpointError(f"tensor {where} has {int(np.isnan(value).sum())} NaN and "
                              f"{int(np.isinf(value).sum())} infinite value(s); the checkpoint is corrupt or "
                              f"overflowed its dtype")


def _stored_formats(source: TensorSource, plan: dict[_Key, _Match], cfg: ModelConfig) -> dict[str, str]:
    """The weights a source keeps in a quantized format (GGUF blocks): those whose every tensor is stored in
    the same kept format. Tensors of other quantized types are dequantized, said once per type."""
    stored_format = getattr(source, "stored_format", None)
    if stored_format is None:
        return {}
    specs = flatten(param_specs(cfg))
    by_target: dict[str, set[str | None]] = {}
    for (target, _, _), match in plan.items():
        by_target.setdefault(target, set()).add(stored_format(match.name))
    kept = {target: next(iter(formats)) for target, formats in by_target.items()
            if len(formats) == 1 and None not in formats and specs[target].inputs
            and specs[target].shape[specs[target].packed_axis] % quant.GROUP == 0}
    dequantized: dict[str, list[str]] = {}
    for (target, _, _), match in plan.items():
        kind = source.stored_type(match.name)
        if target not in kept and kind not in ("F32", "F16", "BF16", "F64"):
            dequantized.setdefault(kind, []).append(match.name)
    for kind, names in sorted(dequantized.items()):
        print(f"[hdex] {len(names)} GGUF tensors of type {kind} (e.g. {names[0]}) are dequantized: only Q8_0, "
              f"Q4_0 and Q4_1 weights whose blocks fit the model's layout are kept as stored",
              file=sys.stderr, flush=True)
    return kept


def _read_quantized(source: TensorSource, match: _Match, cfg: ModelConfig, specs: dict[str, ParamSpec]
                    ) -> tuple[quant.QuantArray, ...] | None:
    """A kept tensor's blocks through the rule's layout transform, packed along each target's input axis; None
    when the transform splits a group (it reorders the input features within a block)."""
    stored = source.read_quantized(match.name)
    fields = quant.expand(stored)
    transformed = [match.rule.transform(field, cfg) if field is not None else None for field in fields]
    fused = isinstance(match.rule.target, tuple)
    per_target = zip(*(t if fused else (t,) for t in transformed if t is not None))
    out = []
    for target, parts in zip(match.rule.targets, per_target, strict=True):
        ints, scale, *offset = parts
        axis = specs[target].packed_axis - len(match.index)
        packed = quant.regroup(ints, scale, offset[0] if offset else None, stored.format, axis)
        if packed is None:
            return None
        out.append(packed)
    return tuple(out)


def convert(source: TensorSource, rules: Sequence[Rule | Derived], cfg: ModelConfig,
            progress: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Read and transform every tensor of `source` into the flat canonical params of `cfg`: float32 numpy, and
    `quant.QuantArray` for the weights the source stores in a kept quantized format (GGUF Q8_0, Q4_0, Q4_1,
    named in the returned config's `weight_formats`).

    All names are matched and checked before any tensor data is read, so a bad checkpoint fails fast; a tensor
    with NaN or infinite values is a CheckpointError naming it. Each tensor is read once, also when a fused
    tensor provides several canonical weights.
    """
    plan = _plan(source, rules, cfg)
    cfg = dataclasses.replace(cfg, weight_formats=tuple(sorted(_stored_formats(source, plan, cfg).items())))
    specs = flatten(param_specs(cfg))
    out = {target: np.empty(spec.shape, np.float32) if spec.format is None else
           jax.tree.map(lambda f: np.empty(f.shape, f.dtype), spec.field_specs(), is_leaf=is_spec)
           for target, spec in specs.items()}
    matches = sorted({match.name: match for match in plan.values()}.values(), key=lambda m: m.name)
    for match in tqdm(matches, desc="converting", unit="tensor", disable=not progress):
        where = f"{match.name} (in {source.location(match.name)})"
        targets = match.rule.targets
        kept = None
        if specs[targets[0]].format is not None:
            kept = _read_quantized(source, match, cfg, specs)
            if kept is None:
                raise CheckpointError(f"tensor {where}: its layout transform splits its quantized blocks")
        raw = source.read(match.name) if kept is None else None
        try:
            values = kept if kept is not None else match.rule.transform(raw, cfg)
        except ValueError as e:  # a reshape into heads that cannot work: the tensor has the wrong size
            raise CheckpointError(f"tensor {where} has shape {raw.shape}, which does not fit {list(targets)}: "
                                  f"{e}") from e
        values = values if isinstance(match.rule.target, tuple) or kept is not None else (values,)
        for target, value in zip(targets, values, strict=True):
            shape = specs[target].shape
            _check_value(value, shape[len(match.index):], target, raw, where)
            if quant.is_quant(value):
                for field, part in zip(jax.tree.leaves(out[target]), jax.tree.leaves(value)):
                    field[match.index] = part
            else:
                out[target][match.index] = value
    for rule in rules:
        if isinstance(rule, Derived) and rule.target in specs:
            out[rule.target][...] = rule.compute(cfg)
    return cfg, out


# The fused q/k/v targets (their `/w` and `/b` weights), for `linear` over a fused tensor.
QKV = ("layers/attn/q", "layers/attn/k", "layers/attn/v")


def linear(pattern: str, target: str | tuple[str, ...], weight: Transform = transpose,
           bias: Transform = keep) -> list[Rule]:
    """The weight and bias rules of one (possibly fused) linear layer: `pattern.weight` -> `target/w` and
    `pattern.bias` -> `target/b` (each target of a tuple). The bias rule is always listed; a bias the config does
    not declare is an error, a bias the checkpoint does not have is fine when the config does not declare it."""
    def names(suffix: str) -> str | tuple[str, ...]:
        return f"{target}/{suffix}" if isinstance(target, str) else tuple(f"{t}/{suffix}" for t in target)

    return [Rule(pattern + r"\.weight", names("w"), weight), Rule(pattern + r"\.bias", names("b"), bias)]


def norm(pattern: str, target: str, scale: Transform = keep, bias: bool = True) -> list[Rule]:
    """The rules of one norm: `pattern.weight` -> `target/scale` and, unless `bias` is false (RMSNorm),
    `pattern.bias` -> `target/bias`."""
    rules = [Rule(pattern + r"\.weight", f"{target}/scale", scale)]
    if bias:
        rules.append(Rule(pattern + r"\.bias", f"{target}/bias", keep))
    return rules


def lm_head(cfg: ModelConfig, pattern: str = r"lm_head\.weight") -> Rule:
    """The LM head's weight (an nn.Linear), or for a tied head an ignored tensor: a tied checkpoint may still
    carry a copy of the embedding as the head's weight."""
    return ignore(pattern) if cfg.tie_embeddings else Rule(pattern, "lm_head/w", transpose)


def gated_mlp(layer: str, bias: bool = False) -> list[Rule]:
    """The gated MLP of a Llama-like block (`mlp.{gate,up,down}_proj.weight` under the per-layer prefix `layer`),
    and with `bias` their bias rules too."""
    rules = []
    for name in ("gate", "up", "down"):
        weight, bias_rule = linear(layer + rf"mlp\.{name}_proj", f"layers/mlp/{name}")
        rules += [weight, bias_rule] if bias else [weight]
    return rules


def qkv_rules(layer: str) -> list[Rule]:
    """The q/k/v projections of a Hugging Face attention block (`self_attn.{q,k,v}_proj.{weight,bias}` under
    the per-layer prefix `layer`), which Llama-like models and OPT name alike."""
    return [*linear(layer + r"self_attn\.q_proj", "layers/attn/q", q_in, q_bias),
            *linear(layer + r"self_attn\.k_proj", "layers/attn/k", kv_in, kv_bias),
            *linear(layer + r"self_attn\.v_proj", "layers/attn/v", kv_in, kv_bias)]


def _head_scales(x: np.ndarray, heads: int, cfg: ModelConfig) -> np.ndarray:
    """A q/k norm weight -> per-head scales `[heads, hd]`: one `[hd]` shared by every head (Qwen3, Gemma 3) is
    repeated, `[heads * hd]` (OLMo 2, over all heads) or `[heads, hd]` (Cohere) is reshaped."""
    return np.broadcast_to(x.reshape(-1, cfg.head_dim), (heads, cfg.head_dim)).copy()


def q_scales(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A query norm's weight -> `[H, hd]` (`_head_scales`)."""
    return _head_scales(x, cfg.num_heads, cfg)


def kv_scales(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A key norm's weight -> `[KV, hd]` (`_head_scales`)."""
    return _head_scales(x, cfg.num_kv_heads, cfg)


def qk_norms(layer: str, scale: Transform = keep) -> list[Rule]:
    """The q and k norms of a Hugging Face attention block (`self_attn.{q,k}_norm.weight` under the per-layer
    prefix `layer`), their weights mapped by `scale` (e.g. Gemma's `1 + w`) and then to per-head scales."""
    return [Rule(layer + r"self_attn\.q_norm\.weight", "layers/attn/q_norm/scale", compose(scale, q_scales)),
            Rule(layer + r"self_attn\.k_norm\.weight", "layers/attn/k_norm/scale", compose(scale, kv_scales))]
