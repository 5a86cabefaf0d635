"""Collective bytes counted from programs, and per-device parameter bytes, against hand-derived references."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hdex_jax.lpu import estimate
from hdex_jax.lpu.program_stats import collective_bytes, param_bytes_per_device, sync_bytes_per_token
from hdex_jax.transformers import AutoModelForCausalLM
from tests.helpers_tiny import save_tiny_checkpoint, tiny_hf_config

F32 = 4
ROWS, COLS, STEPS = 8, 3, 5


def _mesh(n: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:n]), ("x",))


def _program(n: int):
    """A shard_map over n devices with known collectives: in a scan of STEPS, a psum and an all_gather; then
    a ppermute, a cond whose second branch psums twice, and a while loop with one psum in its body."""

    def body(x):  # x: [ROWS / n, COLS] per device
        def step(c, _):
            c = lax.psum(c, "x")
            return c, jnp.sum(lax.all_gather(c, "x", axis=0, tiled=True))

        c, _ = lax.scan(step, x, None, length=STEPS)
        c = lax.ppermute(c, "x", [(i, (i + 1) % n) for i in range(n)])
        c = lax.cond(jnp.sum(c) > 0, lambda a: a, lambda a: lax.psum(lax.psum(a, "x"), "x"), c)
        _, c = lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, lax.psum(s[1], "x")), (0, c))
        return c

    spec = PartitionSpec("x")
    return jax.jit(jax.shard_map(body, mesh=_mesh(n), in_specs=spec, out_specs=spec, check_vma=False))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_hand_written_program_exact_bytes(n):
    local = ROWS // n * COLS * F32  # one device's [ROWS / n, COLS] float32 block
    gathered = ROWS * COLS * F32  # the all_gather result: every device's block
    # psum: STEPS in the scan, 2 in the costlier cond branch, 1 for the while loop's one counted iteration.
    psums = STEPS + 2 + 1
    stats = collective_bytes(_program(n), jax.ShapeDtypeStruct((ROWS, COLS), jnp.float32))
    assert stats.by_primitive == {"psum": psums * local, "all_gather": STEPS * gathered, "ppermute": local}
    assert stats.calls == {"psum": psums, "all_gather": STEPS, "ppermute": 1}
    assert stats.total == (psums + 1) * local + STEPS * gathered
    # Over one device every collective is the identity: nothing is synchronised across devices.
    assert stats.across_devices == (0 if n == 1 else stats.total)


def test_kwargs_and_collective_free_program():
    stats = collective_bytes(lambda x, *, scale: x * scale, jnp.ones(3), scale=2.0)
    assert stats.total == 0 and stats.calls == {}


def test_param_bytes_per_device_counts_shards_and_replicas():
    mesh = _mesh(2)
    split = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, PartitionSpec("x")))
    replicated = jax.device_put(jnp.zeros((5,)), NamedSharding(mesh, PartitionSpec()))
    assert param_bytes_per_device({"w": split, "b": replicated}) == (4 * 4 + 5) * F32


# ------------------------------------------------------------------------------------- a tiny llama on the API
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def models(home, tmp_path_factory):
    """The tiny llama loaded on 1 and on 2 devices (compiled into the module's HDEX_HOME)."""
    checkpoint = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    return {n: AutoModelForCausalLM.from_pretrained(str(checkpoint), device_map={"lpu": n}, max_length=MAX_LENGTH)
            for n in (1, 2)}


def _hand_sync_bytes() -> tuple[int, int]:
    """Payload per device of one decode step at batch 1, derived from the Hugging Face config by hand.

    Per layer: the psum of o's partial sums and the psum of down's, each [B, 1, D] float32. Once: the psum of
    the vocab-split embedding row [B, 1, E] (E = D for llama), and the all_gather of the logits, whose result
    is the whole [B, V] float32 row (V = 128 divides 2 devices: no vocab padding).
    """
    hf = tiny_hf_config("llama")
    B, D, V, L = 1, hf.hidden_size, hf.vocab_size, hf.num_hidden_layers
    psum = (2 * L + 1) * B * D * F32
    all_gather = B * V * F32
    return psum, all_gather


def test_sync_bytes_per_token_matches_hand_derivation(models):
    psum, all_gather = _hand_sync_bytes()
    layers = tiny_hf_config("llama").num_hidden_layers
    stats = sync_bytes_per_token(models[2])
    assert stats.by_primitive == {"psum": psum, "all_gather": all_gather}
    assert stats.calls == {"psum": 2 * layers + 1, "all_gather": 1}
    assert stats.across_devices == psum + all_gather
    # One device pays nothing for the emulation of several: its program has no collectives at all.
    single = sync_bytes_per_token(models[1])
    assert single.by_primitive == {} and single.across_devices == 0


def test_sync_bytes_agree_with_performance_model(models):
    """The LPU performance model's sync payloads (from the weight declarations) equal the traced program's."""
    est = estimate(models[1].config, 2, 0, dtype="float32")
    assert sum(s.payload_bytes * s.count for s in est.syncs) == sync_bytes_per_token(models[2]).across_devices


def test_param_bytes_per_device_halves_the_split_weights(models):
    hf = tiny_hf_config("llama")
    D, F, V, L = hf.hidden_size, hf.intermediate_size, hf.vocab_size, hf.num_hidden_layers
    hd = D // hf.num_attention_heads
    q_o = 2 * D * hf.num_attention_heads * hd
    k_v = 2 * D * hf.num_key_value_heads * hd
    # Split over devices: embedding and LM head (vocab), q/k/v/o (heads), up/gate/down (ffn).
    split = (2 * V * D + L * (q_o + k_v + 3 * D * F)) * F32
    # Replicated on every device: the two norms of each layer and the final norm.
    replicated = (2 * L * D + D) * F32
    assert param_bytes_per_device(models[1].params) == split + replicated
    assert param_bytes_per_device(models[2].params) == split // 2 + replicated
