"""`AutoModelForCausalLM`: a compiled model on emulated LPU devices, with HyperDex's `generate` API."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm import tqdm

from hdex_jax import artifacts, formats, hub, runtime, scoring
from hdex_jax.config import ModelConfig
from hdex_jax.generation import Batch, Placement, generate_recorded, generate_tokens, prepare_batch, stream_tokens
from hdex_jax.model_store import DEFAULT_MAX_LENGTH, ModelStore
from hdex_jax.sampling import DEFAULTS, SETTINGS, SamplingConfig
from hdex_jax.tools.compiler import AutoCompiler
from hdex_jax.transformers.tokenizer import compiled_tokenizer
if TYPE_CHECKING:  # transformers (under TextStreamer) takes seconds to import: only when a streamer is used
    from hdex_jax.transformers.streamer import TextStreamer
from hdex_jax.validation import (
    check_bool,
    check_int,
    check_max_length,
    check_max_new_tokens,
    check_num_device,
    check_seed,
    check_streamer,
    check_token,
    check_token_id,
    check_token_ids,
    per_row,
    quote,
)


def parse_device_map(device_map: dict[str, int] | None) -> tuple[int, int]:
    """(gpu, lpu) device counts of a HyperDex device_map such as {"lpu": 2} or {"gpu": 1, "lpu": 2}.

    "lpu" is 1 to the devices JAX can provide, "gpu" 0 or more, and together they fit in those devices.
    """
    if device_map is None:
        return 0, 1
    example = "e.g. {'lpu': 2} or {'gpu': 1, 'lpu': 2}"
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map must be a dict with the key 'lpu' and optionally 'gpu', {example}; got "
                        f"{quote(device_map)} ({type(device_map).__name__})")
    if set(device_map) - {"lpu", "gpu"} or "lpu" not in device_map:
        raise ValueError(f"device_map must be a dict with the key 'lpu' and optionally 'gpu', {example}; got "
                         f"{quote(device_map)}")
    lpu = check_num_device("device_map['lpu']", device_map["lpu"])
    gpu = check_int("device_map['gpu']", device_map.get("gpu", 0), minimum=0)
    if gpu:
        check_num_device("device_map['gpu'] + device_map['lpu']", gpu + lpu)
    return gpu, lpu


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns, with transformers' names and meaning.

    `sequences` is what `generate` returns otherwise. `scores` (with `output_scores=True`) and `logits` (with
    `output_logits=True`) are tuples with one [rows, V] float32 array per generation step: the processed scores
    each token was chosen from (after repetition penalty, and temperature, top-k and top-p when sampling; removed
    entries -inf) and the raw logits. Steps run until the last row stops; `new_tokens` holds each row's tokens.
    """

    sequences: Any
    new_tokens: list[list[int]]
    scores: tuple[np.ndarray, ...] | None = None
    logits: tuple[np.ndarray, ...] | None = None

    def compute_transition_scores(self, normalize_logits: bool = False) -> np.ndarray:
        """[rows, steps] the score of each generated token at its step, like transformers'
        `compute_transition_scores`; with `normalize_logits` the scores are log-softmax normalised first (then
        they are the log-probabilities the tokens were drawn with). Steps after a row's last token are 0."""
        if self.scores is None:
            raise ValueError("compute_transition_scores needs the scores: generate with output_scores=True")
        scores = np.stack(self.scores, axis=1)  # [rows, steps, V]
        if normalize_logits:
            scores = np.asarray(jax.nn.log_softmax(scores, axis=-1))
        out = np.zeros(scores.shape[:2], np.float32)
        for r, tokens in enumerate(self.new_tokens):
            out[r, : len(tokens)] = scores[r, np.arange(len(tokens)), tokens]
        return out


@dataclasses.dataclass(frozen=True)
class CausalLMOutput:
    """What `model(input_ids)` returns, with transformers' field name: `logits` of every position [B, T, V]."""

    logits: Any


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """What `model.perplexity(text)` returns."""

    perplexity: float  # exp(-loglikelihood / tokens)
    loglikelihood: float  # summed log-prob of every token of the text
    tokens: int
    seconds: float  # time the scoring took


