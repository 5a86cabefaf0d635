"""Gemma, Gemma 2 and Mixtral: parity of tiny random checkpoints with transformers on 1, 3 and 4 devices, and
the converter details parity cannot see (refused options, Mixtral's fused expert layout and incomplete or
doubled expert stacks).

The tiny sizes make every device count pad something: Gemma has one KV head (multi-query, replicated on 3 and 4
devices) and head_dim 24 != hidden / heads; Gemma 2 has 4 query / 2 KV heads (padded on 3 devices), a sliding
window shorter than the prompts on layer 0 only, and soft-caps small enough to bend the scores and logits;
Mixtral has 4 experts, top-2, and an expert FFN of 80 features (padded on 3 devices) with a sliding window.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file as save_numpy
from safetensors.torch import save_file

import converters
from converters import CheckpointError
from tests.family_parity import Reference, save_random_model

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
               max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                              rms_norm_eps=1e-5),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                query_pre_attn_scalar=20, sliding_window=4,
                                                attn_logit_softcapping=0.5, final_logit_softcapping=1.0),
    "mixtral": lambda: transformers.MixtralConfig(**{**_COMMON, "intermediate_size": 80}, num_attention_heads=4,
                                                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=6),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> the directory of its tiny random checkpoint, saved once per module."""
    saved: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = save_random_model(CONFIGS[family](), tmp_path_factory.mktemp(family))
        return saved[family]

    return get


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, checkpoint) -> Reference:
    """transformers' greedy generation of one family's tiny random checkpoint."""
    return Reference.of(checkpoint(request.param))


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


@pytest.mark.parametrize("family, key, value", [
    ("gemma", "use_bidirectional_attention", True),
    ("gemma", "hidden_activation", "silu"),  # disagrees with hidden_act: older transformers read this key
    ("gemma2", "layer_types", ["sliding_attention", "chunked_attention"]),
])
def test_refused_option(family: str, key: str, value):
    hf = CONFIGS[family]().to_dict()
    hf[key] = value
    with pytest.raises(CheckpointError, match=key):
        converters.config_from_hf(hf, "config.json")


def test_gemma2_sliding_layers_without_layer_types():
    """Configs written before `layer_types` slide on every other layer, starting with layer 0."""
    hf = {**CONFIGS["gemma2"]().to_dict(), "num_hidden_layers": 3}
    del hf["layer_types"]
    cfg = converters.config_from_hf(hf)
    assert (cfg.sliding_window, cfg.sliding_layers) == (4, (True, False, True))
    assert cfg.attention_scale == 20 ** -0.5 and (cfg.attn_softcap, cfg.final_softcap) == (0.5, 1.0)


def test_mixtral_fused_expert_layout(checkpoint, tmp_path: Path):
    """transformers 5 holds experts as fused [E, 2F, D] / [E, D, F] tensors (saved as such from a state dict);
    they convert to the same params as the per-expert tensors `save_pretrained` writes."""
    directory = checkpoint("mixtral")
    state = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # the fused layout, not the per-expert one
    save_file({name: value.contiguous() for name, value in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path)
    _, fused = converters.load_checkpoint(tmp_path)
    _, per_expert = converters.load_checkpoint(directory)
    assert fused.keys() == per_expert.keys()
    for name in fused:
        np.testing.assert_array_equal(fused[name], per_expert[name], err_msg=name)


@pytest.mark.parametrize("change, message", [
    ("drop expert 3 of layer 1", r"missing tensors: .*block_sparse_moe\.experts\.E\.w1\.weight \(for "
                                 r"'layers/moe/gate/w' layer 1\)"),
    ("add a fused copy of layer 0", r"duplicate tensors for 'layers/moe/gate/w' layer 0"),
])
def test_mixtral_expert_tensors_checked(checkpoint, tmp_path: Path, change: str, message: str):
    """An expert stack is complete and given once: per expert or fused, never partly or both."""
    directory = checkpoint("mixtral")
    tensors = load_file(directory / "model.safetensors")
    if change.startswith("drop"):
        del tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    else:
        tensors["model.layers.0.mlp.experts.gate_up_proj"] = np.zeros((4, 160, 64), np.float32)
    save_numpy(tensors, tmp_path / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=message):
        converters.load_checkpoint(tmp_path)
