"""Parity of a tiny random checkpoint of any family with transformers' own implementation, on N devices.

A family's test builds a tiny config with transformers' config class, saves a random model with
`save_random_model` (norm weights and biases random too, so a converter that drops or swaps them fails) and
checks it with `Reference.check(num_device)`: greedy tokens identical to transformers' `generate`, and the
logits of every step (the last included) within `ATOL`, for a batch of two left-padded prompts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import chex
import numpy as np
import torch
import transformers

import converters
from hdex_jax.generation import generate_recorded, place, prepare_batch
from hdex_jax.params import abstract_params, unflatten
from hdex_jax.sampling import SamplingConfig

ATOL = 1e-4
STEPS = 8
PROMPT_LENGTHS = (5, 9)
MAX_LENGTH = 64


def save_random_model(config: transformers.PretrainedConfig, directory: str | Path, seed: int = 0) -> Path:
    """A float32 model of `config` with random weights, 1-D parameters (norms, biases) included, saved to
    `directory` with `save_pretrained` (safetensors)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn_like(param))
    model.eval().save_pretrained(directory)
    return Path(directory)


@dataclasses.dataclass
class Reference:
    """transformers' greedy generation of a saved checkpoint, and the checkpoint converted by hdex_jax."""

    directory: Path
    prompts: list[list[int]]
    tokens: list[list[int]]
    logits: np.ndarray  # [rows, STEPS, V]

    @classmethod
    def of(cls, directory: str | Path, seed: int = 0) -> Reference:
        directory = Path(directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
        width = max(PROMPT_LENGTHS)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        # No stop token on either side: transformers' min_new_tokens would instead forbid eos, which hdex_jax
        # (given no stop ids) may still pick.
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=STEPS, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits, dim=1).float().numpy()
        return cls(directory, prompts, out.sequences[:, width:].tolist(), logits)

    def check(self, num_device: int) -> None:
        """Convert, lay out for `num_device` devices, generate greedily; assert tokens and logits match."""
        cfg, flat = converters.load_checkpoint(self.directory)
        chex.assert_trees_all_equal_shapes_and_dtypes(unflatten(flat), abstract_params(cfg))
        batch = prepare_batch(self.prompts, max_length=MAX_LENGTH, max_new_tokens=STEPS, stop=[], pad_id=0, seed=0,
                              sampling=SamplingConfig(do_sample=False))
        recorded = generate_recorded(place(cfg, flat, num_device), batch)
        np.testing.assert_allclose(recorded.logits, self.logits, atol=ATOL, rtol=0,
                                   err_msg=f"{cfg.model_type} logits on {num_device} device(s)")
        assert recorded.tokens == self.tokens, f"{cfg.model_type} tokens on {num_device} device(s)"
