"""Typed pipeline configuration, loaded from YAML: one pydantic model per stage.

Every field has a description (``td-ray config-schema`` prints them all). Unknown keys are errors, so a typo
never silently falls back to a default. Paths may contain ``{workspace}``, replaced by the workspace root.
"""
from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from td_ray.errors import TdRayError


class ConfigError(TdRayError):
    """A config file that cannot be used: the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- sources
class _Source(_Strict):
    limit: int | None = Field(
        None, ge=1, description="Read only the first N records, for a small real run: rows of docs, queries and "
        "qrels; for data.candidates, the first N queries with all their candidates, and then only the passages and "
        "training queries (and their pre-translations) those candidates name.",
    )


class _TextPolicies(_Source):
    """What ingest does with the defects real collections carry; applies when the source gives docs or queries."""

    duplicates: Literal["error", "keep_first"] = Field(
        "error", description="A repeated id: stop with an error naming it, or keep its first row (the rest are "
        "counted and logged).",
    )
    invalid_text: Literal["error", "replace"] = Field(
        "error", description="Text that is not valid Unicode (lone surrogates): stop naming the id, or replace the "
        "bad code points with U+FFFD.",
    )


class _LocalTextPolicies(_TextPolicies):
    repair: Literal["none", "ftfy"] = Field(
        "none", description="Repair mojibake only (UTF-8 read as Latin-1 or Windows-1252, such as `Ã©` for `é`) "
        "with ftfy before use, as ir_datasets repairs MS MARCO: quotes stay curly, and nothing else is normalised. "
        "The repair applied is recorded with the ingested table. ir_datasets repairs MS MARCO itself.",
    )


class TsvSource(_LocalTextPolicies):
    """A tab-separated file of docs or queries (MS MARCO's ``id<TAB>text`` by default)."""

    format: Literal["tsv"] = Field(description="Local TSV file (no quoting, like MS MARCO's collection.tsv).")
    path: str = Field(description="Path to the file; `{workspace}` is replaced by the workspace root.")
    header: bool = Field(False, description="The first line names the columns.")
    id_column: str | int = Field(0, description="Id column: a 0-based index, or a name when `header` is set.")
    text_column: str | int = Field(1, description="Text column: a 0-based index, or a name when `header` is set.")


class JsonlSource(_LocalTextPolicies):
    """JSON lines with an id field and one or more text fields (joined with a space)."""

    format: Literal["jsonl"] = Field(description="Local JSON-lines file (.jsonl or .jsonl.gz).")
    path: str = Field(description="Path to the file; `{workspace}` is replaced by the workspace root.")
    id_field: str = Field("id", description="Field holding the id (string or integer; stored as string).")
    text_fields: list[str] = Field(["text"], description="Fields joined with a space to make the text.")


class ParquetSource(_LocalTextPolicies):
    """A Parquet file or directory with an id and a text column."""

    format: Literal["parquet"] = Field(description="Local Parquet file or directory.")
    path: str = Field(description="Path to the file or directory; `{workspace}` is replaced.")
    id_column: str = Field("id", description="Column holding the id.")
    text_column: str = Field("text", description="Column holding the text.")


class TrecRunSource(_Source):
    """A TREC run file (``qid Q0 docid rank score tag``), used for first-stage candidates."""

    format: Literal["trec_run"] = Field(description="TREC run file: qid Q0 docid rank score tag.")
    path: str = Field(description="Path to the run file; `{workspace}` is replaced.")


class TrecQrelsSource(_Source):
    """A TREC qrels file (``qid iter docid relevance``)."""

    format: Literal["trec_qrels"] = Field(description="TREC qrels file: qid 0 docid relevance.")
    path: str = Field(description="Path to the qrels file; `{workspace}` is replaced.")


class IrDatasetsSource(_TextPolicies):
    """A dataset read through ir_datasets' own API (docs, queries, qrels or scoreddocs by role)."""

    format: Literal["ir_datasets"] = Field(description="Read through ir_datasets, e.g. msmarco-passage/train.")
    id: str = Field(description="ir_datasets id, e.g. `msmarco-passage/train`, `neumarco/zh/train`, "
                    "`neuclir/1/zh/trec-2022`.")
    text_fields: list[str] | None = Field(
        None,
        description="Record fields joined to make the text, e.g. [title, text] for NeuCLIR documents or "
        "[title] for NeuCLIR topics. Default: the record's `text` field.",
    )


DataSource = Annotated[
    TsvSource | JsonlSource | ParquetSource | TrecRunSource | TrecQrelsSource | IrDatasetsSource,
    Field(discriminator="format"),
]


# ---------------------------------------------------------------------------------------------- sections
class RayConfig(_Strict):
    """Where the Ray cluster is."""

    address: str | None = Field(
        None, description="Ray address: none starts a local cluster; `auto` joins the cluster this job runs on."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (local only; default all).")


class PromoteConfig(_Strict):
    """Move a registry alias to a newly distilled student only when its evaluation beats the alias's version on the
    same evaluation (the same documents, topics, qrels, index settings and measure)."""

    metric: str = Field("nDCG@20", description="The ir_measures name compared; one of evaluate.measures.")
    alias: str = Field("champion", description="Registry alias moved to the better student.")
    min_delta: float = Field(0.0, ge=0, description="How much the new student must exceed the alias's version by.")


class MlflowConfig(_Strict):
    """Where runs and models are tracked."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else sqlite under the workspace "
        "(`{workspace}/mlflow/mlflow.db`, so the model registry works).",
    )
    experiment: str = Field("td-ray", description="Experiment name; each pipeline run is one parent run in it.")
    registered_model: str = Field("td-ray-student", description="Registry name the distilled student is registered under.")
    alias: str = Field("candidate", description="Registry alias set on the newly registered version.")
    promote: PromoteConfig | None = Field(
        None, description="After evaluate, move promote.alias to the new student only if it beats that alias's "
        "version on the same evaluation; each version is tagged with its evaluation. Null: no promotion.",
    )


class DataConfig(_Strict):
    """The inputs of the whole pipeline. Ids are strings throughout."""

    passages: DataSource = Field(description="English training passages (e.g. msmarco-passage/train docs).")
    train_queries: DataSource = Field(description="English training queries (e.g. msmarco-passage/train queries).")
    candidates: DataSource = Field(
        description="First-stage candidates per training query: a TREC run or ir_datasets scoreddocs."
    )
    train_qrels: DataSource | None = Field(
        None, description="Relevance judgements of the training queries (e.g. msmarco-passage/train qrels): the "
        "positives of the Translate-Train baseline (`distill.positives: qrels`).",
    )
    eval_docs: DataSource = Field(description="Evaluation collection, in the language the student is trained for.")
    eval_topics: DataSource = Field(description="Evaluation topics (English queries).")
    eval_qrels: DataSource = Field(description="Graded relevance judgements for the evaluation topics.")


def _check_language_code(code: str, field: str) -> str:
    import langcodes

    if not langcodes.tag_is_valid(code):
        raise ValueError(
            f"{field} {code!r} is not a known language code; use an ISO 639 / BCP 47 code such as zh, fa, ru, "
            "zh-Hans, or qaa-qtz for a private language"
        )
    return code


class TranslateTarget(_Strict):
    """One target language: translated by a CTranslate2 model, or read from a pre-translated collection."""

    lang: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,15}$",
                      description="Language code of the output (ISO 639 / BCP 47), e.g. zh, fa, ru.")
    model: str | None = Field(
        None,
        description="MT model: a CTranslate2 model directory, or a Marian (opus-mt) HF directory or hub id, "
        "converted to CTranslate2 once into the workspace.",
    )
    pretranslated: DataSource | None = Field(
        None,
        description="An existing translation of the passages (e.g. ir_datasets `neumarco/zh/train`), used "
        "instead of an MT model.",
    )
    source_prefix: str | None = Field(
        None, description="Token put before every source segment: the target token of multi-target opus-mt models "
        "(e.g. `>>cmn_Hans<<` for Helsinki-NLP/opus-mt-en-zh), or the source language token of NLLB (`eng_Latn`) "
        "and M2M100 (`__en__`).",
    )
    target_prefix: str | None = Field(
        None, description="Token that starts every translation (CTranslate2 `target_prefix`): the target language "
        "of a multilingual model, e.g. `zho_Hans` for NLLB or `__zh__` for M2M100. One model then serves many "
        "targets, each with its own prefix.",
    )
    pretranslated_queries: DataSource | None = Field(
        None, description="An existing translation of the training queries (optional)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TranslateTarget:
        _check_language_code(self.lang, "lang")
        if (self.model is None) == (self.pretranslated is None):
            raise ValueError(f"target {self.lang!r}: set exactly one of `model` or `pretranslated`")
        return self


class ActorPoolConfig(_Strict):
    """How a stage's Ray Data actor pool is sized: shared by translate, score and index."""

    batch_size: int = Field(64, ge=1, description="Rows per Ray Data batch handed to one actor call.")
    num_actors: int = Field(1, ge=1, description="Actors in the pool (its minimum when max_actors is set); each "
                            "loads its model once.")
    max_actors: int | None = Field(
        None, ge=1, description="Set to autoscale the pool between num_actors and max_actors with the backlog."
    )
    num_cpus_per_actor: float = Field(
        0.5, gt=0, description="CPUs reserved per actor; below 1 so read tasks are never starved on small nodes."
    )
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (fractions allowed; 0 on CPU nodes).")

    @model_validator(mode="after")
    def _pool_bounds(self) -> ActorPoolConfig:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be at least num_actors ({self.num_actors})")
        return self


class DecodingConfig(_Strict):
    """CTranslate2 decoding settings (``Translator.translate_batch``)."""

    beam_size: int = Field(1, ge=1, description="Beam size (1 = greedy).")
    max_decoding_length: int = Field(256, ge=1, description="Most target tokens generated per segment.")
    decoding_length_ratio: float | None = Field(
        None, gt=0, description="Also cap each batch's decoding length at ratio x its longest source segment + 8 "
        "tokens, so a degenerate model cannot decode to max_decoding_length every time.",
    )
    length_penalty: float = Field(1.0, description="Beam search length penalty.")
    repetition_penalty: float = Field(1.0, ge=1.0, description="Penalty on tokens already generated (1 = none).")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")
    replace_unknowns: bool = Field(False, description="Replace <unk> outputs by the source token with most attention.")


class QualityConfig(_Strict):
    """Checks run on every translated row; a flagged row is kept, with its reasons, never dropped."""

    min_length_ratio: float = Field(0.2, gt=0, description="Flag output shorter than this x the source (characters).")
    max_length_ratio: float = Field(4.0, gt=0, description="Flag output longer than this x the source (characters).")
    unspaced_length_scale: dict[Literal["cjk", "thai", "lao", "khmer", "myanmar", "tibetan"], float] = Field(
        {"cjk": 0.3, "thai": 1.0, "lao": 1.0, "khmer": 1.0, "myanmar": 1.0, "tibetan": 1.0},
        description="Output characters per source character expected of a translation into a script written "
        "without spaces (keys: cjk, thai, lao, khmer, myanmar, tibetan); the length-ratio bounds are multiplied by "
        "it. Chinese runs at 0.2-0.3 characters per English character (one character is often a word); Hangul is "
        "spaced and keeps the plain bounds.",
    )
    ratio_min_source_chars: int = Field(
        20, ge=1, description="Length ratios are checked only for sources of at least this many characters."
    )
    repeated_ngram_size: int = Field(4, ge=2, description="Word n-gram size for the repetition check (x2 characters "
                                     "for scripts written without spaces).")
    repeated_ngram_count: int = Field(3, ge=2, description="Flag an n-gram seen this many times or more in the output "
                                      "when the source repeats no n-gram that often.")
    retry: DecodingConfig | None = Field(
        DecodingConfig(beam_size=4, repetition_penalty=1.2, no_repeat_ngram_size=4),
        description="Decoding settings for one more try on flagged rows (the try with fewer flags is kept); "
        "null turns retries off.",
    )


class TranslateConfig(ActorPoolConfig):
    """translate: English passages and queries into each target language with CTranslate2 actors.

    Incremental: rows are keyed by (id, lang, MT model, hash of the source text) and committed per block, so a
    re-run, a killed run started again, a new language or an edited source translates only what is missing.
    """

    batch_size: int = Field(
        1000, ge=1, description="Rows per block: each actor call translates one block and commits it as one store "
        "file, so this is also the unit of resume (fewer, larger files at MS MARCO scale).",
    )
    targets: list[TranslateTarget] = Field(min_length=1, description="Target languages, each with its model or source.")
    translate_queries: bool = Field(True, description="Also translate the training queries with each MT model.")
    source_lang: str = Field("en", description="Language of the source text (picks the sentence splitter's rules).")
    split_sentences: bool = Field(
        True, description="Translate sentence by sentence (sentencex) and join the translations in order; MT models "
        "are trained on sentences and drop or repeat content in long inputs.",
    )
    max_input_length: int = Field(
        200, ge=8, description="Most source tokens per segment, special tokens included; a longer sentence is cut into "
        "chunks at word boundaries and each chunk translated, never truncated.",
    )
    max_batch_tokens: int = Field(
        4096, ge=16, description="Token budget per CTranslate2 batch (`max_batch_size` with `batch_type=tokens`).",
    )
    length_bucketing: bool = Field(
        True, description="Sort each block's segments by length before batching, so batches hold similar lengths "
        "and little padding.",
    )
    decoding: DecodingConfig = Field(DecodingConfig(), description="CTranslate2 decoding settings.")
    quality: QualityConfig = Field(QualityConfig(), description="Checks on every output row, and retries.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="CTranslate2 device; auto picks cuda when CTranslate2 sees a GPU and the actor reserved "
        "one (num_gpus_per_actor above 0).",
    )
    compute_type: Literal["auto", "default", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                          "float16", "bfloat16", "float32"] = Field(
        "auto", description="CTranslate2 precision. auto: bfloat16 (else float16) on a GPU; int8 on a CPU (3.2x HF "
        "generate against 1.2x for float32) when a sample of each actor's first block is flagged by the quality "
        "checks as often as in float32, else float32. default keeps the converted model's own.")
    blocks_in_flight: int = Field(
        2, ge=1, description="Blocks each translator actor works on at once: one block's retries, checks and commit "
        "overlap the next one's translation (CTranslate2 queues both); 1 runs them in series.")
    intra_threads: int = Field(1, ge=0, description="CTranslate2 threads per batch within an actor (0 = all cores).")
    inter_threads: int = Field(1, ge=1, description="Batches an actor's translator runs in parallel.")

    @model_validator(mode="after")
    def _source_lang_known(self) -> TranslateConfig:
        _check_language_code(self.source_lang, "translate.source_lang")
        return self


class ScoreImport(_Strict):
    """A teacher score file made elsewhere, imported instead of scoring (never unpickled)."""

    format: Literal["colbertx", "st_hard_negatives", "pylate"] = Field(
        description="colbertx: JSON lines `[qid, [pid, score], ...]` (e.g. hltcoe/tdist-msmarco-scores); "
        "st_hard_negatives: sentence-transformers' `{qid, pos, neg}` lines with ce-scores; "
        "pylate: `{query_id, document_ids, scores}` rows (JSON lines or Parquet)."
    )
    path: str = Field(description="The file (.jsonl, .jsonl.gz, or .parquet for pylate); `{workspace}` is replaced.")


class ScoreConfig(ActorPoolConfig):
    """score: a teacher scores each training query's candidates, or a score file is imported."""

    teacher: str | None = Field(
        None, description="Teacher model: local directory or hub id; a one-logit sequence-classification "
        "cross-encoder, or a monoT5/mT5 reranker with `teacher_kind: seq2seq`.",
    )
    teacher_kind: Literal["cross_encoder", "seq2seq"] = Field(
        "cross_encoder", description="cross_encoder: the score is the relevance logit. seq2seq (monoT5, mT5): the "
        "score is log P(true_word) against false_word at the first decoding step of `template`.",
    )
    true_word: str = Field("true", description="seq2seq: the word meaning relevant (monoT5: true; mMARCO's mT5: yes).")
    false_word: str = Field("false", description="seq2seq: the word meaning not relevant (monoT5: false; mT5: no).")
    template: str = Field("Query: {query} Document: {document} Relevant:",
                          description="seq2seq: the input text; holds {query} and {document} once each.")
    batch_size: int = Field(
        4096, ge=1, description="Pairs per block: each teacher call scores one block (in token-budget forward passes) "
        "and commits it as one file, the unit of resume (26.5 M pairs make about 6.5 k files).",
    )
    max_batch_tokens: int | None = Field(None, ge=16, description="Token budget per forward pass: count x longest "
                                         "pair, pairs sorted by length (default 16384).")
    tokenizers: int = Field(1, ge=1, description="CPU actors that look pair texts up and tokenize them for the "
                            "teachers (add one per 2-4 GPU teachers if the GPUs wait).")
    num_cpus_per_tokenizer: float = Field(0.5, gt=0, description="CPUs reserved per tokenizing actor.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="seq2seq: auto runs bf16 on GPU and fp32 on CPU (float16 overflows in T5)."
    )
    import_scores: ScoreImport | None = Field(
        None, description="Import this score file instead of running a teacher (set either this or `teacher`)."
    )
    teacher_revision: str | None = Field(None, description="Hub revision (commit) of the teacher, for provenance.")
    passage_lang: str = Field(
        "en", description="Language of the passages the teacher sees: `en` (English x English) or a target lang (CLIR)."
    )
    query_lang: str = Field(
        "en", description="Language of the queries the teacher sees: `en`, or the passage language for a "
        "translated x translated teacher (the queries must then be translated: translate.translate_queries).",
    )
    top_k: int = Field(50, ge=1, description="Candidates kept per query (the paper uses the top 50).")
    max_length: int = Field(256, ge=8, description="Most tokens of query + passage fed to the teacher.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")

    @model_validator(mode="after")
    def _one_source(self) -> ScoreConfig:
        if (self.teacher is None) == (self.import_scores is None):
            raise ValueError("set exactly one of `teacher` (score with a model) or `import_scores` (a score file)")
        if self.teacher_kind == "seq2seq":
            split_template(self.template)
        return self

    @property
    def provenance(self) -> str:
        """Where the scores come from, as recorded with them and on the registered student."""
        if self.import_scores is not None:
            return f"import:{self.import_scores.format}:{Path(self.import_scores.path).name}"
        return self.teacher


#: Distill settings that change how training is run, never what it computes: changing them resumes the run.
OPERATIONAL_DISTILL_FIELDS = frozenset({"max_failures", "checkpoint_every", "checkpoint_keep", "log_every"})


class DistillConfig(_Strict):
    """distill: Ray Train fits the student (dense or ColBERT-X) to the teacher's score distribution (KL).

    Examples hold ids and scores only; each worker joins query and passage text from its shard as it trains.
    """

    student: str = Field(description="Student encoder to start from: local directory or hub id.")
    student_kind: Literal["dense", "colbert"] = Field(
        "dense", description="dense: one vector per text (pooling, similarity). colbert: ColBERT-X, one vector "
        "per token projected to colbert_dim, scored by MaxSim, queries padded with [MASK] to query_maxlen.",
    )
    colbert_dim: int = Field(128, ge=1, description="colbert: dimension of the token vectors (PLAID-X: 128).")
    passage_lang: str | list[str] = Field(
        description="Language of the passages the student sees (a translate target, or `en`). A list trains on "
        "several at once (Multilingual Translate-Distill), mixed as `mixing` says.",
    )
    mixing: Literal["mix-passages", "mix-entries", "round-robin"] = Field(
        "mix-entries", description="Several passage languages (MTD): mix-passages draws a language per passage, "
        "mix-entries one per query, round-robin repeats each query once per language.",
    )
    nway: int = Field(6, ge=2, description="Passages per query in each example (the paper uses 6).")
    short_list_policy: Literal["skip", "error"] = Field(
        "skip", description="A query with fewer than nway scored candidates: skip it (logged) or stop with an error."
    )
    top_k: int | None = Field(
        None, ge=2, description="Candidates per query the sampler draws from, best-scored first (default: all "
        "the score stage kept).",
    )
    sampler: Literal["only_top", "random", "beta"] = Field(
        "only_top", description="How the nway passages are drawn from the top_k: the nway best (the paper's "
        "default), uniformly, or by PLAID-X's Beta curriculum (uniform at the start, top-heavy by the end).",
    )
    sampling_max_beta: float = Field(1.0, ge=1, description="beta sampler: Beta(1, b) ends at b = this (1 = uniform).")
    keep_top: bool = Field(False, description="random/beta samplers: always include the best-scored passage.")
    loss: Literal["kl", "margin_mse", "contrastive"] = Field(
        "kl", description="kl: KL to the teacher's score distribution (Translate-Distill). margin_mse: MSE of "
        "score margins to the first passage. contrastive: cross-entropy over a positive and negatives (the "
        "Translate-Train baseline with `positives: qrels`).",
    )
    positives: Literal["teacher", "qrels"] = Field(
        "teacher", description="contrastive: the positive is the best-scored passage drawn (teacher), or a judged "
        "relevant passage from data.train_qrels with nway - 1 negatives drawn from the unjudged candidates (qrels).",
    )
    in_batch_negatives: bool = Field(
        False, description="contrastive: every other passage of the worker's batch is also a negative."
    )
    student_temperature: float = Field(1.0, gt=0, description="kl: student scores are divided by this first.")
    contrastive_temperature: float = Field(1.0, gt=0, description="contrastive: scores are divided by this.")
    alpha: float = Field(1.0, gt=0, description="Teacher scores are multiplied by alpha before the softmax.")
    pooling: Literal["cls", "mean"] = Field("cls", description="dense: how token vectors become one vector.")
    similarity: Literal["dot", "cosine"] = Field("dot", description="dense: how query and passage vectors compare.")
    query_maxlen: int = Field(32, ge=4, description="Most query tokens (colbert: queries are padded to this).")
    passage_maxlen: int = Field(180, ge=8, description="Most passage tokens.")
    batch_size: int = Field(8, ge=1, description="Queries per micro-batch per worker (the paper: 8 per GPU).")
    length_buckets: int = Field(
        4, ge=1, description="A micro-batch's passages are encoded in this many groups of similar length, each padded "
        "to its own longest, not the batch's (1: one group). Scores are the same; the padding saved is compute.",
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches whose gradients add up to one optimizer step.")
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="Autocast on GPU: auto takes bf16 where the GPU supports it; fp16 adds a gradient "
        "scaler. CPU training always runs in float32.",
    )
    steps: int = Field(200, ge=1, description="Optimizer steps in total.")
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="After the warm-up: linear decay to 0 at the last step, or constant (PLAID-X's: "
        "constant, without warm-up).",
    )
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradients' global norm to this before each step (PLAID-X: 2.0); none "
        "measures the norm and clips nothing.",
    )
    checkpoint_every: int = Field(
        1000, ge=1, description="Steps between checkpoints (one is always written at the end). Each holds the "
        "weights and the AdamW state: about 6.7 GB for xlm-roberta-large, so 1,000 over the paper's 200 k steps "
        "writes 200 of them, uploaded in the background while training goes on.",
    )
    checkpoint_keep: int = Field(2, ge=1, description="Checkpoints kept on storage (the oldest are deleted); a "
                                 "resume whose newest checkpoint cannot be read uses the one before it.")
    log_every: int = Field(
        20, ge=1, description="Steps between flushes of the buffered per-step metrics to MLflow (also at each "
        "checkpoint and at the end): one request per flush, so a slow tracking server never holds up training.",
    )
    shuffle_buffer: int = Field(
        10_000, ge=0, description="Examples in each worker's seeded local shuffle buffer, reseeded every epoch "
        "(0: the table's order every epoch).",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP; gloo on CPU, nccl on GPU).")
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs reserved per training worker. Leave at least one CPU of the cluster free: the "
        "example shards are read by Ray Data tasks while the workers train.",
    )
    use_gpu: bool = Field(False, description="Train on GPUs (`gpus_per_worker` each).")
    gpus_per_worker: float = Field(
        1, gt=0, le=1, description="GPUs per worker with use_gpu: 1, or a fraction that puts several small workers on "
        "one GPU. Below 1 the workers synchronise over gloo, since NCCL refuses two ranks on one GPU.",
    )
    max_failures: int = Field(0, ge=0, description="Worker failures Ray Train recovers from by restarting.")
    run_name: str = Field(
        "distill", description="Prefix of the Ray Train run name; the run is identified by it and a hash of what "
        "determines training (the distill settings but for max_failures, checkpoint_every, checkpoint_keep and "
        "log_every, and the identity of every table read). The same identity resumes from its last checkpoint.",
    )
    seed: int = Field(0, description="Seed for model init order, data shuffling and passage sampling.")

    @property
    def passage_langs(self) -> list[str]:
        """The passage languages as a list (one for Translate-Distill, several for MTD)."""
        return [self.passage_lang] if isinstance(self.passage_lang, str) else list(self.passage_lang)

    @model_validator(mode="after")
    def _sampling_fits(self) -> DistillConfig:
        if not self.passage_langs or len(set(self.passage_langs)) != len(self.passage_langs):
            raise ValueError(f"passage_lang {self.passage_lang!r}: give one language or a list of distinct ones")
        if self.top_k is not None and self.top_k < self.nway:
            raise ValueError(f"top_k ({self.top_k}) must be at least nway ({self.nway})")
        if self.loss != "contrastive" and (self.positives != "teacher" or self.in_batch_negatives):
            raise ValueError("positives: qrels and in_batch_negatives apply to loss: contrastive only")
        if (self.loss == "contrastive" and self.positives == "teacher" and self.sampler != "only_top"
                and not self.keep_top):
            raise ValueError("loss contrastive takes the first passage as the positive: with a random or beta "
                             "sampler set keep_top: true")
        if self.student_kind == "colbert" and (self.pooling != "cls" or self.similarity != "dot"):
            raise ValueError("pooling and similarity describe the dense student; a colbert student scores by MaxSim")
        return self