class LPUModelForCausalLM:
    """A causal LM whose decode datapath runs as jitted JAX functions on a mesh of emulated LPU devices."""

    def __init__(self, decode: Placement, tokenizer: Any, max_length: int, model_id: str,
                 prefill: Placement | None = None):
        self.decode = decode
        self.prefill = prefill
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.model_id = model_id

    @property
    def config(self) -> ModelConfig:
        """The checkpoint's configuration, the same on any number of devices (SmolLM2: 9 heads, 3 KV heads)."""
        return self.decode.source_cfg

    @property
    def layout_config(self) -> ModelConfig:
        """The configuration as laid out on the LPU devices: heads, FFN features and vocabulary padded so they
        split evenly (SmolLM2 on 2 devices: 12 heads, 4 KV heads). What the datapath runs; results equal the
        checkpoint's."""
        return self.decode.cfg

    @property
    def params(self) -> dict[str, Any]:
        """The weights on the LPU devices, sharded by the logical-axis rules."""
        return self.decode.params

    @property
    def num_device(self) -> int:
        return self.decode.mesh.size

    # ----------------------------------------------------------------------------------------- inputs/outputs
    def _as_prompts(self, inputs: Any) -> tuple[list[list[int]], str]:
        """Normalise `inputs` to checked lists of token ids and remember its kind, so the output mirrors it."""
        vocab = self.config.vocab_size
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise ValueError("a str prompt needs a tokenizer, but this model has none; pass token ids")
            return [check_token_ids("inputs", list(self.tokenizer.encode(inputs)), vocab)], "str"
        if isinstance(inputs, (np.ndarray, jax.Array)):
            array = np.asarray(inputs)
            if not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"inputs as an array must hold integer token ids, got dtype {array.dtype}")
            if array.ndim != 2:
                raise ValueError(f"inputs as an array must be 2-D token ids [batch, length], got shape {array.shape}")
            rows = [check_token_ids(f"inputs[{i}]", row, vocab) for i, row in enumerate(array.tolist())]
            return rows, "jax" if isinstance(inputs, jax.Array) else "numpy"
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(f"inputs must be a str, a list of token ids, a list of such lists or a 2-D array, got "
                            f"{quote(inputs)} of type {type(inputs).__name__}")
        if any(isinstance(x, (list, tuple, str)) or getattr(x, "ndim", 0) == 1 for x in inputs):
            return [check_token_ids(f"inputs[{i}]", row, vocab) for i, row in enumerate(inputs)], "batch"
        return [check_token_ids("inputs", inputs, vocab)], "ids"

    def _format(self, prompts: list[list[int]], new: list[list[int]], kind: str, sequences: int) -> Any:
        """The output in the form of the input; with several sequences per prompt, a list (or array) of all rows,
        the sequences of each prompt together, as in transformers."""
        full = [p + n for p, n in zip(prompts, new)]
        if kind == "str":
            texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in full]
            return texts[0] if sequences == 1 else texts
        if kind == "ids":
            return full[0] if sequences == 1 else full
        if kind == "batch":
            return full
        width = max(len(row) for row in full)
        array = np.full((len(full), width), self._pad_id(), np.int64)
        for i, row in enumerate(full):
            array[i, : len(row)] = row
        return jax.numpy.asarray(array) if kind == "jax" else array

    def _pad_id(self) -> int:
        cfg = self.config
        if cfg.pad_token_id is not None:
            return cfg.pad_token_id
        return cfg.eos_token_ids[0] if cfg.eos_token_ids else 0

    def _stop_ids(self, stop: Any, rows: int) -> list[list[int]]:
        """Each row's stop ids: None (the model's eos ids), one id or a list of ids for every row, or a list of
        such lists, one per prompt. A str is refused: stop ids are token ids."""
        vocab = self.config.vocab_size
        if stop is None:
            return [list(self.config.eos_token_ids)] * rows
        if not isinstance(stop, (list, tuple)):
            return [[check_token_id("stop", stop, vocab)]] * rows
        if len(stop) > 0 and all(isinstance(s, (list, tuple)) for s in stop):
            return per_row("stop", list(stop), rows, lambda name, ids: [
                check_token_id(f"{name}[{j}]", t, vocab) for j, t in enumerate(ids)])
        return [[check_token_id(f"stop[{j}]", t, vocab) for j, t in enumerate(stop)]] * rows

    def _budgets(self, longest: int, rows: int, max_new_tokens: Any, max_length: Any) -> list[int]:
        """New tokens per row: `max_new_tokens` (one or one per row), else what `max_length` (the total length,
        as in transformers) leaves after the longest prompt, else up to the compiled max_length."""
        if max_new_tokens is not None:
            return per_row("max_new_tokens", max_new_tokens, rows, check_max_new_tokens)
        if max_length is not None:
            return [check_int("max_length", max_length, minimum=longest + 1, maximum=self.max_length) - longest] * rows
        return [max(self.max_length - longest, 1)] * rows

    def _prepare(self, inputs: Any, max_new_tokens: Any, max_length: Any, stop: Any, seed: Any,
                 num_return_sequences: Any, **settings: Any) -> tuple[list[list[int]], str, Batch]:
        """Check every argument (one value, or one per prompt; `settings` those of `hdex_jax.sampling.SETTINGS`)
        and build the padded batch: each prompt's row is repeated `num_return_sequences` times, sequence j drawing
        from its own key."""
        prompts, kind = self._as_prompts(inputs)
        rows = len(prompts)
        k = check_int("num_return_sequences", num_return_sequences, minimum=1)
        columns = {setting.name: per_row(setting.name, settings[setting.name], rows) for setting in SETTINGS}
        sampling = [SamplingConfig(**dict(zip(columns, values))) for values in zip(*columns.values())]
        seeds = per_row("seed", seed, rows, lambda name, s: None if s is None else check_seed(name, s))
        budgets = self._budgets(max(len(p) for p in prompts), rows, max_new_tokens, max_length)
        stops = self._stop_ids(stop, rows)

        def repeat(values: list[Any]) -> list[Any]:
            return [v for v in values for _ in range(k)]

        prompts = repeat(prompts)
        batch = prepare_batch(prompts, max_length=self.max_length, max_new_tokens=repeat(budgets),
                              stop=repeat(stops), pad_id=self._pad_id(), seed=repeat(seeds),
                              sampling=repeat(sampling), sequence=list(range(k)) * rows)
        return prompts, kind, batch

    # ---------------------------------------------------------------------------------------------- scoring
    @property
    def _scorer(self) -> Placement:
        """Where prompt passes run: the prefill ("gpu") mesh of the hybrid split, else the LPU mesh."""
        return self.prefill if self.prefill is not None else self.decode

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> CausalLMOutput:
        """The logits of every position, as transformers' `model(input_ids).logits`: float32 [B, T, V].

        Args:
            input_ids: a 2-D numpy or JAX array of token ids [B, T] (logits come back as the same kind of
                array), or a list of token id lists, which may differ in length (a list back, one [T_i, V]
                numpy array per row).
            attention_mask: [B, T] of 1 for real tokens and 0 for padding, left or right, as in transformers;
                None: every token is real. Logits at padding positions are finite but meaningless.

        Position ids are cumsum(mask) - 1, as transformers derives them. Lengths are bucketed (powers of two, at
        least 16) so that lengths within a bucket compile nothing new; rows longer than
        `scoring.CHUNK_TOKENS` run in chunks through the KV cache, up to the compiled max_length.
        """
        vocab = self.config.vocab_size
        if isinstance(input_ids, (np.ndarray, jax.Array)):
            array = np.asarray(input_ids)
            if not np.issubdtype(array.dtype, np.integer) or array.ndim != 2 or array.size == 0:
                raise ValueError(f"input_ids as an array must be non-empty 2-D integer token ids [batch, length], "
                                 f"got shape {array.shape} and dtype {array.dtype}")
            rows = [check_token_ids(f"input_ids[{i}]", row, vocab) for i, row in enumerate(array.tolist())]
        elif isinstance(input_ids, (list, tuple)) and input_ids and all(
                isinstance(row, (list, tuple)) or getattr(row, "ndim", 0) == 1 for row in input_ids):
            rows = [check_token_ids(f"input_ids[{i}]", row, vocab) for i, row in enumerate(input_ids)]
        else:
            raise TypeError(f"input_ids must be a 2-D array of token ids or a list of token id lists, got "
                            f"{quote(input_ids)} of type {type(input_ids).__name__}")
        lengths = [len(row) for row in rows]
        if max(lengths) > self.max_length:
            raise ValueError(f"input_ids has {max(lengths)} tokens in a row, more than the compiled max_length "
                             f"({self.max_length}); compile with a larger max_length or shorten the input")
        tokens = np.zeros((len(rows), max(lengths)), np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        mask = (np.arange(tokens.shape[1]) < np.asarray(lengths)[:, None]).astype(np.int32)
        if attention_mask is not None:
            given = np.asarray(attention_mask)
            if given.shape != tokens.shape or not np.isin(given, (0, 1)).all():
                raise ValueError(f"attention_mask must be 0s and 1s of the shape of input_ids {tokens.shape}, got "
                                 f"shape {given.shape}" + ("" if given.shape != tokens.shape else " with other values"))
            mask = given.astype(np.int32)
        logits = scoring.score(self._scorer, tokens, mask)  # [B, T, V]
        if isinstance(input_ids, jax.Array):
            return CausalLMOutput(jax.numpy.asarray(logits))
        if isinstance(input_ids, np.ndarray):
            return CausalLMOutput(logits)
        return CausalLMOutput([logits[i, :n] for i, n in enumerate(lengths)])

    forward = __call__

    @property
    def prefix_token_id(self) -> int:
        """The token that stands before a text with no context, as lm-evaluation-harness picks it: bos, else eos."""
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        bos = self.config.bos_token_id if bos is None else bos
        if bos is not None:
            return bos
        return self.config.eos_token_ids[0] if self.config.eos_token_ids else self._pad_id()

    def _ids(self, name: str, value: Any) -> list[int]:
        """Token ids of a text (encoded without special tokens, as lm-evaluation-harness does) or checked ids."""
        if isinstance(value, str):
            if self.tokenizer is None:
                raise ValueError(f"{name} is a str, but this model has no tokenizer; pass token ids")
            return list(self.tokenizer.encode(value, add_special_tokens=False))
        return check_token_ids(name, value, self.config.vocab_size)

    def _pair(self, i: int, context: Any, continuation: Any) -> tuple[list[int], list[int]]:
        if isinstance(context, str) != isinstance(continuation, str):
            raise TypeError(f"context[{i}] and continuation[{i}] must both be texts or both be token ids")
        if isinstance(context, str) and context:
            if not continuation:
                raise ValueError(f"continuation[{i}] is empty: give the text whose log-likelihood you want")
            if self.tokenizer is None:
                raise ValueError("a text context needs a tokenizer, but this model has none; pass token ids")
            encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
            context_ids, continuation_ids = scoring.encode_pair(encode, context, continuation)
        else:
            context_ids = [self.prefix_token_id] if len(context) == 0 else self._ids(f"context[{i}]", context)
            continuation_ids = self._ids(f"continuation[{i}]", continuation)
        if not continuation_ids:
            raise ValueError(f"continuation[{i}] encodes to no token past its context")
        return context_ids, continuation_ids

    def loglikelihood(self, context: Any, continuation: Any, batch_size: int = scoring.DEFAULT_BATCH_SIZE) -> Any:
        """(log-likelihood, is_greedy) of `continuation` after `context`, as lm-evaluation-harness defines them:
        the sum of the log-probs of the continuation's tokens, and whether greedy decoding would produce it.

        `context` and `continuation` are texts (split into tokens as lm-evaluation-harness does: trailing
        spaces of the context go to the continuation; an empty context stands for the bos token) or token id
        lists; or lists of those, one pair per entry, which run `batch_size` rows at a time and give a list.
        Rows keep the last max_length tokens of context + continuation.
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        single = isinstance(context, str) or (isinstance(context, (list, tuple)) and not any(
            isinstance(c, (str, list, tuple)) for c in context))
        contexts, continuations = ([context], [continuation]) if single else (list(context), list(continuation))
        if len(contexts) != len(continuations):
            raise ValueError(f"context has {len(contexts)} entries but continuation {len(continuations)}")
        pairs = [self._pair(i, c, x) for i, (c, x) in enumerate(zip(contexts, continuations))]
        results = scoring.loglikelihood_tokens(self._scorer, pairs, self.max_length, batch_size)
        return results[0] if single else results

    def loglikelihood_rolling(self, text: Any, window: int | None = None, stride: int | None = None,
                              batch_size: int = scoring.DEFAULT_BATCH_SIZE) -> Any:
        """The log-likelihood of a whole text (a str or token ids; or a list of those, giving a list): the sum of
        the log-probs of every token, the first predicted from the bos token, as lm-evaluation-harness's
        `loglikelihood_rolling`. Perplexity is exp(-result / number of tokens) (`perplexity`).

        A text longer than `window` tokens (default: the compiled max_length) is scored in windows of at most
        `window` tokens, each predicting the next `stride` tokens (default `window`: disjoint windows, as
        lm-evaluation-harness; a smaller stride gives each token more context and costs more passes).
        """
        single = isinstance(text, str) or (isinstance(text, (list, tuple)) and not any(
            isinstance(t, (str, list, tuple)) for t in text))
        totals = [total for total, _ in self._rolling([text] if single else list(text), window, stride, batch_size,
                                                      progress=False, name="text" if single else "text[{}]")]
        return totals[0] if single else totals

    def perplexity(self, text: Any, window: int | None = None, stride: int | None = None,
                   batch_size: int = scoring.DEFAULT_BATCH_SIZE, progress: bool = False) -> Perplexity:
        """The perplexity of a text (str or token ids), exp(-loglikelihood_rolling / tokens), with the same
        windows; `progress` shows a progress bar (tokens scored) on standard error."""
        start = time.perf_counter()
        [(total, tokens)] = self._rolling([text], window, stride, batch_size, progress, name="text")
        return Perplexity(math.exp(-total / tokens), total, tokens, time.perf_counter() - start)

    def _rolling(self, texts: list[Any], window: int | None, stride: int | None, batch_size: int, progress: bool,
                 name: str) -> list[tuple[float, int]]:
        """(log-likelihood, tokens) of each text, scored in `window`s advancing by `stride` tokens."""
        window = self.max_length if window is None else check_int("window", window, minimum=1,
                                                                    maximum=self.max_length)
        stride = window if stride is None else check_int("stride", stride, minimum=1, maximum=window)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        ids = [self._ids(name.format(i), t) for i, t in enumerate(texts)]
        windows = [scoring.rolling_windows(row, self.prefix_token_id, window, stride) for row in ids]
        flat = [w for ws in windows for w in ws]
        scores = []
        with tqdm(total=sum(len(w[1]) for w in flat), unit="tok", disable=not progress, file=sys.stderr) as bar:
            for first in range(0, len(flat), batch_size):
                group = flat[first:first + batch_size]
                scores += scoring.score_targets(self._scorer, [w[0] for w in group], [w[1] for w in group],
                                                batch_size)
                bar.update(sum(len(w[1]) for w in group))
        totals = iter(scores)
        return [(sum(next(totals)[0] for _ in ws), len(row)) for ws, row in zip(windows, ids)]

    # --------------------------------------------------------------------------------------------- generate
    def generate(self, inputs: Any, max_new_tokens: int | Sequence[int] | None = None, max_length: int | None = None,
                 do_sample: bool | Sequence[bool] = DEFAULTS["do_sample"],
                 top_p: float | Sequence[float] = DEFAULTS["top_p"], top_k: int | Sequence[int] = DEFAULTS["top_k"],
                 temperature: float | Sequence[float] = DEFAULTS["temperature"],
                 repetition_penalty: float | Sequence[float] = DEFAULTS["repetition_penalty"],
                 stop: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
                 seed: int | Sequence[int] | None = None, streamer: TextStreamer | None = None,
                 num_return_sequences: int = 1, return_dict_in_generate: bool = False, output_scores: bool = False,
                 output_logits: bool = False) -> Any:
        """Generate continuations of `inputs`; the output has the type of `inputs` and includes the prompt.

        Args:
            inputs: a str (decoded str back), a list of token ids, a list of lists (one per prompt, returned
                unpadded) or a 2-D array (returned as an array of that kind, right-padded with the pad id).
            max_new_tokens: new tokens per prompt. If None, `max_length` (total length, as in transformers)
                sets it; if both are None, generation runs until a stop token or the compiled max_length.
            do_sample, top_p, top_k, temperature, repetition_penalty: Hugging Face sampling, in Hugging Face's
                order, with HyperDex's defaults (declared in `hdex_jax.sampling.SETTINGS`).
                `do_sample=False` is greedy after the repetition penalty. `top_k=0` and `top_p=1.0` disable.
            stop: a token id or list of ids that end a row (kept in the output); defaults to the model's eos.
                A list of lists gives each prompt its own stop ids.
            seed: the PRNG seed, an integer in [0, 2**64); the same seed gives the same tokens, whatever the
                other rows of the batch. None draws a fresh random seed.
            streamer: a `TextStreamer`, which receives the tokens as they are produced (one prompt only).
            num_return_sequences: sequences per prompt, as in transformers: the output lists (or stacks) every
                prompt's sequences together. Sequence 0 is the single-sequence result; sequence j > 0 draws from
                fold_in(key(seed), j). Reproducible for a seed.
            return_dict_in_generate, output_scores, output_logits: as in transformers, a `GenerateOutput` with
                `sequences` and, if asked, each step's processed `scores` and raw `logits` (whole-loop generation
                only: not with a streamer).

        `max_new_tokens`, `do_sample`, `top_p`, `top_k`, `temperature`, `repetition_penalty` and `seed` take one
        value for every prompt or a list with one value per prompt; each row then gets exactly the tokens it
        would get alone with its values. None of these values recompiles anything.
        """
        check_streamer(streamer)
        as_dict = check_bool("return_dict_in_generate", return_dict_in_generate)
        record = check_bool("output_scores", output_scores) | check_bool("output_logits", output_logits)
        if record and not as_dict:
            raise ValueError("output_scores and output_logits need return_dict_in_generate=True, as in transformers")
        if record and streamer is not None:
            raise ValueError("output_scores and output_logits are not available with a streamer")
        prompts, kind, batch = self._prepare(inputs, max_new_tokens, max_length, stop, seed, num_return_sequences,
                                             do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
                                             repetition_penalty=repetition_penalty)
        if streamer is not None:
            new = [list(self._stream(prompts, batch, streamer))]
        elif not record:
            new = generate_tokens(self.decode, batch, self.prefill)
        else:
            recorded = generate_recorded(self.decode, batch, self.prefill)
            new = recorded.tokens
        sequences = self._format(prompts, new, kind, num_return_sequences)
        if not as_dict:
            return sequences

        def steps(history: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(history[:, t] for t in range(history.shape[1]))

        return GenerateOutput(sequences, new, steps(recorded.scores) if output_scores else None,
                              steps(recorded.logits) if output_logits else None)

    def generate_yield(self, inputs: Any, max_new_tokens: int | Sequence[int] | None = None,
                       max_length: int | None = None, do_sample: bool | Sequence[bool] = DEFAULTS["do_sample"],
                       top_p: float | Sequence[float] = DEFAULTS["top_p"],
                       top_k: int | Sequence[int] = DEFAULTS["top_k"],
                       temperature: float | Sequence[float] = DEFAULTS["temperature"],
                       repetition_penalty: float | Sequence[float] = DEFAULTS["repetition_penalty"],
                       stop: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
                       seed: int | Sequence[int] | None = None,
                       streamer: TextStreamer | None = None, num_return_sequences: int = 1) -> Iterator[Any]:
        """Like `generate`, but a generator of what is produced, as it is produced.

        Yields each new token id (one prompt), or each step's list of ids (several prompts; rows that have
        stopped are None in later steps' lists). Given a `TextStreamer(..., use_print=False)`, yields text pieces
        instead. Arguments are checked when it is called, before the first token.
        """
        check_streamer(streamer, ("put", "end", "take_pieces"))
        prompts, _, batch = self._prepare(inputs, max_new_tokens, max_length, stop, seed, num_return_sequences,
                                          do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
                                          repetition_penalty=repetition_penalty)
        if streamer is not None:
            if len(prompts) != 1:
                raise ValueError(f"a streamer takes one prompt at a time, got {len(prompts)}")
            return self._yield_pieces(prompts, batch, streamer)
        return self._yield_tokens(prompts, batch)

    def _yield_pieces(self, prompts: list[list[int]], batch: Batch, streamer: TextStreamer) -> Iterator[str]:
        for _ in self._stream(prompts, batch, streamer):
            yield from streamer.take_pieces()
        yield from streamer.take_pieces()

    def _yield_tokens(self, prompts: list[list[int]], batch: Batch) -> Iterator[Any]:
        finished = [False] * len(prompts)
        for step in stream_tokens(self.decode, batch, self.prefill):
            tokens = [None if f else int(t) for f, t in zip(finished, step)]
            finished = [f or t is None or t in stops for f, t, stops in zip(finished, tokens, batch.stop_ids)]
            yield tokens[0] if len(prompts) == 1 else tokens

    def _stream(self, prompts: list[list[int]], batch: Batch, streamer: TextStreamer) -> Iterator[int]:
        """Drive `streamer` over one prompt's tokens; yields each new token id."""
        if len(prompts) != 1:
            raise ValueError(f"a streamer takes one prompt at a time, got {len(prompts)}")
        streamer.put(np.asarray([prompts[0]]))
        try:
            for step in stream_tokens(self.decode, batch, self.prefill):
                token = int(step[0])
                streamer.put(np.asarray([token]))
                yield token
                if token in batch.stop_ids[0]:
                    break
        finally:
            streamer.end()


