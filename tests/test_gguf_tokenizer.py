"""The tokenizer built from a GGUF file's metadata without torch (converters.gguf_tokenizer) equals transformers'
own GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`, which needs torch): same tokens on
unicode, whitespace runs, special tokens inside text and chat templates, same special tokens and template; and
what `save_tokenizer` writes into ckpt/ loads back with `AutoTokenizer` to the same tokenizer.

Checked on the real default model (SmolLM2-135M-Instruct's GGUF, byte-level BPE) and on tiny GGUFs with a
byte-level (gpt2) and a sentencepiece (llama) vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer

from converters import CheckpointError, load_tokenizer, save_tokenizer
from converters.gguf_tokenizer import gguf_tokenizer
from hdex_jax import hub
from tests.helpers_tiny import CHAT_TEMPLATE, write_tiny_gguf

TEXTS = [
    "",
    "What is the capital of France?",
    "  two leading spaces, then   three, then a trailing one ",
    "tabs\tand\t\ttabs, newlines\nand\n\n\nmore\r\nwindows",
    "      ",
    "\n",
    "accents: café naïve déjà vu Ångström façade",
    "CJK: 日本語のテキスト、中文文本，한국어",
    "emoji: 😀🎉 👍🏽 👩‍👩‍👧 ❤️",
    "numbers 1234567 3.14159 and 1,000,000",
    "code: def f(x):\n    return x ** 2  # square",
    "<s>special tokens</s> inside <unk> text <pad>",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
    "no space before<|im_end|>after",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋\n\tthere"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本語で答えて"}],
]


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's GGUF, fetched once per test session into a temporary HDEX_HOME (never the user's)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDEX_HOME", str(tmp_path_factory.mktemp("smollm2_home")))
        return hub.default_model_gguf()


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama GGUFs with a byte-level (gpt2) and a sentencepiece (llama) vocabulary, both with a chat
    template."""
    directory = tmp_path_factory.mktemp("tiny_gguf")
    paths = {}
    for model in ("gpt2", "llama"):
        paths[model] = directory / f"tiny-{model}.gguf"
        write_tiny_gguf(paths[model], "F32", tokenizer_model=model, chat_template=CHAT_TEMPLATE)
    return paths


def _reference(path: Path):
    """transformers' own tokenizer of a GGUF file (its reader needs torch, which the test extra has)."""
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def assert_same_tokenizer(ours, reference) -> None:
    """Same ids (with and without special tokens), decoding, special tokens and chat template."""
    for text in TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.chat_template == reference.chat_template
    for messages in CHATS:
        assert _chat_ids(ours, messages) == _chat_ids(reference, messages)
    assert ours.special_tokens_map == reference.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id)
    assert ours.all_special_ids == reference.all_special_ids
    assert ours.get_vocab() == reference.get_vocab()
    assert len(ours) == len(reference)


def test_default_model_gguf_tokenizer_equals_transformers(smollm2_gguf: Path, tmp_path: Path) -> None:
    reference = _reference(smollm2_gguf)
    ours = gguf_tokenizer(smollm2_gguf)
    assert_same_tokenizer(ours, reference)
    # The backend is the very tokenizer transformers builds: same model, normalizer, pre-tokenizer, decoder.
    assert ours.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    # SmolLM2's chat turns: <|im_start|> and <|im_end|> stay single special tokens.
    chat = _chat_ids(ours, CHATS[0])
    assert chat.count(ours.convert_tokens_to_ids("<|im_start|>")) == 3
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")

    save_tokenizer(smollm2_gguf, tmp_path / "ckpt")
    assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "ckpt"), reference)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_tiny_gguf_tokenizer_equals_transformers(model: str, tiny_ggufs: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_ggufs[model]
    reference = _reference(path)
    ours = load_tokenizer(path)
    assert_same_tokenizer(ours, reference)
    assert ours.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    # A sentencepiece vocabulary without an add_bos flag gets a BOS, as llama.cpp does; a byte-level one none.
    assert (ours.encode("the")[0] == ours.bos_token_id) == (model == "llama")

    save_tokenizer(path, tmp_path / "ckpt")
    assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "ckpt"), reference)


def test_init_kwargs_override_the_file(tiny_ggufs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(tiny_ggufs["gpt2"], padding_side="left")
    assert tokenizer.padding_side == "left"
    assert tokenizer(["the", "the cat"], padding=True)["input_ids"][0][0] == tokenizer.pad_token_id


def _metadata_only_gguf(path: Path, tokenizer_model: str | None, tokens: list[str] | None) -> Path:
    """A llama GGUF holding nothing but the given tokenizer metadata."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
    if tokens is not None:
        writer.add_token_list(tokens)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_without_a_vocabulary(tmp_path: Path) -> None:
    path = _metadata_only_gguf(tmp_path / "novocab.gguf", "gpt2", None)
    with pytest.raises(CheckpointError, match="no tokenizer.ggml.tokens"):
        load_tokenizer(path)


def test_gguf_with_a_tokenizer_model_transformers_cannot_build(tmp_path: Path) -> None:
    # "rwkv" is a llama.cpp tokenizer model transformers has no builder for.
    path = _metadata_only_gguf(tmp_path / "rwkv.gguf", "rwkv", ["a", "b"])
    with pytest.raises(CheckpointError, match="cannot build the tokenizer.*rwkv"):
        load_tokenizer(path)