class PassageConfig(_Strict):
    """Documents cut into overlapping passages of the student's tokens, each indexed; a document scores as its best
    passage (MaxP), as ColBERT-X indexes NeuCLIR."""

    length: int = Field(180, ge=8, description="Student tokens per passage (title and body joined, no special tokens).")
    stride: int = Field(90, ge=1, description="Tokens between passage starts (90: each passage overlaps the next by "
                        "half).")

    @model_validator(mode="after")
    def _overlap(self) -> PassageConfig:
        if self.stride > self.length:
            raise ValueError(f"stride ({self.stride}) must be at most length ({self.length}), or text between "
                             "passages would never be indexed")
        return self


class ColBERTIndexConfig(_Strict):
    """index, ColBERT students: the compressed token index (PLAID-style): centroids by k-means, each token stored as
    its centroid's id and its residual at `nbits` per dimension."""

    nbits: Literal[1, 2, 4, 8] = Field(
        2, description="Bits per dimension of each token's residual: 1 or 2 as PLAID (dim 128: 18 or 34 B a token "
        "with its centroid id), 4, or 8 (nearly exact; 130 B).",
    )
    centroids: int | None = Field(
        None, ge=1, description="k-means centroids. Default: PLAID's 2^floor(log2(16 sqrt(tokens))), the tokens "
        "estimated from the training sample (NeuCLIR Chinese, about 2.7 G tokens: 2^19).",
    )
    kmeans_niter: int = Field(4, ge=1, description="k-means iterations (PLAID's default).")


