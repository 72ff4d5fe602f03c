"""What the prompt learners need of a text tower's tokenizer, whichever kind it is: CLIP's byte-level BPE (a start
token, pad id 0) or a Hugging Face tokenizer as open_clip wraps it (SigLIP's sentencepiece, SigLIP 2's Gemma: no start
token, their own pad id, their own cleaning of the text)."""

from __future__ import annotations

from typing import Sequence

import torch


class Tokens:
    """A tokenizer facade: ``n_start`` (special tokens before the text: 1 for CLIP's start token, 0 for SigLIP's),
    ``pad_id``, ``encode`` (a text's own tokens, without specials, cleaned as the tokenizer cleans it) and
    ``__call__`` (texts to a (N, context_length) tensor, as the tower's own tokenizer gives them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer keeps the transformers one here
        self.hf = hf if hf is not None and hasattr(hf, "pad_token_id") else None
        self.context_length = int(tokenizer.context_length)
        if self.hf is None:
            self.n_start, self.n_special, self.pad_id, self.kind = 1, 2, 0, "clip_bpe"  # SOT, EOT
            return
        self.kind = "hf"
        self.pad_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else 0
        own = self.encode("x")
        full = list(self.hf(self._clean("x"), add_special_tokens=True).input_ids)
        self.n_start = next((i for i in range(len(full)) if full[i:i + len(own)] == own), 0)
        self.n_special = len(full) - len(own)

    def _clean(self, text: str) -> str:
        clean = getattr(self.tokenizer, "clean_fn", None)
        return clean(text) if clean is not None else text

    def encode(self, text: str) -> list:
        if self.hf is None:
            return self.tokenizer.encode(text)
        return list(self.hf(self._clean(text), add_special_tokens=False).input_ids)

    def overflowing(self, texts: Sequence[str]) -> list[int]:
        """Indices of the texts whose tokens, special tokens included, exceed the context length: the tokenizer would
        cut them (found by length, since a cut SigLIP text ends with its end token, which is also its padding)."""
        return [i for i, text in enumerate(texts) if len(self.encode(text)) + self.n_special > self.context_length]

    def decode(self, token_id: int) -> tuple[str, str]:
        """(the token as the vocabulary spells it, the text it decodes to) of one id."""
        if self.hf is not None:
            return str(self.hf.convert_ids_to_tokens(token_id)), self.hf.decode([token_id]).strip()
        return self.tokenizer.decoder.get(token_id, str(token_id)), self.tokenizer.decode([token_id]).strip()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))