class AutoModelForCausalLM:
    """HyperDex's entry point: `AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": N})`."""

    @staticmethod
    def from_pretrained(model_id: str = hub.DEFAULT_MODEL, device_map: dict[str, int] | None = None,
                        token: str | bool | None = None, max_length: int | None = None,
                        verify: str | None = None, dtype: str | None = None) -> LPUModelForCausalLM:
        """Load a compiled model onto `device_map["lpu"]` emulated devices.

        A model or device count that was not compiled yet is compiled first, with a notice, for `max_length`
        (None: 4096, capped at the model's positions with a notice). Otherwise the compiled max_length is used,
        unless `max_length` asks for another one: then the model is compiled again for it (the converted
        weights and their layout are reused; the programs are exported again for its buckets).

        The compiled programs in `inst/` run without tracing the model (all but a hybrid `device_map`, whose
        prefill runs on another mesh). Every artifact file is checked against the hashes its manifest
        recorded: `verify="cheap"` (the default, or the environment's HDEX_VERIFY) checks sizes, small files
        whole and the first and last MiB of large ones; `verify="full"` hashes every byte. A bad file raises
        `artifacts.ArtifactError` naming it and how to compile again.

        The number format is the compile's (`AutoCompiler.compile(..., dtype=, quantize=)`). `dtype` None loads
        whatever was compiled; a dtype ("float32", "float16", "bfloat16") compiles a model not compiled yet in
        it, and refuses, saying how to recompile, a model compiled in another.
        """
        gpu, lpu = parse_device_map(device_map)
        if max_length is not None:
            max_length = check_max_length("max_length", max_length)
        token = check_token("token", token)
        level = artifacts.verify_level(verify)
        if dtype is not None:
            dtype = formats.check_format(dtype, "auto")[0]
        store = ModelStore.open(model_id)
        runtime.setup()
        for num_device in (lpu, gpu) if gpu else (lpu,):
            reason = store.why_compile(num_device, max_length, dtype)
            if reason is not None:
                _compile(store, reason, num_device, token, max_length, dtype)
        # Under the shared lock no compile replaces a directory while it is read.
        with store.lock(shared=True):
            store.verified(store.ckpt_dir, lpu, level)
            # The decode (LPU) mesh takes the first devices, the prefill ("gpu") mesh the next ones.
            decode = store.placement(lpu, 0, level, programs=not gpu)
            prefill = store.placement(gpu, lpu, level, programs=False) if gpu else None
            tokenizer = compiled_tokenizer(store.ckpt_dir)
        return LPUModelForCausalLM(decode, tokenizer, store.compiled_max_length(lpu), store.model_id, prefill)


def _compile(store: ModelStore, reason: str, num_device: int, token: str | None, max_length: int | None,
             dtype: str | None) -> None:
    """Compile the model of `store` for `num_device` devices, saying `reason`."""
    if jax.distributed.is_initialized():
        # Every process would compile into the same directories at once, racing on them.
        raise FileNotFoundError(
            f"{reason} ({store.param_dir(num_device)}); in a multi-process cluster compile it once before starting "
            f"the processes, into an HDEX_HOME every process reads: AutoCompiler().compile({store.model_id!r}, "
            f"num_device={num_device}, max_length=...)")
    print(f"[hdex] {reason}; compiling it now", flush=True)
    AutoCompiler().compile_store(store, num_device=num_device, token=token,
                                 max_length=DEFAULT_MAX_LENGTH if max_length is None else max_length,
                                 dtype=dtype or "float32")
    store.forget()
