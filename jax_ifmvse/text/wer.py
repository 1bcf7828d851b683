"""Word error rate of transcripts against reference texts, after Whisper's English normaliser."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def english_normalizer() -> Callable[[str], str]:
    """Whisper's English text normaliser (transformers' copy, no spelling map): case, punctuation,
    numbers ("ten" = "10") and contractions made comparable."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def word_errors(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)]


def wer_counts(
    refs: Sequence[str], hyps: Sequence[str], norm: Callable[[str], str]
) -> tuple[int, int]:
    """(word errors, reference words) over a corpus, after `norm`."""
    errors = words = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = norm(r).split(), norm(h).split()
        errors += word_errors(rw, hw)
        words += len(rw)
    return errors, words


def wer(refs: Sequence[str], hyps: Sequence[str], norm: Callable[[str], str]) -> float:
    """Corpus WER: total word errors over total reference words, after `norm`."""
    errors, words = wer_counts(refs, hyps, norm)
    return errors / max(words, 1)
