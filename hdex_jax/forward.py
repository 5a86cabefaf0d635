"""The one forward pass of every supported family, as pure functions, tensor-parallel over LPU devices.

`prefill_fn` and `decode_step_fn` both run `_forward` over a block of T tokens written to consecutive cache slots:
T = prompt bucket for prefill, T = 1 for decode. Families differ only through `ModelConfig` fields.

The layer loop is unrolled over a list of per-layer weights and per-layer cache arrays, with q/k/v and gate/up
fused into one matrix each (`params.runtime_layout`): on XLA CPU a `lax.scan` over stacked weights cost about 40%
more per token, a static slice out of a stack is a copy of the weight every step, and every matmul has a fixed
cost that fusing saves. docs/performance.md has the measurements.

`_forward` is the program of one LPU device inside `shard_map` over the mesh axis "lpu" (Megatron layout):
it holds 1/N of the query and KV heads, of the FFN and of the vocabulary. q/k/v and up/gate are
column-parallel; o and down are row-parallel and followed by `lax.psum` (the ESL sync); the embedding and the
LM head are vocab-parallel. With one device every collective is the identity.
`jax.named_scope` names follow the LPU's stages (embed, qkv, attention, ffn, esl_sync, lm_head) so profiles
and the performance model line up with the code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from hdex_jax import quant, rope
from hdex_jax.activations import ACTIVATIONS
from hdex_jax.config import ModelConfig
from hdex_jax.kv_cache import KVCache
from hdex_jax.matvec import batched_matmul, matmul
from hdex_jax.params import Params
from hdex_jax.sharding import LPU_AXIS, cache_partition_specs, make_mesh, param_partition_specs


def _norm(x: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32 as the references do, with whichever of
    scale and bias the family learns (`p` is empty for OLMo's non-parametric LayerNorm)."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
        y = (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)).astype(x.dtype)
    else:
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + cfg.norm_eps)
    if "scale" in p:
        y = y * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


def _clip(x: jax.Array) -> jax.Array:
    """float16 values held in range: a sum or product past 65504 is clipped to it, as Qualcomm's
    efficient-transformers does, instead of becoming inf (and NaN after the next subtraction). Other dtypes
    have float32's range and are returned as they are."""
    if x.dtype != jnp.float16:
        return x
    limit = jnp.finfo(jnp.float16).max
    return jnp.clip(x, -limit, limit)


def _dense(w: jax.Array | quant.QuantArray, dtype: jnp.dtype) -> jax.Array:
    """A weight as an array the einsum paths (the experts) can read: a quantized one dequantized in the program."""
    return quant.dequantize(w, dtype) if quant.is_quant(w) else w


def _qk_norm(x: jax.Array, p: dict, cfg: ModelConfig, kv: bool) -> jax.Array:
    """The norm of this device's q (or, with `kv`, k) heads [B, T, n, hd] before RoPE, with per-head scales
    [n, hd]: over each head's features, or (`qk_norm="all"`, RMSNorm) over all heads of the layer, whose sum of
    squares is then summed over the devices."""
    if cfg.qk_norm == "head":
        return _norm(x, p, cfg)
    x32 = x.astype(jnp.float32)
    total = _esl_sync(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True))  # [B, T, 1, 1]
    return (x32 * lax.rsqrt(total / cfg.qk_norm_size(kv) + cfg.norm_eps) * p["scale"]).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping cap * tanh(x / cap), which bounds scores smoothly; identity without a cap."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _linear(x: jax.Array, p: dict) -> jax.Array:
    """Replicated or column-parallel projection [B, T, D] @ [D, F]: each device computes its own features."""
    y = _clip(matmul(x, p["w"]))
    return _clip(y + p["b"]) if "b" in p else y


