"""CLIP tokenizer: OpenAI's ids, int32, zero padded to the context."""

import pytest
import torch

from AnomalyCLIP_lib.tokenizer import tokenize


def test_prompt_ids_match_openai_bpe():
    ids = tokenize(["X X object.", "  Damaged   OBJECT. "])
    assert ids.dtype == torch.int32 and ids.shape == (2, 77)
    assert ids[0, :6].tolist() == [49406, 343, 343, 14115, 269, 49407]
    assert ids[1, :5].tolist() == [49406, 13568, 14115, 269, 49407]  # lower-cased, whitespace folded
    assert not ids[0, 6:].any() and not ids[1, 5:].any()


def test_too_long_text_is_refused():
    with pytest.raises(ValueError, match="more than the context"):
        tokenize("word " * 80)
