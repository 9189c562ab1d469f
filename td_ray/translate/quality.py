"""Checks on every translated row, for the defects users report in published MS MARCO translations.

Each check returns a flag as ``name: reason``. Flags are recorded with the row; a row is never dropped.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

from td_ray.config import QualityConfig

#: Subtitle and web markup: `{\fn...}` override tags, HTML/XML tags and entities.
_MARKUP = re.compile(r"\{\\[^}]*\}|</?[A-Za-z][^<>]{0,80}>|&(?:[a-z]+|#\d+);")
#: Scripts written without spaces between words. Hangul is not one of them: Korean puts spaces between words.
UNSPACED_SCRIPTS = {
    "cjk": re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),  # Han, hiragana, katakana
    "thai": re.compile(r"[\u0e00-\u0e7f]"),
    "lao": re.compile(r"[\u0e80-\u0eff]"),
    "tibetan": re.compile(r"[\u0f00-\u0fff]"),
    "myanmar": re.compile(r"[\u1000-\u109f]"),
    "khmer": re.compile(r"[\u1780-\u17ff]"),
}

#: Every flag name, in the order flags are reported.
FLAGS = ("empty_source", "empty_output", "punctuation_only", "markup", "repeated_ngram", "length_ratio",
         "copy_of_source", "decoding_limit")


def _is_punctuation_only(text: str) -> bool:
    return not any(unicodedata.category(char)[0] in "LN" for char in text)


def unspaced_script(text: str) -> str | None:
    """The script written without spaces (`UNSPACED_SCRIPTS`) that makes up over 30 % of `text`'s characters."""
    characters = [char for char in text if not char.isspace()]
    for name, pattern in UNSPACED_SCRIPTS.items():
        if characters and len(pattern.findall(text)) > 0.3 * len(characters):
            return name
    return None


def _units(text: str, size: int) -> tuple[list[str], int]:
    """Words, or characters for scripts without spaces (then n-grams are twice as long)."""
    if unspaced_script(text):
        return [char for char in text if not char.isspace()], size * 2
    return text.lower().split(), size


def _most_repeated(text: str, size: int) -> tuple[tuple[str, ...] | None, int]:
    units, size = _units(text, size)
    grams = Counter(tuple(units[i:i + size]) for i in range(len(units) - size + 1))
    if not grams:
        return None, 0
    gram, count = grams.most_common(1)[0]
    return gram, count


#: Where a sentence ends: after . ! ? and their full-width forms, before spaces or the next sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s*")


def _repeated_sentence(text: str, size: int) -> tuple[str | None, int]:
    """The sentence of at least `size` words (characters x2 in unspaced scripts) that occurs most often, and how
    often: MT models repeat whole sentences, which n-grams repeated `repeated_ngram_count` times miss.

    >>> _repeated_sentence("The cat sat on the mat. The cat sat on the mat. Fine.", 4)
    ('the cat sat on the mat.', 2)
    >>> _repeated_sentence("Yes. Yes. Yes.", 4)
    (None, 0)
    """
    sentences = [part.strip().lower() for part in _SENTENCE_END.split(text) if part.strip()]
    long_enough = Counter(sentence for sentence in sentences
                          if len(_units(sentence, size)[0]) >= _units(sentence, size)[1])
    if not long_enough:
        return None, 0
    return long_enough.most_common(1)[0]


def check_translation(source: str, output: str, quality: QualityConfig, hit_decoding_limit: bool = False) -> list[str]:
    """Flags for one (source, output) pair; empty when the output looks sound."""
    if not source.strip():
        return ["empty_source: the source text is empty, so is the translation"]
    flags = []
    if not output.strip():
        return ["empty_output: the model produced nothing for a non-empty source"]
    if _is_punctuation_only(output):
        flags.append(f"punctuation_only: output {output[:20]!r} has no letters or digits")
    source_markup = set(_MARKUP.findall(source))
    added = [tag for tag in _MARKUP.findall(output) if tag not in source_markup]
    if added:
        flags.append(f"markup: output holds {added[0][:30]!r}, which the source lacks")
    gram, count = _most_repeated(output, quality.repeated_ngram_size)
    sentence, repeats = _repeated_sentence(output, quality.repeated_ngram_size)
    if count >= quality.repeated_ngram_count and _most_repeated(source, quality.repeated_ngram_size)[1] < count:
        flags.append(f"repeated_ngram: {' '.join(gram)[:40]!r} occurs {count} times")
    elif repeats >= 2 and _repeated_sentence(source, quality.repeated_ngram_size)[1] < repeats:
        flags.append(f"repeated_ngram: the sentence {sentence[:40]!r} occurs {repeats} times")
    source_chars, output_chars = len(source.strip()), len(output.strip())
    if source_chars >= quality.ratio_min_source_chars:
        script = unspaced_script(output)
        scale = quality.unspaced_length_scale.get(script, 1.0) if script else 1.0
        ratio = output_chars / source_chars
        low, high = quality.min_length_ratio * scale, quality.max_length_ratio * scale
        if not low <= ratio <= high:
            flags.append(f"length_ratio: {ratio:.2f} (output/source characters) outside [{low:.3g}, {high:.3g}]"
                         + (f" ({script} bounds)" if script else ""))
    if output.strip().lower() == source.strip().lower() and sum(char.isalpha() for char in source) >= 3:
        flags.append("copy_of_source: output equals the source")
    if hit_decoding_limit:
        flags.append("decoding_limit: a segment stopped at the decoding length limit (output may be cut)")
    return flags


def flag_names(flags: list[str]) -> list[str]:
    return [flag.split(":", 1)[0] for flag in flags]