class IndexConfig(ActorPoolConfig):
    """index: encode the evaluation collection with the student and build a FAISS index in sharded Ray tasks."""

    model: str | None = Field(None, description="Encoder to index with: a student directory or a registered "
                              "`models:/name@alias` URI. Default: the student the distill stage saved.")
    num_shards: int = Field(2, ge=1, description="Shards, each added to the trained index by its own Ray task (IVF "
                            "shards are then merged into one on-disk index; Flat and HNSW shards are searched in turn).")
    max_length: int = Field(200, ge=8, description="Most tokens the encoder reads per passage (special tokens "
                            "included); with `passages: null`, per document.")
    passages: PassageConfig | None = Field(
        PassageConfig(), description="Cut documents into passages and score documents by MaxP (NeuCLIR's long "
        "documents); null keeps one vector per document, cut at max_length (short passages such as MS MARCO's).",
    )
    factory: str = Field(
        "Flat", description="FAISS index factory string, compared by inner product: Flat (exact), HNSW32, "
        "IVF4096,Flat, IVF4096,SQ8, IVF4096,PQ64, OPQ64,IVF65536_HNSW32,PQ64, ... (PQ sizes must divide the "
        "student's dimension).",
    )
    train_sample: int = Field(
        262_144, ge=1, description="Vectors a trained index (IVF, PQ, SQ) is trained on, drawn evenly from all; at "
        "least 39 x the IVF lists (FAISS's minimum per centroid). ColBERT: token vectors the centroids and the "
        "residual codec are trained on, from documents drawn evenly, at least one per centroid.",
    )
    colbert: ColBERTIndexConfig = Field(ColBERTIndexConfig(), description="ColBERT students: the compressed token "
                                        "index.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Train and add on GPUs when FAISS sees one (the gpu extra) and the stage has GPUs "
        "(num_gpus_per_actor above 0: the train task, and the shard tasks of an index FAISS can clone to a GPU, then "
        "reserve one GPU each); the index is written for CPUs.",
    )
    task_cpus: float = Field(
        1, gt=0, description="CPUs reserved by each of the index stage's Ray tasks that train the index (or the "
        "ColBERT codec), fill a shard and merge the shards; FAISS and torch there use that many threads (whole CPUs, "
        "at least 1). At most a node's CPUs. The default, 1, never starves Ray Data on a 2-CPU node.",
    )
    incremental: bool = Field(
        True, description="When only the documents changed since the index was built (same student and settings), "
        "encode just the new and changed ones and append them to the built index, with its trained codec or "
        "quantiser; changed and removed documents' old passages leave the results. False rebuilds from scratch.",
    )
    keep_vectors: bool = Field(
        False, description="Keep the table of passage vectors after the index is built (it is as large as a Flat "
        "index: 60 GB for NeuCLIR Chinese at 1,024 dimensions).",
    )


