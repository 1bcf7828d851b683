"""Word error rate: word-level Levenshtein distance over the reference words, after Whisper's
English normaliser (the demo report's and bench_asr's measure)."""

from __future__ import annotations

from jax_ifmvse.text.wer import english_normalizer, wer, wer_counts, word_errors


def test_word_errors_counts_substitutions_deletions_and_insertions():
    assert word_errors(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert word_errors(["a", "b", "c"], ["a", "x", "c"]) == 1  # substitution
    assert word_errors(["a", "b", "c"], ["a", "c"]) == 1  # deletion
    assert word_errors(["a", "b", "c"], ["a", "b", "c", "d", "e"]) == 2  # insertions
    assert word_errors(["a", "b", "c"], []) == 3 and word_errors([], ["x"]) == 1
    assert word_errors(["the", "cat", "sat"], ["cat", "sat", "the"]) == 2


def test_wer_normalises_case_punctuation_and_numbers_then_pools_words():
    norm = english_normalizer()
    refs = ["The road runs along the coast for ten miles.", "He parked the car."]
    hyps = ["the road runs along the coast for 10 miles", "He popped the car in"]
    # 0 errors in 9 words, then "parked" -> "popped" and "in" inserted: 2 in 4 words.
    assert wer_counts(refs, hyps, norm) == (2, 13)
    assert wer(refs, hyps, norm) == 2 / 13
    assert wer([], [], norm) == 0.0