def _fused(x: jax.Array, p: dict) -> jax.Array:
    """Column-parallel projection by a fused matrix [D, 1, F] (this device's slice of [D, N, F]) -> [B, T, F]."""
    y = _clip(matmul(x, quant.map_fields(lambda a: a[:, 0], p["w"])))
    return _clip(y + p["b"][0]) if "b" in p else y


def _split_heads(qkv: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, T, (H + 2 KV) / N * hd] -> this device's q [B, T, H/N, hd], k and v [B, T, KV/N, hd]."""
    n = lax.axis_size(LPU_AXIS)
    heads, kv_heads, hd = cfg.num_heads // n, cfg.num_kv_heads // n, cfg.head_dim
    B, T, _ = qkv.shape
    q, k, v = jnp.split(qkv, [heads * hd, (heads + kv_heads) * hd], axis=-1)
    return q.reshape(B, T, heads, hd), k.reshape(B, T, kv_heads, hd), v.reshape(B, T, kv_heads, hd)


def _single_device() -> bool:
    """True inside a one-device mesh, where every collective is the identity and is left out of the program."""
    return lax.axis_size(LPU_AXIS) == 1


def _esl_sync(x: jax.Array) -> jax.Array:
    """Sum the devices' partial results: the LPU's ESL synchronisation."""
    if _single_device():
        return x
    with jax.named_scope("esl_sync"):
        return _clip(lax.psum(x, LPU_AXIS))


def _row_parallel(x: jax.Array, p: dict) -> jax.Array:
    """Projection whose input features are split: partial sums, synchronised, then the (replicated) bias.

    The weight's leading axes are the input features ([H, hd, D] for o, [F, D] for down), contracted with the
    same number of trailing axes of x, as one [in, D] matrix (reshaping a stored weight copies nothing)."""
    w = p["w"]
    x = x.reshape(*x.shape[: x.ndim - (len(w.shape) - 1)], -1)  # [B, T, in]
    matrix = quant.map_fields(lambda a: a.reshape(-1, a.shape[-1]), w, axis=0 if quant.is_quant(w) else None)
    y = _esl_sync(_clip(matmul(x, matrix)))  # [B, T, D]
    return _clip(y + p["b"]) if "b" in p else y


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, rope_dim] of the positions [B, T], with the configured scaling (`hdex_jax.rope`):
    built once per forward, shared by every layer."""
    return rope.tables(positions, cfg)


def _rope(x: jax.Array, tables: tuple[jax.Array, jax.Array] | None, cfg: ModelConfig) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout) on the first `rope_dim` features of each head; models with
    other positions pass `tables=None` and are returned unchanged."""
    # x: [B, T, N, hd]
    if tables is None:
        return x
    cos, sin = tables
    rd = cfg.rope_dim
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot.astype(jnp.float32) * cos + rotated_half.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1)