class EvaluateConfig(_Strict):
    """evaluate: search the topics, write a TREC run, and score it with ir_measures."""

    depth: int = Field(1000, ge=1, description="Documents retrieved per topic (runs are cut here).")
    passage_depth: int = Field(
        2500, ge=1, description="Passages searched per topic before MaxP aggregates them to documents (ColBERT-X: "
        "2,500 for a 1,000-document run); doubled for a topic whose passages name fewer than depth documents.",
    )
    search_params: str | None = Field(
        None, description="FAISS search parameters as a ParameterSpace string, e.g. `nprobe=64` (IVF) or "
        "`efSearch=128` (HNSW). Default: nprobe = lists / 16 (at least 16) and efSearch 128.",
    )
    ncells: int | None = Field(
        None, ge=1, description="ColBERT: centroids each query token probes for candidate passages. Default: PLAID's "
        "for passage_depth (1 up to 10 passages, 2 up to 100, else 4).",
    )
    centroid_score_threshold: float | None = Field(
        None, description="ColBERT: candidates are first scored by their tokens' centroids, counting only the "
        "centroids some query token scores at least this high (PLAID's pruning; -1 keeps every centroid). "
        "Default: PLAID's for passage_depth (0.5, 0.45, else 0.4).",
    )
    ndocs: int | None = Field(
        None, ge=1, description="ColBERT: candidates whose tokens are decoded and scored by exact MaxSim (at least "
        "passage_depth). Default: PLAID's for passage_depth (256, 1024, else max(4 x passage_depth, 4096)).",
    )
    batch_size: int = Field(64, ge=1, description="Topics encoded and searched together.")
    search_tasks: int = Field(
        1, ge=1, description="ColBERT: Ray tasks the topics are spread over (MS MARCO dev's 6,980), each loading the "
        "student and mapping the index once; 1 searches in the stage's own process.",
    )
    search_cpus: float = Field(
        1, gt=0, description="ColBERT: CPUs each search task reserves; torch searches with that many threads.",
    )
    search_gpus: float = Field(0, ge=0, description="ColBERT: GPUs each search task reserves (0 on CPU nodes).")
    measures: list[str] = Field(
        ["nDCG@20", "R@100", "RR@10"], min_length=1, description="ir_measures names (RR@10 is MRR@10)."
    )
    query_maxlen: int = Field(32, ge=4, description="Most topic tokens.")
    run_tag: str = Field("td-ray", description="Tag in the last column of the TREC run.")
    bm25_reference: bool = Field(
        False, description="Also rank the topics by BM25 (bm25s) over the evaluation documents as ingested and log "
        "its measures as `bm25_*`: a lexical reference; with English topics over target-language documents it "
        "shows the vocabulary gap. It holds the collection in memory (refused above 1,000,000 documents).",
    )

    @model_validator(mode="after")
    def _deep_enough(self) -> EvaluateConfig:
        if self.passage_depth < self.depth:
            raise ValueError(f"passage_depth ({self.passage_depth}) must be at least depth ({self.depth}): each "
                             "document needs at least one passage hit")
        return self


