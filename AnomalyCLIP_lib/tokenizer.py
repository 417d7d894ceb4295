"""CLIP's byte-level BPE tokenizer (method §2), from the ``open_clip`` package.

open_clip ships OpenAI's ``bpe_simple_vocab_16e6`` vocabulary and the same cleaning
(ftfy, HTML unescape, whitespace folding, lower case), so ids equal OpenAI's.
"""

from __future__ import annotations

from functools import lru_cache

import torch

START_OF_TEXT = 49406
END_OF_TEXT = 49407


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Token ids, ``<|startoftext|> ... <|endoftext|>`` zero-padded, as int32 ``(N, context_length)``.

    Raises:
        ValueError: A text longer than the context.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.int32)
    for row, text in enumerate(texts):
        ids = [START_OF_TEXT, *tokenizer.encode(text), END_OF_TEXT]
        if len(ids) > context_length:
            raise ValueError(f"text {text!r} has {len(ids)} tokens, more than the context of {context_length}")
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return result