def _attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
               masks: tuple[jax.Array, jax.Array], alibi: jax.Array | None, cfg: ModelConfig,
               scored: int | None = None) -> jax.Array:
    """Grouped-query attention of a block of T queries over the cache slots written before it and the block's
    own keys and values (which are written to the cache only afterwards).

    `alibi` is the ALiBi bias of this device's heads [H, T, S + T], or None. `scored` (static) is how many
    leading cache slots can hold keys: a prompt pass scores only those (0 from slot 0 of an empty cache), not
    the empty slots after them; None scores all S.
    """
    # q: [B, T, H, hd]; k_cache, v_cache: [B, KV, S, hd]; k, v: [B, T, KV, hd]; masks: [B, T, S], [B, T, T]
    B, T, H, hd = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    qg = q.reshape(B, T, KV, G, hd)  # [B, T, KV, G, hd]
    seen = S if scored is None else scored  # cache slots scored
    k_seen, v_seen = (k_cache, v_cache) if seen == S else (k_cache[:, :, :seen], v_cache[:, :, :seen])
    parts = [jnp.einsum("btkgd,bukd->bkgtu", qg, k, preferred_element_type=jnp.float32)]  # [B, KV, G, T, T]
    if seen:
        # Each KV head's queries [G * T, hd] against its cache [seen, hd] as stored: one product per (row, KV head).
        queries = qg.transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
        parts.insert(0, batched_matmul(queries, k_seen, transposed=True, preferred_element_type=jnp.float32
                                       ).reshape(B, KV, G, T, seen))  # [B, KV, G, T, seen]
    scale = cfg.attention_scale if cfg.attention_scale is not None else hd ** -0.5
    scores = _softcap(jnp.concatenate(parts, axis=-1) * scale, cfg.attn_softcap)  # [B, KV, G, T, seen + T]
    if alibi is not None:
        scores = scores + jnp.concatenate([alibi[..., :seen], alibi[..., S:]], axis=-1).reshape(KV, G, T, seen + T)
    mask = jnp.concatenate([masks[0][..., :seen], masks[1]], axis=-1)[:, None, None]  # [B, 1, 1, T, seen + T]
    # A finite floor rather than -inf: padded query rows see no key, and must stay finite (not NaN).
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgtu,bukd->bkgtd", probs[..., seen:], v)  # [B, KV, G, T, hd]
    if seen:
        # The cache product keeps the cache's own [S, hd] layout: a result asked for as [B, T, ...] directly made
        # XLA transpose (copy) every layer's V cache each step.
        out = batched_matmul(probs[..., :seen].reshape(B, KV, G * T, seen), v_seen).reshape(B, KV, G, T, hd) + out
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def _moe(x: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """A sparse MLP (Mixtral, Qwen3-MoE): the router's top-k experts per token, weighted by their softmax
    probabilities, renormalised to sum to one unless `moe_renormalize` is off (as transformers routes).

    With fewer (token, expert) pairs than experts (decode's few rows), each token's k experts' matrices are
    gathered and only those are read: bytes per token in proportion to k / E. With more (a prompt), every expert is
    computed and the unchosen ones get weight zero, which adds exactly nothing and reads each expert once."""
    # x: [B, T, D]; router [D, E]; gate, up [E, D, F/N]; down [E, F/N, D]
    B, T, _ = x.shape
    K = cfg.experts_per_token
    logits = jnp.einsum("btd,de->bte", x, p["router"]["w"], preferred_element_type=jnp.float32)  # [B, T, E]
    top_probs, top_experts = lax.top_k(jax.nn.softmax(logits, axis=-1), K)  # [B, T, K]
    if cfg.moe_renormalize:
        top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    act = ACTIVATIONS[cfg.activation].fn
    if B * T * K < cfg.num_experts:
        def chosen(w: jax.Array | quant.QuantArray) -> jax.Array:
            """Only the chosen experts' matrices [B, T, K, ...] (a quantized stack's, then dequantized)."""
            axis = w.axis + top_experts.ndim - 1 if quant.is_quant(w) else None
            return _dense(quant.map_fields(lambda a: jnp.take(a, top_experts, axis=0), w, axis=axis), x.dtype)

        gate = jnp.einsum("btd,btkdf->btkf", x, chosen(p["gate"]["w"]))  # [B, T, K, F/N]
        up = jnp.einsum("btd,btkdf->btkf", x, chosen(p["up"]["w"]))
        hidden = _clip(act(gate) * up * top_probs.astype(x.dtype)[..., None])
        return _esl_sync(_clip(jnp.einsum("btkf,btkfd->btd", hidden, chosen(p["down"]["w"]))))  # [B, T, D]
    weights = jnp.sum(jax.nn.one_hot(top_experts, cfg.num_experts, dtype=jnp.float32) * top_probs[..., None],
                      axis=-2).astype(x.dtype)  # [B, T, E]
    gate = jnp.einsum("btd,edf->btef", x, _dense(p["gate"]["w"], x.dtype))  # [B, T, E, F/N]
    up = jnp.einsum("btd,edf->btef", x, _dense(p["up"]["w"], x.dtype))
    hidden = _clip(act(gate) * up * weights[..., None])
    return _esl_sync(_clip(jnp.einsum("btef,efd->btd", hidden, _dense(p["down"]["w"], x.dtype))))  # [B, T, D]


def _mlp(x: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    act = ACTIVATIONS[cfg.activation].fn
    if cfg.gated_mlp:
        gate, up = jnp.split(_fused(x, p["gate_up"]), 2, axis=-1)  # [B, T, F/N] each
        hidden = _clip(act(gate) * up)
    else:
        hidden = act(_linear(x, p["up"]))  # [B, T, F/N]
    return _row_parallel(hidden, p["down"])  # [B, T, D]


def _embed(params: Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    # Vocab-parallel lookup: each device holds rows [d * V/N, (d + 1) * V/N) and contributes zeros for the
    # tokens it does not hold.
    table = params["embed"]  # [V/N, E]
    local = tokens - lax.axis_index(LPU_AXIS) * table.shape[0]
    inside = (local >= 0) & (local < table.shape[0])
    rows = jnp.clip(local, 0, table.shape[0] - 1)  # [B, T]
    # A quantized table gives only the rows looked up, dequantized.
    found = quant.dequantize(quant.take_rows(table, rows), cfg.dtype) if quant.is_quant(table) else table[rows]
    x = _esl_sync(jnp.where(inside[..., None], found, 0))  # [B, T, E]
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    if cfg.projects_embeddings:
        x = matmul(x, params["project_in"])  # [B, T, D]
    if cfg.positions == "learned":
        x = x + params["pos_embed"][positions + cfg.position_offset]
    if cfg.embed_norm:
        x = _norm(x, params["embed_norm"], cfg)
    return x


def _lm_head(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and LM head of hidden states [..., D] -> logits [..., V] float32, gathered over the devices."""
    if cfg.final_norm:
        h = _norm(h, params.get("final_norm", {}), cfg)
    if cfg.projects_embeddings:
        h = matmul(h, params["project_out"])  # [..., E]
    # A tied head contracts the embedding [V/N, E] on E as it is stored: a transpose would copy it every step.
    if cfg.tie_embeddings:
        local = matmul(h, params["embed"], transposed=True, preferred_element_type=jnp.float32)  # [..., V/N]
    else:
        local = matmul(h, params["lm_head"]["w"], preferred_element_type=jnp.float32)
    if cfg.lm_head_bias:
        local = local + params["lm_head"]["b"]
    if cfg.logit_scale is not None:
        local = local * cfg.logit_scale
    local = _softcap(local, cfg.final_softcap)
    if not _single_device():
        with jax.named_scope("esl_sync"):
            local = lax.all_gather(local, LPU_AXIS, axis=local.ndim - 1, tiled=True)  # [..., V + padding]
    return local[..., : cfg.vocab_size]


# A layer's attention or MLP as its kind's function calls it: the sublayer's input -> its output [B, T, D].
Sublayer = Callable[[jax.Array], jax.Array]


def _add(h: jax.Array, out: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The residual add of a sequential layer's sublayer output, scaled first for Granite."""
    if cfg.residual_scale is not None:
        out = out * cfg.residual_scale
    return _clip(h + out)


def _pre_norm(h: jax.Array, lp: Params, attend: Sublayer, ffn: Sublayer, cfg: ModelConfig) -> jax.Array:
    """h + attn(ln1 h), then + mlp(ln2 h): most families."""
    h = _add(h, attend(_norm(h, lp.get("ln1", {}), cfg)), cfg)
    return _add(h, ffn(_norm(h, lp.get("ln2", {}), cfg)), cfg)


def _post_norm(h: jax.Array, lp: Params, attend: Sublayer, ffn: Sublayer, cfg: ModelConfig) -> jax.Array:
    """The norm after each residual add: OPT-350m."""
    h = _norm(_add(h, attend(h), cfg), lp.get("ln1", {}), cfg)
    return _norm(_add(h, ffn(h), cfg), lp.get("ln2", {}), cfg)


def _sandwich(h: jax.Array, lp: Params, attend: Sublayer, ffn: Sublayer, cfg: ModelConfig) -> jax.Array:
    """Pre-norm with each sublayer's output normed too before the add: Gemma 2, Gemma 3."""
    h = _add(h, _norm(attend(_norm(h, lp.get("ln1", {}), cfg)), lp.get("ln1_post", {}), cfg), cfg)
    return _add(h, _norm(ffn(_norm(h, lp.get("ln2", {}), cfg)), lp.get("ln2_post", {}), cfg), cfg)


def _output_norm(h: jax.Array, lp: Params, attend: Sublayer, ffn: Sublayer, cfg: ModelConfig) -> jax.Array:
    """Only each sublayer's output normed before the add: OLMo 2, EXAONE 4."""
    h = _add(h, _norm(attend(h), lp.get("ln1_post", {}), cfg), cfg)
    return _add(h, _norm(ffn(h), lp.get("ln2_post", {}), cfg), cfg)


def _parallel(h: jax.Array, lp: Params, attend: Sublayer, ffn: Sublayer, cfg: ModelConfig) -> jax.Array:
    """h + attn(ln1 h) + mlp(ln2 h): GPT-NeoX, Falcon-40B."""
    return _clip(_clip(h + attend(_norm(h, lp.get("ln1", {}), cfg))) + ffn(_norm(h, lp.get("ln2", {}), cfg)))


def _parallel_shared_norm(h: jax.Array, lp: Params, attend: Sublayer, ffn: Sublayer, cfg: ModelConfig) -> jax.Array:
    """h + attn(ln1 h) + mlp(ln1 h): GPT-J, Phi, Falcon-7B, Cohere, StableLM."""
    x = _norm(h, lp.get("ln1", {}), cfg)
    return _clip(_clip(h + attend(x)) + ffn(x))


# ModelConfig.layer -> the layer's residual stream and norms around its attention and MLP (hdex_jax.config.Layer).
_LAYERS: dict[str, Callable[[jax.Array, Params, Sublayer, Sublayer, ModelConfig], jax.Array]] = {
    "pre_norm": _pre_norm,
    "post_norm": _post_norm,
    "sandwich": _sandwich,
    "output_norm": _output_norm,
    "parallel": _parallel,
    "parallel_shared_norm": _parallel_shared_norm,
}


def _layer(h: jax.Array, lp: Params, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array,
           tables: tuple[jax.Array, jax.Array] | None, masks: tuple[jax.Array, jax.Array], alibi: jax.Array | None,
           cfg: ModelConfig, scored: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer over T tokens, of the kind `cfg.layer`; writes their keys/values at slots
    [start, start + T) of its cache. `tables` is None for a layer without RoPE.
    """
    # h: [B, T, D]; k_cache, v_cache: [B, KV, S, hd]; masks: [B, T, S] over the cache, [B, T, T] in the block
    caches = []

    def attend(x: jax.Array) -> jax.Array:
        with jax.named_scope("qkv"):
            q, k, v = _split_heads(_fused(x, lp["attn"]["qkv"]), cfg)  # [B, T, H/N, hd], [B, T, KV/N, hd] x 2
            if cfg.qk_norm != "none":
                q = _qk_norm(q, lp["attn"]["q_norm"], cfg, kv=False)
                k = _qk_norm(k, lp["attn"]["k_norm"], cfg, kv=True)
            q, k = _rope(q, tables, cfg), _rope(k, tables, cfg)
        with jax.named_scope("attention"):
            attn = _attention(q, k_cache, v_cache, k, v, masks, alibi, cfg, scored)  # [B, T, H, hd]
            attn = _row_parallel(attn, lp["attn"]["o"])  # [B, T, D]
            # Written after attention has read the cache: the update is then done in place (with
            # COMPILER_OPTIONS), where updating first and reading the result made XLA copy the cache every step.
            caches.extend(lax.dynamic_update_slice(cache, new.transpose(0, 2, 1, 3), (0, 0, start, 0))
                          for cache, new in ((k_cache, k), (v_cache, v)))
        return attn

    def ffn(x: jax.Array) -> jax.Array:
        with jax.named_scope("ffn"):
            return _ffn(x, lp, cfg)

    h = _LAYERS[cfg.layer](h, lp, attend, ffn, cfg)
    return h, *caches


def _ffn(x: jax.Array, lp: Params, cfg: ModelConfig) -> jax.Array:
    """The layer's MLP, dense or mixture of experts."""
    return _moe(x, lp["moe"], cfg) if cfg.num_experts else _mlp(x, lp["mlp"], cfg)


def _forward(params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array,
             cfg: ModelConfig, scored: int | None = None, every_position: bool = False
             ) -> tuple[jax.Array, KVCache]:
    """Run T tokens written at slots [cache.next_slot, +T); return the last token's logits [B, V] (or, with
    `every_position`, every token's [B, T, V]) and the cache. `scored`: the cache slots that can hold keys (see
    `_attention`)."""
    # tokens, positions: [B, T]; key_valid: [B, S] after this block's slots are marked
    T = tokens.shape[1]
    S = cache.max_length
    start = cache.next_slot
    with jax.named_scope("embed"):
        h = _embed(params, tokens, positions, cfg)  # [B, T, D]
    tables = rope_tables(positions, cfg) if cfg.positions == "rope" else None
    local_tables = tables
    if tables is not None and cfg.rope_local_theta is not None:
        local_tables = rope_tables(positions, dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta,
                                                                  rope_scaling=()))

    q_slot = start + jnp.arange(T)  # [T]
    # Distance of every key (the S cache slots, then the block's T) from each query, in slots: [T, S + T].
    # Within a row, slots and positions differ by the row's padding only, so this is the position distance.
    distance = jnp.concatenate([jnp.arange(S), q_slot])[None, :] - q_slot[:, None]
    block_valid = lax.dynamic_slice_in_dim(key_valid, start, T, axis=1)  # [B, T]
    valid = jnp.concatenate([(jnp.arange(S) < start)[None, :] & key_valid, block_valid], axis=1)  # [B, S + T]

    def masks(window: int | None) -> tuple[jax.Array, jax.Array]:
        """Causal masks of the keys a query may see, over the cache [B, T, S] and the block [B, T, T]."""
        seen = (distance <= 0) & (-distance < (window or S + T))  # [T, S + T]
        both = seen[None] & valid[:, None, :]
        return both[..., :S], both[..., S:]

    windows = {cfg.window(i) for i in range(cfg.num_layers)}
    layer_masks = {window: masks(window) for window in windows}
    alibi = None
    if cfg.positions == "alibi":
        # ALiBi adds slope * (key position - query position); softmax makes it equal to Bloom's slope * key
        # position and to MPT's form.
        alibi = params["alibi_slopes"][:, None, None] * distance.astype(jnp.float32)  # [H/N, T, S + T]

    k_out, v_out = [], []
    for i, (lp, k_cache, v_cache) in enumerate(zip(params["layers"], cache.k, cache.v)):
        layer_tables = None if not cfg.rotates(i) else tables if cfg.window(i) is None else local_tables
        h, k_cache, v_cache = _layer(h, lp, k_cache, v_cache, start, layer_tables, layer_masks[cfg.window(i)],
                                     alibi, cfg, scored)
        k_out.append(k_cache)
        v_out.append(v_cache)
    with jax.named_scope("lm_head"):
        logits = _lm_head(params, h if every_position else h[:, -1], cfg)  # [B, T, V] or [B, V]
    cache = cache.replace(k=tuple(k_out), v=tuple(v_out), valid=key_valid, next_slot=start + T)
    return logits, cache


# Tokens of one block of a prompt pass (`_prefill_local`): longer prompts run block after block through the cache.
PROMPT_BLOCK = 512


def prefill_positions(mask: jax.Array) -> jax.Array:
    """Hugging Face position ids of a left-padded batch: cumsum(mask) - 1, padding clamped to 0."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def _on_mesh(fn, cfg: ModelConfig, mesh: Mesh | None, num_inputs: int):
    """`fn(params, cache, *inputs)` as one program per device: params and cache split by the sharding rules,
    inputs and logits replicated."""
    mesh = mesh if mesh is not None else make_mesh(1)
    replicated = PartitionSpec()
    cache_specs = cache_partition_specs(cfg)
    # check_vma is off because JAX cannot infer that all_gather's result (the logits) is replicated.
    return jax.shard_map(functools.partial(fn, cfg=cfg), mesh=mesh,
                         in_specs=(param_partition_specs(cfg, mesh.size), cache_specs, *[replicated] * num_inputs),
                         out_specs=(replicated, cache_specs), check_vma=False)


def prefill_fn(params: Params, cache: KVCache, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig,
               mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Prompt pass over a fresh cache: left-padded tokens [B, T] with mask [B, T] -> last logits [B, V].

    `params` must be laid out for the mesh's device count (`layout.padded_config`) with per-layer weights
    (`params.runtime_layout`); mesh None is one device.
    """
    return _on_mesh(_prefill_local, cfg, mesh, 2)(params, cache, tokens, mask)


def decode_step_fn(params: Params, cache: KVCache, token: jax.Array, cfg: ModelConfig,
                   mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """One token per row [B] at the next slot -> logits [B, V] and the advanced cache."""
    return _on_mesh(_decode_local, cfg, mesh, 1)(params, cache, token)


def score_fn(params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array,
             cfg: ModelConfig, mesh: Mesh | None = None, scored: int | None = None) -> tuple[jax.Array, KVCache]:
    """Scoring pass of a block: tokens [B, T] with their positions [B, T] at slots [cache.next_slot, +T), where
    `key_valid` [B, S] marks the real tokens' slots -> logits of every position [B, T, V] and the cache.
    `scored` (static: the block starts at that slot, after the blocks before it) leaves the empty slots after it
    out of attention."""
    local = functools.partial(_forward, scored=scored, every_position=True)
    return _on_mesh(local, cfg, mesh, 3)(params, cache, tokens, positions, key_valid)


def _prefill_local(params: Params, cache: KVCache, tokens: jax.Array, mask: jax.Array,
                   cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """The prompt in blocks of PROMPT_BLOCK tokens, each attending to the slots of the blocks before it: a causal
    prompt pass scores about half of a single block's T x T (docs/performance.md, "The prompt pass")."""
    T = tokens.shape[1]
    mask = mask.astype(bool)
    positions = prefill_positions(mask)  # [B, T]
    key_valid = jnp.zeros(cache.valid.shape, bool).at[:, :T].set(mask)  # [B, S]
    for start in range(0, T, PROMPT_BLOCK):
        block = slice(start, start + PROMPT_BLOCK)
        cache = cache.replace(next_slot=jnp.asarray(start, jnp.int32))
        logits, cache = _forward(params, cache, tokens[:, block], positions[:, block], key_valid, cfg, scored=start)
    return logits, cache.replace(next_pos=jnp.sum(mask, axis=-1, dtype=jnp.int32))


def _decode_local(params: Params, cache: KVCache, token: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    key_valid = cache.valid.at[:, cache.next_slot].set(True)  # [B, S]
    logits, cache = _forward(params, cache, token[:, None], cache.next_pos[:, None], key_valid, cfg)
    return logits, cache.replace(next_pos=cache.next_pos + 1)