class CostConfig(_Strict):
    """Prices of the machines a run uses: each stage's summary and the report turn CPU- and GPU-hours into a cost,
    and project the paper's job. No price is built in; without one only the hours are shown."""

    cpu_hour: float | None = Field(None, ge=0, description="Price of one reserved CPU for one hour (e.g. a cloud "
                                   "vCPU-hour), in `currency`.")
    gpu_hour: float | None = Field(None, ge=0, description="Price of one reserved GPU for one hour, in `currency`.")
    currency: str = Field("USD", min_length=1, description="The prices' currency, as summaries and the report show it.")


class PipelineConfig(_Strict):
    """The whole Translate-Distill pipeline: inputs, the five stages, Ray and MLflow."""

    workspace: str = Field(description="Root of every table, model, index and run: a local path or a shared mount "
                           "every node can reach (tables also accept a pyarrow filesystem URI).")
    demo_assets: bool = Field(
        False, description="Build the tiny models and the generated demo collection into the workspace first."
    )
    compare_untrained: bool = Field(
        False, description="After evaluate, index and evaluate the student as distill starts it (distill.student "
        "with the configured pooling, or ColBERT projection, seeded by distill.seed) with the same index and "
        "evaluate settings, in `{workspace}/untrained`; the summary and the report show it beside the trained one.",
    )
    ray: RayConfig = Field(RayConfig(), description="Ray cluster.")
    mlflow: MlflowConfig = Field(MlflowConfig(), description="MLflow tracking and registry.")
    data: DataConfig = Field(description="Pipeline inputs.")
    translate: TranslateConfig = Field(description="translate stage.")
    score: ScoreConfig = Field(description="score stage.")
    distill: DistillConfig = Field(description="distill stage.")
    index: IndexConfig = Field(IndexConfig(), description="index stage.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="evaluate stage.")
    cost: CostConfig = Field(CostConfig(), description="Prices per CPU-hour and GPU-hour, for what a run costs.")

    @model_validator(mode="after")
    def _languages_exist(self) -> PipelineConfig:
        langs = {"en"} | {t.lang for t in self.translate.targets}
        if len({t.lang for t in self.translate.targets}) != len(self.translate.targets):
            raise ValueError("translate.targets: each lang may appear once")
        pairs = [("score.passage_lang", self.score.passage_lang), ("score.query_lang", self.score.query_lang)]
        pairs += [("distill.passage_lang", lang) for lang in self.distill.passage_langs]
        for field, lang in pairs:
            if lang not in langs:
                raise ValueError(f"{field}: {lang!r} is not `en` nor a translate target ({sorted(langs)})")
        if self.distill.positives == "qrels" and self.data.train_qrels is None:
            raise ValueError("distill.positives: qrels needs data.train_qrels (the training queries' judgements)")
        return self

    @model_validator(mode="after")
    def _promotion_measured(self) -> PipelineConfig:
        promote = self.mlflow.promote
        if promote is not None and promote.metric not in self.evaluate.measures:
            raise ValueError(f"mlflow.promote.metric {promote.metric!r} is not evaluated; add it to evaluate.measures "
                             f"({self.evaluate.measures}) or promote on one of those")
        return self

    @model_validator(mode="after")
    def _index_buildable(self) -> PipelineConfig:
        """The FAISS factory string parses, its PQ sizes divide the student's dimension when it can be known here
        (a ColBERT student's, a local student's config.json), and train_sample can train it."""
        from td_ray.retrieval.faiss_index import plan_index

        dim = self.student_dim()
        plan = plan_index(self.index.factory, dim or _dimension_fitting(self.index.factory), dim_known=dim is not None)
        if plan.needs_training and self.index.train_sample < plan.min_train:
            raise ValueError(f"index.train_sample ({self.index.train_sample}) is below the {plan.min_train} vectors "
                             f"FAISS needs to train {self.index.factory!r} (39 per IVF list); raise it or use fewer "
                             "lists")
        return self

    def student_dim(self) -> int | None:
        """The dimension of the vectors the index stage will hold, when the config tells it: a ColBERT student's
        colbert_dim, or the hidden size in a local student directory's config.json; None otherwise."""
        if self.index.model is None and self.distill.student_kind == "colbert":
            return self.distill.colbert_dim
        model = self.index.model or self.distill.student
        path = Path(model) / "config.json" if "://" not in model else None
        if path is not None and path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("hidden_size")
        return None

    def local_sources(self) -> list[tuple[str, DataSource]]:
        """Every (config field, source) that names a local path."""
        found = [(f"data.{name}", source) for name, source in self.data if hasattr(source, "path")]
        if self.score.import_scores is not None:
            found.append(("score.import_scores", self.score.import_scores))
        for target in self.translate.targets:
            for kind in ("pretranslated", "pretranslated_queries"):
                source = getattr(target, kind)
                if source is not None and hasattr(source, "path"):
                    found.append((f"translate.targets[{target.lang}].{kind}", source))
        return found

    def fingerprint(self) -> str:
        """Short hash of the config, recorded as lineage on everything the pipeline registers."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def split_template(template: str) -> tuple[str, str]:
    """The template's text before and after ``{document}``; it must hold ``{query}`` and ``{document}`` once each."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if sorted(fields) != ["document", "query"]:
        raise ValueError(f"teacher template {template!r} must contain {{query}} and {{document}} once each and no "
                         f"other fields (found {fields})")
    before, after = template.split("{document}")
    return before, after


def _dimension_fitting(factory: str) -> int:
    """A dimension every PQ/OPQ size in `factory` divides, for checking its syntax when the real one is unknown."""
    import math
    import re

    return math.lcm(8, *(int(size) for size in re.findall(r"PQ(\d+)", factory)))


MAX_CONFIG_BYTES = 1_000_000
"""The largest config file read: a real one is a few kilobytes, and PyYAML's loader takes about a minute on 100 MB."""
MAX_CONFIG_VALUES = 100_000
"""The most values a config may hold once its YAML aliases are expanded: a real one holds a few hundred; an alias
bomb ("billion laughs") a few KB long, billions."""


def check_bounded(value: object) -> None:
    """Refuse a config that expands past MAX_CONFIG_VALUES values, counting each alias at every place it is used
    and stopping at the bound, so a bomb is refused in milliseconds.

    >>> laugh = ["lol"] * 10
    >>> for _ in range(8):
    ...     laugh = [laugh] * 10
    >>> try:
    ...     check_bounded({"a": laugh})
    ... except ConfigError as error:
    ...     print(error)
    the config expands to more than 100,000 values through its YAML aliases (an alias bomb?); write the values out, or use fewer nested aliases
    """
    budget, pending = MAX_CONFIG_VALUES, [value]
    while pending:
        item = pending.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"the config expands to more than {MAX_CONFIG_VALUES:,} values through its YAML aliases "
                              "(an alias bomb?); write the values out, or use fewer nested aliases")
        if isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list):
            pending += item


