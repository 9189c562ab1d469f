"""The Ray Data callable classes of translate: a ctranslate2.Translator per actor that commits each block it
translates, and the checker of a pre-translated collection."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from td_ray import devices
from td_ray.config import QualityConfig, TranslateConfig
from td_ray.keys import HashSet
from td_ray.raydata import actor_map_args
from td_ray.textjoin import open_lookup
from td_ray.translate import store
from td_ray.translate.core import SentencePieceCodec, translate_texts
from td_ray.translate.quality import check_translation, flag_names
from td_ray.translate.store import commit_block, text_hash
from td_ray.workspace import Workspace

logger = logging.getLogger(__name__)

#: Columns the actor reads from each batch (the stage's work list).
INPUT_COLUMNS = ("id", "text", "source_hash")


def translator_device(device: str) -> str:
    """CTranslate2's device for the configured one: ``auto`` is cuda only where CTranslate2 sees a GPU and this
    process may use it (a Ray actor that reserved none still sees its node's GPUs)."""
    import ctranslate2

    if device != "auto":
        return device
    return "cuda" if devices.gpus_allowed() and ctranslate2.get_cuda_device_count() > 0 else "cpu"


def auto_compute_type(device: str) -> str:
    """What `compute_type: auto` runs: bfloat16 (else float16) on a GPU, int8 on a CPU, float32 where the device
    supports neither."""
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types(device)
    return next((kind for kind in (("bfloat16", "float16") if device == "cuda" else ("int8",)) if kind in supported),
                "float32")


def open_translator(model_dir: str, settings: TranslateConfig, compute_type: str | None = None):
    """A ctranslate2.Translator on the configured device, precision (`compute_type` overrides it; auto is resolved
    by `auto_compute_type`) and threads."""
    import ctranslate2

    device = translator_device(settings.device)
    compute_type = compute_type or settings.compute_type
    if compute_type == "auto":
        compute_type = auto_compute_type(device)
    return ctranslate2.Translator(model_dir, device=device, compute_type=compute_type,
                                  intra_threads=settings.intra_threads, inter_threads=settings.inter_threads)


INT8_CHECK_ROWS = 32
"""Rows of an actor's first block translated both in int8 and in float32 before `auto` keeps int8 on a CPU."""


def int8_passes(int8_flagged: int, float32_flagged: int, rows: int) -> bool:
    """Whether int8 output passes the quality checks as well as float32's: it may flag one row more in 32, no more.

    >>> int8_passes(3, 3, 32), int8_passes(4, 3, 32), int8_passes(6, 3, 32)
    (True, True, False)
    """
    return int8_flagged <= float32_flagged + max(1, rows // 32)


class CT2TranslatorActor:
    """Translates blocks of ``{id, text, source_hash}`` and commits each as one store file; returns its statistics.

    The model is loaded once per actor. Two blocks may be in flight (`translate_map_args`): CTranslate2 queues their
    batches, so one block's retries, checks and commit overlap the next block's translation. The output rows go to
    the store, not back through Ray, so the driver only sees one small row of counts per block.
    """

    def __init__(self, model_dir: str, lang: str, mt_model: str, source_prefix: str | None,
                 target_prefix: str | None, settings: TranslateConfig, workspace: str, directory: str,
                 lease: str | None = None):
        import ray

        self.workspace, self.directory, self.lease = Workspace(workspace), directory, lease
        model_dir = self.workspace.resolve(model_dir)  # a reference to the converted model: on this node's disk
        self.translator = open_translator(model_dir, settings)
        self.codec = SentencePieceCodec(Path(model_dir), source_prefix, target_prefix)
        self.lang, self.mt_model, self.settings, self.model_dir = lang, mt_model, settings, model_dir
        self.unchecked = self.translator.compute_type.startswith("int8") and settings.compute_type == "auto"
        self.checking = threading.Lock()
        self.actor = (ray.get_runtime_context().get_actor_id() or "driver")[-8:]
        logger.info("translator for %s loaded on %s from %s", lang, self.translator.device, model_dir)

    def check_int8(self, texts: list[str]) -> None:
        """`auto` on a CPU: keep int8 only if a sample of this block passes the quality checks as well in int8 as in
        float32 (first tries, no retries); else translate in float32."""
        sample = [text for text in texts if text.strip()][:INT8_CHECK_ROWS]
        plain = self.settings.model_copy(update={"quality": self.settings.quality.model_copy(update={"retry": None})})
        reference = open_translator(self.model_dir, self.settings, "float32")
        flagged = {name: sum(bool(item.flags) for item in translate_texts(translator, self.codec, sample, plain,
                                                                        self.lang)[0])
                   for name, translator in (("int8", self.translator), ("float32", reference))}
        if int8_passes(flagged["int8"], flagged["float32"], len(sample)):
            logger.info("translator for %s keeps int8: %d of %d sample rows flagged (float32: %d)", self.lang,
                        flagged["int8"], len(sample), flagged["float32"])
        else:
            logger.warning("translator for %s runs in float32: int8 flagged %d of %d sample rows, float32 %d",
                           self.lang, flagged["int8"], len(sample), flagged["float32"])
            self.translator = reference

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        started = time.perf_counter()
        texts = ["" if text is None else text for text in batch["text"].to_pylist()]
        with self.checking:  # two blocks may be in flight: the first to arrive runs the check, the other waits
            if self.unchecked:
                self.check_int8(texts)
                self.unchecked = False
        results, stats = translate_texts(self.translator, self.codec, texts, self.settings, self.lang)
        size = len(texts)
        block = pa.table({
            "id": batch["id"], "lang": pa.array([self.lang] * size), "mt_model": pa.array([self.mt_model] * size),
            "source_hash": batch["source_hash"], "text": pa.array([item.text for item in results]),
            "segments": pa.array([item.segments for item in results], pa.int32()),
            "source_tokens": pa.array([item.source_tokens for item in results], pa.int32()),
            "target_tokens": pa.array([item.target_tokens for item in results], pa.int32()),
            "attempts": pa.array([item.attempts for item in results], pa.int8()),
            "flags": pa.array([item.flags for item in results], pa.list_(pa.string())),
        })
        name = commit_block(self.workspace, self.directory, block, self.lease)
        flags = Counter(flag for item in results for flag in set(flag_names(item.flags)))
        return {
            "block": [name], "rows": [size], "actor": [self.actor], "seconds": [time.perf_counter() - started],
            "segments": [stats.segments], "source_tokens": [stats.source_tokens],
            "target_tokens": [stats.target_tokens], "positions": [stats.positions], "retried": [stats.retried],
            "flags": [json.dumps(dict(flags))], "compute_type": [self.translator.compute_type],
        }


class PretranslatedCheckActor:
    """Joins English rows ``{id, text}`` to a pre-translated collection by id and checks each pair like MT output.

    Returns view rows; `text` is null for an id the collection lacks (the stage names those and stops).
    """

    def __init__(self, workspace: str, lookup: str, lang: str, mt_model: str, quality: QualityConfig):
        self.lookup = open_lookup(Workspace(workspace), lookup, f"pre-translated {lang} collection")
        self.lang, self.mt_model, self.quality = lang, mt_model, quality

    def __call__(self, batch: pa.Table) -> pa.Table:
        english = ["" if text is None else text for text in batch["text"].to_pylist()]
        texts = self.lookup.get(batch["id"].to_pylist())
        flags = [[] if text is None else check_translation(source, text, self.quality)
                 for source, text in zip(english, texts)]
        size = batch.num_rows
        return pa.table({
            "id": batch["id"], "lang": pa.array([self.lang] * size), "text": pa.array(texts, pa.string()),
            "mt_model": pa.array([self.mt_model] * size), "source_hash": text_hash(batch["text"]),
            "flags": pa.array(flags, pa.list_(pa.string())),
        })


def translate_map_args(settings: TranslateConfig) -> dict:
    """`map_batches` arguments of the translator pool: `blocks_in_flight` calls run at once in each actor (the
    translator is thread-safe and queues their batches)."""
    return actor_map_args(settings, calls_per_actor=settings.blocks_in_flight)


def plan_task(workspace: Workspace, english: str, directory: str, todo: str, keys: str) -> tuple[int, int]:
    """Ray task: write the work list of the rows no committed block holds, and save the current keys' hashes (to
    `keys`, a workspace file, for the view); returns (source rows, rows to translate). Holds 16 bytes a row, off the
    driver."""
    plan = store.write_todo(workspace, english, store.committed_keys(workspace, directory), todo)
    local = workspace.local_dir(keys.rsplit("/", 1)[0]) / keys.rsplit("/", 1)[1]
    plan.current.save(local)
    workspace.upload(local, keys)
    return plan.source_rows, plan.todo_rows


def view_task(workspace: Workspace, directory: str, keys: str, english: str, kind: str, lang: str, key: str,
              mt_model: str) -> int:
    """Ray task: write the view from the store against the saved current keys (memory-mapped)."""
    return store.write_view(workspace, directory, HashSet.load(workspace.local_copy(keys)), english, kind, lang, key,
                            mt_model)
