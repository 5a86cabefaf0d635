"""The lm-evaluation-harness model `hdex`: a compiled hdex_jax model evaluated by `lm_eval`.

Importing this module registers the class under the name "hdex" (it needs the optional extra:
`pip install "hdex-jax[lm_eval]"`). Then, for example:

    import hdex_jax.lm_eval_model, lm_eval
    lm_eval.simple_evaluate(model="hdex", model_args="pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,lpu=1",
                            tasks=["lambada_openai"])

`loglikelihood` and `loglikelihood_rolling` are the model's own (`LPUModelForCausalLM.loglikelihood`, with
lm-evaluation-harness's tokenization and windows); `generate_until` runs `generate` over batches of contexts
with the request's sampling values (greedy unless it asks to sample, transformers' defaults otherwise) and a
fixed seed, and cuts each answer before the first stop string.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval loads its own models only into an empty registry: load them first)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from hdex_jax import scoring
from hdex_jax.transformers.modeling import AutoModelForCausalLM

# New tokens of a generate_until request that names no max_gen_toks (lm-evaluation-harness's default).
DEFAULT_MAX_GEN_TOKS = 256


@register_model("hdex")
class HDexLM(LM):
    """`lm_eval --model hdex --model_args pretrained=MODEL_ID,lpu=N[,gpu=G,max_length=L,batch_size=B,seed=S]`."""

    def __init__(self, pretrained: str, lpu: int = 1, gpu: int = 0, max_length: int | None = None,
                 batch_size: int | str = scoring.DEFAULT_BATCH_SIZE, seed: int = 0, max_batch_size: Any = None,
                 device: Any = None):
        # lm_eval passes its own max_batch_size and device to every model; programs here have fixed shapes and
        # run on the devices of device_map.
        super().__init__()
        device_map = {"lpu": int(lpu), **({"gpu": int(gpu)} if int(gpu) else {})}
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, device_map=device_map,
                                                          max_length=None if max_length is None else int(max_length))
        if self.model.tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer; lm-evaluation-harness passes texts")
        # lm_eval passes its --batch_size here; "auto" has no meaning for a fixed-shape program: the default.
        self.batch_size = scoring.DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)

    @property
    def tokenizer_name(self) -> str:
        return self.model.model_id

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts, continuations = zip(*[request.args for request in requests])
        return self.model.loglikelihood(list(contexts), list(continuations), batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return self.model.loglikelihood_rolling([request.args[0] for request in requests],
                                                batch_size=self.batch_size)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        tokenizer = self.model.tokenizer
        eos = tokenizer.decode([self.model.config.eos_token_ids[0]]) if self.model.config.eos_token_ids else None
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        answers = [""] * len(requests)
        for indices in tqdm(groups.values(), disable=disable_tqdm, desc="hdex generate_until"):
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
            temperature = float(kwargs.pop("temperature", 0.0))
            do_sample = bool(kwargs.pop("do_sample", temperature > 0))
            sampling = dict(do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                            top_p=float(kwargs.pop("top_p", 1.0)), top_k=int(kwargs.pop("top_k", 0)),
                            repetition_penalty=float(kwargs.pop("repetition_penalty", 1.0)))
            room = self.model.max_length - max_new
            if room < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context within max_length "
                                 f"{self.model.max_length}")
            for first in range(0, len(indices), self.batch_size):
                batch = indices[first:first + self.batch_size]
                prompts = [tokenizer.encode(requests[i].args[0], add_special_tokens=False)[-room:] or
                           [self.model.prefix_token_id] for i in batch]
                outputs = self.model.generate(prompts, max_new_tokens=max_new, seed=self.seed, **sampling)
                for i, prompt, output in zip(batch, prompts, outputs):
                    text = tokenizer.decode(output[len(prompt):], skip_special_tokens=False)
                    answers[i] = min((text.split(stop)[0] for stop in until if stop), key=len, default=text)
        return answers
