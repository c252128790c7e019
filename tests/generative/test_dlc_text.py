"""Caption tokenizer of text-to-code (generative.dlc): hand-computed ids, round trip over random
captions (hypothesis), padding, and the errors for unknown words, long captions and bad ids."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generative import datasets, dlc


def test_vocabulary_is_pad_then_sorted_distinct_words():
    vocab = dlc.caption_vocabulary(["a red circle", "A blue circle on plain red"])
    assert vocab == (dlc.CAPTION_PAD, "a", "blue", "circle", "on", "plain", "red")
    assert dlc.caption_vocabulary(["a blue circle on plain red", "a red circle"]) == vocab
    with pytest.raises(ValueError, match="no words"):
        dlc.caption_vocabulary(["", "  "])


def test_encode_gives_offset_plus_word_index_then_padding():
    vocab = (dlc.CAPTION_PAD, "a", "blue", "circle", "red")
    ids = dlc.encode_captions(["a red circle", "blue"], vocab, length=4, offset=65)
    # a=1, red=4, circle=3, blue=2; pad = offset + 0
    np.testing.assert_array_equal(ids, [[66, 69, 68, 65], [67, 65, 65, 65]])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(dlc.encode_captions("a red", vocab, 2), [[1, 4]])


def test_unknown_word_and_long_caption_errors_name_the_caption():
    vocab = dlc.caption_vocabulary(["a red circle"])
    with pytest.raises(ValueError, match="unknown word 'square'"):
        dlc.encode_captions(["a red square"], vocab, 5)
    with pytest.raises(ValueError, match="unknown word '<pad>'"):
        dlc.encode_captions(["a <pad>"], vocab, 5)
    with pytest.raises(ValueError, match="has 3 words; length=2"):
        dlc.encode_captions(["a red circle"], vocab, 2)
    with pytest.raises(ValueError, match="length must be"):
        dlc.encode_captions(["a"], vocab, 0)
    with pytest.raises(ValueError, match="must start with"):
        dlc.encode_captions(["a"], ("a", "red"), 3)
    with pytest.raises(ValueError, match=r"ids must be in \[10, 13\]"):
        dlc.decode_captions([[10, 14]], vocab, offset=10)


def test_shape_captions_round_trip():
    captions = [datasets.shape_example(0, "train", i)["caption"] for i in range(40)]
    vocab = dlc.caption_vocabulary(captions)
    ids = dlc.encode_captions(captions, vocab, 7, offset=33)
    assert ids.min() >= 33 and ids.max() < 33 + len(vocab)
    assert dlc.decode_captions(ids, vocab, offset=33) == captions


WORDS = st.text(alphabet="abcdefgh", min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(WORDS, min_size=0, max_size=6), min_size=1, max_size=5),
       st.integers(0, 300), st.integers(0, 3))
def test_round_trip_random_captions(word_lists, offset, extra):
    captions = [" ".join(ws) for ws in word_lists]
    if not any(word_lists):
        captions.append("x")
    vocab = dlc.caption_vocabulary(captions)
    length = max(len(c.split()) for c in captions) + extra
    ids = dlc.encode_captions(captions, vocab, length, offset=offset)
    assert ids.shape == (len(captions), length)
    assert dlc.decode_captions(ids, vocab, offset=offset) == captions
    # every word id is offset + its position in the vocabulary
    for c, row in zip(captions, ids):
        assert [vocab[i - offset] for i in row[:len(c.split())]] == c.split()
