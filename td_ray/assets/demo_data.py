"""A generated demo collection in which relevance is learnable.

The demo stands in for MS MARCO (English passages, training queries, BM25 candidates), for a
pre-translated passage corpus such as neuMARCO, and for a NeuCLIR-style evaluation collection. Text is
made of pseudo-words: each topic owns a vocabulary, so a query shares words with the passages of its
topic, and the synthetic target language is a word-for-word image of English through a fixed lexicon,
so a model can learn to match English queries against synthetic-language documents.

The vocabulary is fixed (independent of ``seed``), so tokenizers trained on
``corpus_sentences(any_seed)`` cover collections written with any seed; ``seed`` only drives which
passages, queries and judgements are sampled.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SYNTHETIC_LANG = "syn"
"""Language code of the synthetic target language."""
SECOND_SYNTHETIC_LANG = "qsy"
"""A second synthetic language (a private-use ISO 639 code), through its own lexicon and alphabet: Multilingual
Translate-Distill trains on both."""

MAX_TOPICS = 16
"""Number of topic vocabularies; ``DemoSizes.n_topics`` may use at most this many."""
WORDS_PER_TOPIC = 25
N_COMMON_WORDS = 80
MIN_QUERY_WORDS = 3
MAX_QUERY_WORDS = 5
TOPIC_WORD_RATE = 0.5
"""Share of topic words among the words of a passage sentence."""

_VOCAB_SEED = 20_240_611
_EN_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_EN_VOWELS = ["a", "e", "i", "o", "u"]
_EN_CODAS = ["", "", "", "n", "r", "l", "s", "k", "t"]
_SYN_ONSETS = ["c", "h", "j", "q", "w", "x", "y"]
_SYN_VOWELS = ["ø", "é", "å", "ü", "ä", "ö", "i"]
_SYN_CODAS = ["", "", "j", "x", "h"]
_SYN2_ONSETS = ["þ", "ð", "ł", "ñ", "ç", "ş", "ž"]
_SYN2_VOWELS = ["ā", "ē", "ī", "ō", "ū", "ə"]
_SYN2_CODAS = ["", "", "ŋ", "ʒ"]


@dataclass(frozen=True)
class DemoSizes:
    """How big the generated demo collection is."""

    n_topics: int = 12
    n_passages: int = 600
    n_train_queries: int = 900
    """A random-init student learns the lexicon only from many queries: with 160 it stayed at chance."""
    candidates_per_query: int = 10
    n_eval_docs: int = 240
    n_eval_topics: int = 16

    def validate(self) -> None:
        """Reject sizes the generator cannot honour."""
        if not 2 <= self.n_topics <= MAX_TOPICS:
            raise ValueError(f"n_topics must be in [2, {MAX_TOPICS}], got {self.n_topics}")
        if self.n_passages < self.n_topics or self.n_eval_docs < self.n_topics:
            raise ValueError("need at least one passage and one eval doc per topic")
        if not 2 <= self.candidates_per_query <= self.n_passages:
            raise ValueError("candidates_per_query must be in [2, n_passages]")
        if self.n_train_queries < 1 or self.n_eval_topics < 1:
            raise ValueError("need at least one training query and one eval topic")


@dataclass(frozen=True)
class _Vocabulary:
    """Topic and common pseudo-words plus the English -> synthetic lexicons."""

    topics: tuple[tuple[str, ...], ...]
    common: tuple[str, ...]
    lexicon: dict[str, str]
    second_lexicon: dict[str, str]


def _make_words(
    rng: random.Random, n: int, onsets: list[str], vowels: list[str], codas: list[str], taken: set[str]
) -> list[str]:
    """Draw ``n`` new distinct words of 2-3 syllables, each starting with a consonant."""
    words: list[str] = []
    while len(words) < n:
        n_syllables = 2 if rng.random() < 0.75 else 3
        syllables = [rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syllables)]
        word = "".join(syllables) + rng.choice(codas)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@lru_cache(maxsize=1)
def _vocabulary() -> _Vocabulary:
    """Build the fixed vocabulary and its bijective lexicon."""
    rng = random.Random(_VOCAB_SEED)
    taken: set[str] = set()
    n_words = MAX_TOPICS * WORDS_PER_TOPIC + N_COMMON_WORDS
    english = _make_words(rng, n_words, _EN_ONSETS, _EN_VOWELS, _EN_CODAS, taken)
    synthetic = _make_words(rng, n_words, _SYN_ONSETS, _SYN_VOWELS, _SYN_CODAS, taken)
    second = _make_words(rng, n_words, _SYN2_ONSETS, _SYN2_VOWELS, _SYN2_CODAS, taken)
    topics = tuple(
        tuple(english[i * WORDS_PER_TOPIC : (i + 1) * WORDS_PER_TOPIC]) for i in range(MAX_TOPICS)
    )
    common = tuple(english[MAX_TOPICS * WORDS_PER_TOPIC :])
    return _Vocabulary(topics=topics, common=common, lexicon=dict(zip(english, synthetic)),
                       second_lexicon=dict(zip(english, second)))


Sentence = tuple[str, ...]
"""Lowercase English words of one sentence, without punctuation."""


@dataclass(frozen=True)
class _Passage:
    topic: int
    sentences: tuple[Sentence, ...]

    def words(self) -> list[str]:
        return [w for s in self.sentences for w in s]


def _render(sentences: tuple[Sentence, ...], lexicon: dict[str, str] | None = None) -> str:
    """Join sentences into text: capitalised, full stops; translated word for word if a lexicon is given."""
    out = []
    for sentence in sentences:
        words = [lexicon[w] for w in sentence] if lexicon is not None else list(sentence)
        words[0] = words[0][0].upper() + words[0][1:]
        out.append(" ".join(words) + ".")
    return " ".join(out)


def _sentence(rng: random.Random, topic_words: tuple[str, ...], common: tuple[str, ...], length: int) -> Sentence:
    return tuple(
        rng.choice(topic_words) if rng.random() < TOPIC_WORD_RATE else rng.choice(common) for _ in range(length)
    )


def _topic_terms(vocab: _Vocabulary, passage: _Passage) -> list[str]:
    """Distinct topic words of ``passage``, sorted."""
    return sorted(set(passage.words()) & set(vocab.topics[passage.topic]))


def _passage(rng: random.Random, vocab: _Vocabulary, topic: int) -> _Passage:
    """2-4 sentences of one topic, redrawn until it holds enough distinct topic words for a query."""
    while True:
        sentences = tuple(
            _sentence(rng, vocab.topics[topic], vocab.common, rng.randint(6, 14)) for _ in range(rng.randint(2, 4))
        )
        passage = _Passage(topic=topic, sentences=sentences)
        if len(_topic_terms(vocab, passage)) >= MIN_QUERY_WORDS:
            return passage


def _query_words(rng: random.Random, vocab: _Vocabulary, passage: _Passage) -> list[str]:
    """3-5 distinct topic words of ``passage`` (as many as it has, at least 3)."""
    present = _topic_terms(vocab, passage)
    return rng.sample(present, min(rng.randint(MIN_QUERY_WORDS, MAX_QUERY_WORDS), len(present)))


def corpus_sentences(seed: int = 0) -> list[str]:
    """English and synthetic-language sentences covering the whole vocabulary, for training tokenizers.

    Every word opens one sentence (so its capitalised form is seen) and appears lowercase in another;
    random passage-like sentences add realistic frequencies. English sentences come first, then their
    translations into the synthetic language, then into the second one.
    """
    vocab = _vocabulary()
    rng = random.Random(seed)
    sentences: list[Sentence] = []
    groups = [*vocab.topics, vocab.common]
    for words in groups:
        for word in words:
            sentences.append((word, *_sentence(rng, words, vocab.common, rng.randint(5, 9))))
        shuffled = list(words)
        rng.shuffle(shuffled)
        for i in range(0, len(shuffled), 8):
            sentences.append((rng.choice(vocab.common), *shuffled[i : i + 8]))
    for _ in range(500):
        sentences.append(_sentence(rng, rng.choice(vocab.topics), vocab.common, rng.randint(6, 14)))
    english = [_render((s,)) for s in sentences]
    synthetic = [_render((s,), vocab.lexicon) for s in sentences]
    second = [_render((s,), vocab.second_lexicon) for s in sentences]
    return english + synthetic + second


def _write_atomic(path: Path, lines: list[str]) -> None:
    """Write lines to ``path`` via a temp file in the same directory and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _LexicalIndex:
    """Inverted index over passages, with a fixed tiny per-passage jitter that breaks score ties."""

    postings: dict[str, dict[int, int]]
    topics: list[int]
    jitter: list[float]

    @classmethod
    def build(cls, rng: random.Random, passages: list[_Passage]) -> _LexicalIndex:
        postings: dict[str, dict[int, int]] = {}
        for i, passage in enumerate(passages):
            for word, tf in Counter(passage.words()).items():
                postings.setdefault(word, {})[i] = tf
        jitter = [rng.random() * 1e-3 for _ in passages]
        return cls(postings=postings, topics=[p.topic for p in passages], jitter=jitter)

    def candidates(self, rng: random.Random, query: list[str], positive: int, k: int) -> list[tuple[int, float]]:
        """Top-``k`` passages by query-term frequency, positive forced in, ``k // 5`` (>= 1) from other topics.

        Slots that no matching passage fills get random non-matching ones. Returns
        ``(passage index, score)`` sorted by score descending.
        """
        matched: Counter[int] = Counter()
        for word in query:
            for i, tf in self.postings.get(word, {}).items():
                matched[i] += tf
        n = len(self.topics)

        def top(want: int, keep: Callable[[int], bool]) -> list[int]:
            hits = heapq.nlargest(want, (i for i in matched if keep(i)), key=lambda i: matched[i] + self.jitter[i])
            if len(hits) == want:
                return hits
            # Probe a random sample first; scan everything only when it falls short.
            probe = rng.sample(range(n), min(n, 8 * want + 16))
            misses = [i for i in probe if keep(i) and i not in matched]
            if len(misses) < want - len(hits):
                pool = [i for i in range(n) if keep(i) and i not in matched]
                misses = rng.sample(pool, min(want - len(hits), len(pool)))
            return hits + misses[: want - len(hits)]

        topic = self.topics[positive]
        same = top(k - max(1, k // 5), lambda i: self.topics[i] == topic)
        other = top(k - len(same), lambda i: self.topics[i] != topic)
        if positive not in same:
            same[-1] = positive
        scored = [(i, matched[i] + self.jitter[i]) for i in same + other]
        return sorted(scored, key=lambda t: -t[1])


@dataclass(frozen=True)
class _TrainingCollection:
    passages: list[_Passage]
    positives: list[int]
    queries: list[list[str]]
    candidates: list[list[tuple[int, float]]]
    """Per query: ``(passage index, score)`` by score descending."""
    index: _LexicalIndex


def _training_collection(rng: random.Random, vocab: _Vocabulary, sizes: DemoSizes) -> _TrainingCollection:
    """The training passages, queries, positives and candidates: the first draws of the collection's ``rng``."""
    passages = [_passage(rng, vocab, i % sizes.n_topics) for i in range(sizes.n_passages)]
    positives = (
        rng.sample(range(sizes.n_passages), sizes.n_train_queries)
        if sizes.n_train_queries <= sizes.n_passages
        else [rng.randrange(sizes.n_passages) for _ in range(sizes.n_train_queries)]
    )
    queries = [_query_words(rng, vocab, passages[p]) for p in positives]
    index = _LexicalIndex.build(rng, passages)
    candidates = [
        index.candidates(rng, query, pos, sizes.candidates_per_query) for query, pos in zip(queries, positives)
    ]
    return _TrainingCollection(
        passages=passages, positives=positives, queries=queries, candidates=candidates, index=index
    )


@dataclass(frozen=True)
class TrainingExample:
    """One English training query of the demo collection, with its positive and its candidates (as text)."""

    query: str
    positive: str
    candidates: tuple[str, ...]
    """The query's candidate passages, best-scored first; the positive is among them."""


def english_training_examples(
    sizes: DemoSizes = DemoSizes(), seed: int = 0, extra_queries: int = 0
) -> list[TrainingExample]:
    """The English training queries of ``write_demo_collection(_, sizes, seed)``, in memory, in qid order.

    Texts are exactly those of ``train_queries.tsv`` and ``passages.tsv``; only the training part of the
    collection is generated, never the evaluation collection. ``extra_queries`` more examples follow, drawn
    the same way (a random training passage as positive, some of its topic words as query, candidates from
    the same lexical index) but from a separate random stream, so the collection's files do not change.
    """
    sizes.validate()
    vocab = _vocabulary()
    train = _training_collection(random.Random(seed), vocab, sizes)
    positives, queries, candidates = list(train.positives), list(train.queries), list(train.candidates)
    rng = random.Random(f"td_ray-demo-extra-queries-{seed}")
    for _ in range(extra_queries):
        pos = rng.randrange(sizes.n_passages)
        query = _query_words(rng, vocab, train.passages[pos])
        positives.append(pos)
        queries.append(query)
        candidates.append(train.index.candidates(rng, query, pos, sizes.candidates_per_query))
    texts = [_render(p.sentences) for p in train.passages]
    return [
        TrainingExample(
            query=" ".join(query), positive=texts[pos], candidates=tuple(texts[pi] for pi, _ in ranking)
        )
        for query, pos, ranking in zip(queries, positives, candidates)
    ]


def write_demo_collection(out_dir: Path, sizes: DemoSizes = DemoSizes(), seed: int = 0) -> dict[str, Path]:
    """Write the demo collection into ``out_dir``; return file name key -> path of each file written.

    Keys: passages, passages_syn, passages_qsy, train_queries, train_qrels, candidates, eval_docs, eval_docs_syn,
    eval_docs_qsy, eval_topics, eval_qrels, lexicon, lexicon_qsy.
    """
    sizes.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary()
    rng = random.Random(seed)

    train = _training_collection(rng, vocab, sizes)
    passages, positives, queries = train.passages, train.positives, train.queries
    run_lines = []
    for qi, ranking in enumerate(train.candidates):
        for rank, (pi, score) in enumerate(ranking, 1):
            run_lines.append(f"q{qi} Q0 p{pi} {rank} {score:.4f} demo-bm25")

    docs = [_passage(rng, vocab, i % sizes.n_topics) for i in range(sizes.n_eval_docs)]
    docs_by_topic: dict[int, list[int]] = {t: [] for t in range(sizes.n_topics)}
    for di, doc in enumerate(docs):
        docs_by_topic[doc.topic].append(di)
    # Eval topics sharing a vocabulary topic get distinct seed docs (cycling if they run out).
    seed_order = {t: rng.sample(ids, len(ids)) for t, ids in docs_by_topic.items()}
    topic_lines, qrel_lines = [], []
    for ti in range(sizes.n_eval_topics):
        topic = ti % sizes.n_topics
        seed_doc = seed_order[topic][(ti // sizes.n_topics) % len(seed_order[topic])]
        words = _query_words(rng, vocab, docs[seed_doc])
        topic_lines.append(f"t{ti}\t{' '.join(words)}")
        for di in docs_by_topic[topic]:
            high = set(words) <= set(docs[di].words())
            qrel_lines.append(f"t{ti} 0 d{di} {2 if di == seed_doc or high else 1}")
        others = [di for di in range(sizes.n_eval_docs) if docs[di].topic != topic]
        for di in sorted(rng.sample(others, min(5, len(others)))):
            qrel_lines.append(f"t{ti} 0 d{di} 0")

    files: dict[str, tuple[str, list[str]]] = {
        "passages": ("passages.tsv", [f"p{i}\t{_render(p.sentences)}" for i, p in enumerate(passages)]),
        "passages_syn": (
            f"passages.{SYNTHETIC_LANG}.tsv",
            [f"p{i}\t{_render(p.sentences, vocab.lexicon)}" for i, p in enumerate(passages)],
        ),
        "passages_qsy": (
            f"passages.{SECOND_SYNTHETIC_LANG}.tsv",
            [f"p{i}\t{_render(p.sentences, vocab.second_lexicon)}" for i, p in enumerate(passages)],
        ),
        "train_queries": ("train_queries.tsv", [f"q{i}\t{' '.join(q)}" for i, q in enumerate(queries)]),
        "train_qrels": ("train_qrels.txt", [f"q{i} 0 p{p} 1" for i, p in enumerate(positives)]),
        "candidates": ("candidates.trec", run_lines),
        "eval_docs": ("eval_docs.tsv", [f"d{i}\t{_render(d.sentences)}" for i, d in enumerate(docs)]),
        "eval_docs_syn": (
            f"eval_docs.{SYNTHETIC_LANG}.tsv",
            [f"d{i}\t{_render(d.sentences, vocab.lexicon)}" for i, d in enumerate(docs)],
        ),
        "eval_docs_qsy": (
            f"eval_docs.{SECOND_SYNTHETIC_LANG}.tsv",
            [f"d{i}\t{_render(d.sentences, vocab.second_lexicon)}" for i, d in enumerate(docs)],
        ),
        "eval_topics": ("eval_topics.tsv", topic_lines),
        "eval_qrels": ("eval_qrels.txt", qrel_lines),
        "lexicon": ("lexicon.tsv", [f"{en}\t{syn}" for en, syn in vocab.lexicon.items()]),
        "lexicon_qsy": (f"lexicon.{SECOND_SYNTHETIC_LANG}.tsv",
                         [f"{en}\t{syn}" for en, syn in vocab.second_lexicon.items()]),
    }
    written = {}
    for key, (name, lines) in files.items():
        path = out_dir / name
        _write_atomic(path, lines)
        written[key] = path
    logger.info(
        "wrote demo collection to %s: %d passages, %d queries, %d eval docs, %d eval topics (seed %d)",
        out_dir, sizes.n_passages, sizes.n_train_queries, sizes.n_eval_docs, sizes.n_eval_topics, seed,
    )
    return written