def _expand(value: object, workspace: str) -> object:
    if isinstance(value, str):
        return value.replace("{workspace}", workspace)
    if isinstance(value, dict):
        return {key: _expand(item, workspace) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, workspace) for item in value]
    return value


def _field_names() -> list[str]:
    """Every field name of every config section and source."""
    names, pending = set(), [_Strict]
    while pending:
        model = pending.pop()
        names.update(model.model_fields)
        pending += model.__subclasses__()
    return sorted(names)


def suggestion(value: str, choices: list[str], most: int = 1) -> str:
    """`; did you mean 'x'?` for the closest (up to `most`) of `choices`, or nothing.

    >>> suggestion("titel", ["doc_id", "title", "text"])
    "; did you mean 'title'?"
    >>> suggestion("trec-2021", ["trec-2022", "trec-2023", "train"], most=3)
    "; did you mean 'trec-2022' or 'trec-2023'?"
    >>> suggestion("qwerty", ["title", "text"])
    ''
    """
    import difflib

    close = sorted(difflib.get_close_matches(value, choices, n=most, cutoff=0.6))
    return f"; did you mean {' or '.join(repr(match) for match in close)}?" if close else ""


def _did_you_mean(item: dict) -> str:
    """A suggestion for a misspelt field name or choice, from the closest known one."""
    import re

    if item["type"] == "extra_forbidden":
        return suggestion(str(item["loc"][-1]), _field_names())
    if item["type"] == "literal_error" and isinstance(item.get("input"), str):
        return suggestion(item["input"], re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", ""))))
    return ""


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  - {where}: {item['msg']}{_did_you_mean(item)}")
    lines.append("Fix these fields (see `td-ray config-schema` for every field and its meaning).")
    return "\n".join(lines)


def parse_config(raw: object, source: str = "<dict>", workspace: str | None = None) -> PipelineConfig:
    """Validate a mapping (as read from YAML) into a PipelineConfig; `workspace` overrides the file's."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    check_bounded(raw)
    raw = dict(raw)
    if workspace is not None:
        raw["workspace"] = workspace
    root = raw.get("workspace")
    if isinstance(root, str) and "://" not in root:
        raw["workspace"] = root = str(Path(root).expanduser().resolve())
    if isinstance(root, str):
        raw = _expand(raw, root)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each ``section.field=value`` of `overrides` set (`--set`); a value is read as YAML, so numbers,
    booleans and lists keep their type.

    >>> apply_overrides({"distill": {"steps": 200}}, ["distill.steps=10", "evaluate.measures=[nDCG@20, R@100]"])
    {'distill': {'steps': 10}, 'evaluate': {'measures': ['nDCG@20', 'R@100']}}
    """
    import copy

    result = copy.deepcopy(raw)
    for override in overrides:
        key, equals, value = override.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise ConfigError(f"--set {override!r}: write KEY=VALUE with a dotted key, e.g. --set distill.steps=100")
        node = result
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a section; set "
                                  "it whole, e.g. --set 'translate.targets=[{lang: zh, model: ...}]'")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: the value is not valid YAML ({error})") from None
    return result


def load_config(path: str | Path, workspace: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config with ``yaml.safe_load``, apply `overrides` (``section.field=value``), and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config with a YAML file; see configs/)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is {path.stat().st_size:,} bytes, above the {MAX_CONFIG_BYTES:,} a config "
                          "may have; a config is settings and paths: put data in files it names")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid config {path}: the top level must be a mapping of sections")
        check_bounded(raw)  # before the copy the overrides make
        raw = apply_overrides(raw, overrides)
    return parse_config(raw, source=str(path) + (f" with --set {' '.join(overrides)}" if overrides else ""),
                        workspace=workspace)
