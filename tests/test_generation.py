"""Generation with per-row runtime values on a tiny Llama: no recompilation across sampling values, seeds, stop ids
and budgets; each row of a batch gets exactly the tokens it gets alone, at any batch position, whatever the
other rows."""

import jax
import pytest

from hdex_jax import generation
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM
from tests.compilations import counting_compilations
from tests.helpers_tiny import save_tiny_checkpoint

PROMPTS = [[3, 17, 42, 9, 5], [8, 8, 1], [60, 2, 2, 7], [11, 12]]


@pytest.fixture(scope="module")
def model(home, tmp_path_factory):
    directory = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    AutoCompiler().compile(str(directory), max_length=64)
    return AutoModelForCausalLM.from_pretrained(str(directory))


SWEEP = [
    dict(temperature=0.7), dict(temperature=1.3), dict(top_p=0.5), dict(top_p=0.95), dict(top_k=0),
    dict(top_k=5), dict(repetition_penalty=1.0), dict(repetition_penalty=1.5), dict(do_sample=False),
    dict(seed=2**63 + 1), dict(seed=[1, 2, 3]), dict(stop=[4]), dict(stop=[[4], [5, 6], []]),
    dict(max_new_tokens=5), dict(max_new_tokens=[3, 9, 7]), dict(temperature=[0.5, 1.0, 2.0], top_k=[0, 3, 50]),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole-loop", "step-driver"])
def test_sweeping_runtime_values_compiles_nothing(model, stream):
    prompts = PROMPTS[:3]
    base = dict(max_new_tokens=9, do_sample=True, seed=0)

    def run(**kwargs):
        args = {**base, **kwargs}
        if stream:
            return list(model.generate_yield(prompts, **args))
        return model.generate(prompts, **args)

    jax.clear_caches()  # programs of the same shapes compiled by other tests would hide the warm-up
    with counting_compilations() as warm_up:
        run()  # one compilation per program of this (batch, prompt, cache) bucket
    assert warm_up, "the warm-up compiled nothing: the counter does not see compilations"
    with counting_compilations() as compiled:
        for values in SWEEP:
            run(**values)
    assert compiled == [], f"{len(compiled)} compilations during the sweep"


def test_each_row_gets_its_tokens_alone_at_any_position_in_any_company(model):
    values = dict(temperature=[0.6, 1.0, 1.6, 1.0], top_k=[0, 5, 0, 1], top_p=[0.9, 1.0, 0.8, 0.7],
                  repetition_penalty=[1.0, 1.3, 1.1, 1.2], do_sample=[True, True, True, False],
                  max_new_tokens=[12, 7, 10, 5], seed=[3, 7, 2**40, 9], stop=[[], [4], [], []])
    batch = model.generate(PROMPTS, **values)
    for r, prompt in enumerate(PROMPTS):
        alone = {name: value[r] for name, value in values.items()}
        assert model.generate(prompt, **alone) == batch[r], r
    # Reversed order, and in other company: row 0 with two different prompts beside it.
    reversed_batch = model.generate(PROMPTS[::-1], **{name: value[::-1] for name, value in values.items()})
    assert reversed_batch == batch[::-1]
    first = {name: value[0] for name, value in values.items()}
    company = model.generate([[9, 9, 9, 9, 9, 9, 9], PROMPTS[0]], **{**first, "seed": [1, first["seed"]]})
    assert company[1] == batch[0]


def test_one_seed_gives_every_row_its_single_run_tokens(model):
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0, top_p=0.95, temperature=1.4, stop=[])
    together = model.generate(PROMPTS[:3], seed=7, **kwargs)
    assert [model.generate(p, seed=7, **kwargs) for p in PROMPTS[:3]] == together
    # The same prompt twice in a batch with one seed: the same tokens; with two seeds: (almost surely) not.
    twice = model.generate([PROMPTS[0], PROMPTS[0]], seed=7, **kwargs)
    assert twice[0] == twice[1] == together[0]
    assert model.generate([PROMPTS[0], PROMPTS[0]], seed=[7, 8], **kwargs)[1] != together[0]


def test_per_row_value_lists_must_match_the_batch(model):
    with pytest.raises(ValueError, match="temperature"):
        model.generate(PROMPTS[:2], temperature=[0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="stop"):
        model.generate(PROMPTS[:2], stop=[[1], [2], [3]])


def test_several_sequences_per_prompt(model):
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0, top_p=1.0, temperature=1.5, stop=[])
    three = model.generate(PROMPTS[0], num_return_sequences=3, seed=5, **kwargs)
    assert len(three) == 3 and all(row[:len(PROMPTS[0])] == PROMPTS[0] for row in three)
    assert three[0] == model.generate(PROMPTS[0], seed=5, **kwargs)  # sequence 0 is the single-sequence result
    assert len({tuple(row) for row in three}) == 3  # each sequence has its own key stream
    assert model.generate(PROMPTS[0], num_return_sequences=3, seed=5, **kwargs) == three
    # A batch: the sequences of each prompt together (transformers' order), each prompt's as when alone.
    batch = model.generate(PROMPTS[:2], num_return_sequences=3, seed=[5, 6], **kwargs)
    assert batch[:3] == three
    assert batch[3:] == model.generate(PROMPTS[1], num_return_sequences=3, seed=6, **kwargs)
    streamed = list(model.generate_yield(PROMPTS[0], num_return_sequences=3, seed=5, **kwargs))
    assert [[step[j] for step in streamed] for j in range(3)] == [row[len(PROMPTS[0]):] for row in three]
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(PROMPTS[0], num_return_sequences=0)
    with pytest.raises(TypeError, match="num_return_sequences"):
        model.generate(PROMPTS[0], num_return_sequences=True)


def test_recorded_scores_take_memory_in_proportion_to_the_steps(model):
    """output_scores/output_logits: the device state holds one step's [B, V], whatever the cache bucket (a
    history of the bucket's steps took 0.5 GB for one new token of a 600-token prompt on SmolLM2); the host
    keeps exactly the steps generated."""
    vocab = model.config.vocab_size
    for new_tokens in (1, 40):
        batch = generation.prepare_batch([[3] * 20], max_length=64, max_new_tokens=new_tokens, stop=[], pad_id=0,
                                         seed=0)
        rows = batch.tokens.shape[0]
        state = generation._started(model.decode, batch, None, record=True)
        assert state.scores.shape == state.logits.shape == (rows, vocab)
        # Besides the cache and that one step: the seen ids [B, V] bool, the tokens [B, steps] and a few flags.
        rest = sum(x.nbytes for x in jax.tree.leaves(state.replace(cache=None, scores=None, logits=None)))
        assert rest <= rows * vocab + 4 * rows * batch.plan.out_length + 64, batch.plan
    out = model.generate([[3] * 20], max_new_tokens=3, stop=[], return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    assert len(out.scores) == len(out.logits) == 3
    assert all(s.shape == (1, model.config.vocab_size) for s in out.scores + out.logits)
