"""Segmentation: passages into sentences, over-long sentences into chunks, and translations back into passages.

Sentences come from sentencex (Wikimedia's splitter): rule-based with abbreviation lists for about 250
languages through language fallbacks, no model download, and a compiled core fast enough for 8.8M passages.
Splitters that need a model (SaT/wtpsplit) or data downloads (NLTK punkt) cannot run offline, and English-only
rules (pysbd's default) would not serve other source languages.
"""
from __future__ import annotations

from collections.abc import Iterator

#: Scripts written without spaces between words: translations of their segments are joined without one.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "yue", "wuu", "th", "lo", "km", "my", "bo"})


def split_sentences(text: str, lang: str) -> list[str]:
    """The sentences of `text` in order, stripped, without empty ones."""
    from sentencex import segment

    return [sentence.strip() for sentence in segment(lang, text) if sentence.strip()]


def chunk_pieces(pieces: list[str], limit: int) -> Iterator[list[str]]:
    """Cut a sentencepiece sequence into chunks of at most `limit` pieces, at word starts where possible.

    A word start is a piece beginning with `▁`; a single word longer than `limit` is cut inside.
    """
    start = 0
    while len(pieces) - start > limit:
        end = start + limit
        cut = end
        while cut > start + 1 and not pieces[cut].startswith("▁"):
            cut -= 1
        if cut == start + 1 and not pieces[cut].startswith("▁"):
            cut = end  # no word start in reach: cut inside the word
        yield pieces[start:cut]
        start = cut
    if start < len(pieces):
        yield pieces[start:]


def joiner(lang: str) -> str:
    """How translated segments are joined in `lang`."""
    return "" if lang.split("-")[0].split("_")[0].lower() in UNSPACED_LANGUAGES else " "
