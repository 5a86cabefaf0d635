"""What a program synchronises and stores per device, read from the program and the arrays themselves.

`collective_bytes` traces a function to a jaxpr and adds up the payload of every collective in it, so the
numbers follow the code as it is, not a retyped formula. `sync_bytes_per_token` applies it to one decode step
of a loaded model; `param_bytes_per_device` sums the weight shards each device actually holds.

What one collective counts (its payload, per device, per execution), from the avals of its equation. Inside
`shard_map` the avals are per device, so this is what one device puts into or gets out of the collective:

- all-reduce family (psum, psum_invariant, pmax, pmin): the bytes of its operands, i.e. the vector each
  device contributes and receives back summed (the partial sums of a row-parallel layer);
- all-gather family (all_gather, all_gather_invariant): the bytes of its result, the whole gathered array
  each device ends up with (for the logits: the full vocabulary row, not one device's slice);
- reduce_scatter, ppermute, all_to_all, ragged_all_to_all, pbroadcast: the bytes of their operands.

This is the payload `hdex_jax.lpu` costs an ESL sync by (the full vector synchronised), not bytes on a wire:
how many of them cross links depends on the algorithm and topology, which is the performance model's business.

Control flow: a `scan` body counts `length` times; a `cond` counts its costliest branch (the most bytes), an
upper bound of what one execution synchronises; a `while_loop`'s trip count is unknown when tracing, so its
condition and body count once each (one iteration). Every other sub-jaxpr (jit, shard_map, custom_jvp/vjp,
remat) counts once per execution of its equation.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, jaxprs_in_params

from hdex_jax.kv_cache import init_cache
from hdex_jax.forward import decode_step_fn

if TYPE_CHECKING:
    from hdex_jax.transformers.modeling import LPUModelForCausalLM

# Collectives whose payload is the operands, and those whose payload is the gathered result.
OPERAND_COLLECTIVES = frozenset({"psum", "psum_invariant", "pmax", "pmin", "reduce_scatter", "ppermute",
                                 "all_to_all", "ragged_all_to_all", "pbroadcast"})
RESULT_COLLECTIVES = frozenset({"all_gather", "all_gather_invariant"})
COLLECTIVES = OPERAND_COLLECTIVES | RESULT_COLLECTIVES


@dataclasses.dataclass(frozen=True)
class CollectiveBytes:
    """Payload bytes per device of the collectives one execution of a program runs (see the module doc).

    `identity_bytes` is the part of the total in collectives over a group of one device: such a collective is
    the identity and nothing leaves the device (a one-device mesh still traces its psums).
    """

    by_primitive: Mapping[str, int] = dataclasses.field(default_factory=dict)  # primitive name -> bytes
    calls: Mapping[str, int] = dataclasses.field(default_factory=dict)  # primitive name -> executions
    identity_bytes: int = 0

    @property
    def total(self) -> int:
        """Payload bytes of every collective in the program, as traced."""
        return sum(self.by_primitive.values())

    @property
    def across_devices(self) -> int:
        """Payload bytes of the collectives over more than one device: what is actually synchronised."""
        return self.total - self.identity_bytes

    def __add__(self, other: CollectiveBytes) -> CollectiveBytes:
        return CollectiveBytes(_merge(self.by_primitive, other.by_primitive), _merge(self.calls, other.calls),
                               self.identity_bytes + other.identity_bytes)

    def times(self, count: int) -> CollectiveBytes:
        """The same collectives run `count` times (a scan body)."""
        return CollectiveBytes({k: v * count for k, v in self.by_primitive.items()},
                               {k: v * count for k, v in self.calls.items()}, self.identity_bytes * count)


def _merge(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = collections.Counter(a)
    out.update(b)
    return dict(out)


def _nbytes(avals: Iterable[Any]) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in avals)


def _group_size(params: Mapping[str, Any], axis_sizes: Mapping[str, int]) -> int | None:
    """Devices taking part in one collective, or None when an axis size is not known from an enclosing mesh."""
    groups = params.get("axis_index_groups")
    if groups:
        return len(groups[0])
    names = params.get("axes", params.get("axis_name", ()))
    names = names if isinstance(names, tuple) else (names,)
    sizes = [axis_sizes.get(name) for name in names]
    return None if None in sizes else math.prod(sizes)


def _collective(eqn: Any, axis_sizes: Mapping[str, int]) -> CollectiveBytes:
    name = eqn.primitive.name
    vars_ = eqn.outvars if name in RESULT_COLLECTIVES else eqn.invars
    payload = _nbytes(v.aval for v in vars_)
    identity = payload if _group_size(eqn.params, axis_sizes) == 1 else 0
    return CollectiveBytes({name: payload}, {name: 1}, identity)


def _walk(jaxpr: Jaxpr, axis_sizes: Mapping[str, int]) -> CollectiveBytes:
    total = CollectiveBytes()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in COLLECTIVES:
            total += _collective(eqn, axis_sizes)
        elif name == "scan":
            total += _walk(eqn.params["jaxpr"].jaxpr, axis_sizes).times(eqn.params["length"])
        elif name == "cond":
            branches = [_walk(b.jaxpr, axis_sizes) for b in eqn.params["branches"]]
            total += max(branches, key=lambda b: b.total)
        elif name == "shard_map":
            # Collectives inside name the mesh's axes; their sizes tell a one-device group (an identity).
            inner = {**axis_sizes, **dict(eqn.params["mesh"].shape)}
            total += _walk(eqn.params["jaxpr"], inner)
        else:  # jit, while (one iteration of cond and body), custom_jvp/vjp, remat: each sub-jaxpr once
            for sub in jaxprs_in_params(eqn.params):
                total += _walk(sub, axis_sizes)
    return total


def collective_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CollectiveBytes:
    """Trace `fn(*args, **kwargs)` and count the payload of its collectives, per device, for one call.

    `args` may be arrays or `jax.ShapeDtypeStruct`s (nothing is computed). See the module docstring for what
    each collective counts and how scan, cond and while loops are handled.
    """
    closed: ClosedJaxpr = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
    return _walk(closed.jaxpr, {})


def sync_bytes_per_token(model: LPUModelForCausalLM) -> CollectiveBytes:
    """The collectives of one decode step of `model` at batch 1, i.e. per generated token, per device.

    Traces `hdex_jax.forward.decode_step_fn` on the model's decode placement (its params, padded config and
    mesh) with an abstract cache of the model's max_length. In the Megatron layout that is one psum of the
    hidden vector after each row-parallel o and down projection, one psum of the embedding row, and the
    all-gather of the vocab-split logits; `total` counts them as traced. On one device the forward pass leaves
    them out of the program (they would be identities), so everything is 0. Prefill is not included.
    """
    placement = model.decode
    cache = jax.eval_shape(functools.partial(init_cache, placement.cfg, 1, model.max_length))
    token = jax.ShapeDtypeStruct((1,), np.int32)
    return collective_bytes(decode_step_fn, placement.params, cache, token, cfg=placement.cfg,
                            mesh=placement.mesh)


def param_bytes_per_device(params: Any) -> int:
    """Bytes of weights held by the most loaded device, summed over the shards each device actually holds.

    Replicated weights count in full on every device, split weights by their shard (padding included).
    Every leaf must be a `jax.Array`.
    """
    per_device: collections.Counter[Any] = collections.Counter()
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values(), default=0)
