"""`TextStreamer`: Hugging Face's streamer, printing or handing text pieces to `generate_yield`."""

from __future__ import annotations

from typing import Any

import transformers


class TextStreamer(transformers.TextStreamer):
    """Streams decoded text as tokens arrive (one prompt at a time).

    With `use_print=True` (the default) text is printed as it forms, like transformers' `TextStreamer`.
    With `use_print=False` nothing is printed: `generate_yield(..., streamer=streamer)` yields the text
    pieces instead. Words are released only once complete, so pieces never split a multi-byte character.
    """

    def __init__(self, tokenizer: Any, use_print: bool = True, skip_prompt: bool = False, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        self.use_print = use_print
        self._pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.use_print:
            super().on_finalized_text(text, stream_end)
        elif text:
            self._pieces.append(text)

    def take_pieces(self) -> list[str]:
        """The text pieces finalized since the last call (used by `generate_yield`)."""
        pieces, self._pieces = self._pieces, []
        return pieces
