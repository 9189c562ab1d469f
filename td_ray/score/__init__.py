"""score: a teacher cross-encoder scores each training query's top-K candidates, as Ray Data actors.

The teacher sees English queries with English passages (`passage_lang: en`), with translated passages
(a target language: the CLIR teacher), or translated queries with translated passages (`query_lang`).
Output: ``score/scores.parquet`` (qid, pid, score, teacher), ids and scores only, so one English score table
serves every translated language in the distill stage. The driver handles ids only: texts are looked up in the
actors, and the work list, the resume and the exactly-once check stream (see `run`).
"""
from __future__ import annotations

import json
import logging
import time

from td_ray import schemas
from td_ray.config import PipelineConfig, ScoreConfig
from td_ray.fingerprint import digest, path_fingerprint
from td_ray.raydata import actor_map_args, check_read_room, in_task, read_table_dataset, steady_pace
from td_ray.result import StageResult
from td_ray.score.actor import PairTokenizer, TeacherActor, plan_task, tokenizer_map_args
from td_ray.score.core import BLOCKS, TODO, CrossEncoderTeacher, block_batches, check_teacher, kept_candidates
from td_ray.score.importers import import_score_file
from td_ray.score.seq2seq import Seq2SeqTeacher, check_seq2seq_teacher
from td_ray.stage import Outcome, Source, Stage, StageContext, run_stage, training_sources
from td_ray.textjoin import MissingTextError, export_text
from td_ray.workspace import CANDIDATES, SCORES, Workspace, translated

logger = logging.getLogger(__name__)

__all__ = ["BLOCKS", "STAGE", "CrossEncoderTeacher", "Seq2SeqTeacher", "TeacherActor", "inputs_key", "run"]


def inputs_key(options: ScoreConfig, identities: list) -> str:
    """What the scores depend on: the teacher and its settings, and the identity of every table read (candidates,
    queries, passages: `Workspace.table_identity`). It names the block directory of a run, so a run resumes
    only blocks made from the same inputs."""
    return digest(provenance(options), identities)


class ScoreStage(Stage):
    """Score every (query, candidate) pair once with the configured teacher, or import a published score file.

    Pairs stream as ids; each actor looks their texts up (memory-mapped, shared per node), scores them and
    commits its block, so a killed run resumes with the blocks it had committed. The final table is written
    from the blocks and checked to hold every pair exactly once.
    """

    name = "score"
    sections = ("ray",)
    temporaries = ("inputs", "score", "text")
    scratch = (BLOCKS,)

    def check(self, options: ScoreConfig) -> None:
        if options.import_scores is not None:
            return
        if options.teacher_kind == "seq2seq":
            check_seq2seq_teacher(options.teacher, revision=options.teacher_revision,
                                  trust_remote_code=options.trust_remote_code, true_word=options.true_word,
                                  false_word=options.false_word)
        else:
            check_teacher(options.teacher, options.teacher_revision, options.trust_remote_code)

    def sources(self, config: PipelineConfig) -> list[Source]:
        if config.score.import_scores is not None:
            return []
        return training_sources(config)

    def reads(self, context: StageContext) -> list[tuple[str, tuple[str, ...]]]:
        options = context.options
        if options.import_scores is not None:
            return []
        return [(CANDIDATES, ("qid", "pid", "rank")), (translated("queries", options.query_lang), ("id", "text")),
                (translated("passages", options.passage_lang), ("id", "text"))]

    def key(self, context: StageContext) -> str:
        options = context.options
        if options.import_scores is not None:
            source = options.import_scores
            return digest(source.model_dump(mode="json"), path_fingerprint(source.path), options.provenance)
        return inputs_key(options, [context.workspace.table_identity(table) for table, _ in self.reads(context)])

    def work(self, context: StageContext, key: str) -> Outcome:
        options, workspace = context.options, context.workspace
        if options.import_scores is not None:
            source = options.import_scores
            summary = import_score_file(workspace, SCORES, source.path, source.format, teacher=options.provenance,
                                        metadata={"td_ray_inputs": key})
            return Outcome(summary.rows, {"scores": SCORES}, {"queries": float(summary.queries)})
        directory = f"{BLOCKS}/{key}"
        context.ray()
        check_read_room(f"score: {options.num_actors} teachers x {options.num_cpus_per_actor} CPUs and "
                        f"{options.tokenizers} tokenizers x {options.num_cpus_per_tokenizer} CPUs",
                        options.num_actors * options.num_cpus_per_actor
                        + options.tokenizers * options.num_cpus_per_tokenizer,
                        "lower score.num_cpus_per_actor or score.num_cpus_per_tokenizer (fractions are fine)",
                        joined=context.section("ray").address is not None)
        todo = in_task(plan_task, workspace, directory, options.top_k)
        queries_table, passages_table = translated("queries", options.query_lang), translated("passages",
                                                                                             options.passage_lang)
        scored = _score_todo(options, workspace, directory, queries_table, passages_table, todo,
                             context.lease) if todo else {}
        workspace.fs.delete_file(workspace.path(TODO))
        metadata = {"td_ray_provenance": json.dumps(provenance(options)), "td_ray_inputs": key}
        with workspace.exactly_once_writer(SCORES, schemas.SCORES, ["qid", "pid"],
                                           expected=kept_candidates(workspace, options.top_k),
                                           metadata=lambda: metadata) as writer:
            for batch in block_batches(workspace, directory):
                writer.write(batch)
        workspace.fs.delete_dir(workspace.path(directory))
        return Outcome(writer.rows, {"scores": SCORES},
                       {"scored_pairs": float(todo), "resumed_pairs": float(writer.rows - todo)} | scored)


STAGE = ScoreStage()


def run(config: PipelineConfig) -> StageResult:
    """Run the score stage (`ScoreStage`) on `config`."""
    return run_stage(STAGE, config)


def _score_todo(options: ScoreConfig, workspace: Workspace, directory: str, queries_table: str,
                passages_table: str, todo: int, lease: str | None) -> dict[str, float]:
    """Run the teacher actors over the work list, committing under the stage's `lease`; returns the teacher's
    throughput."""
    lookups = {name: in_task(export_text, workspace, table)
               for name, table in (("queries", queries_table), ("passages", passages_table))}
    logger.info("score: %d pairs to score with %s", todo, options.teacher)
    teacher = workspace.share(options.teacher)
    # Lookups and tokenizing on CPUs, beside the teacher's pool, so its device only runs forward passes.
    dataset = read_table_dataset(workspace, TODO).map_batches(
        PairTokenizer, batch_format="pyarrow", **tokenizer_map_args(options),
        fn_constructor_kwargs={"options": options, "teacher": teacher, "queries": lookups["queries"],
                               "passages": lookups["passages"], "workspace": workspace.uri},
    ).map_batches(
        TeacherActor, batch_format="pyarrow",
        fn_constructor_kwargs={"options": options, "teacher": teacher, "workspace": workspace.uri,
                               "directory": directory, "lease": lease},
        **actor_map_args(options),
    )
    started, scored, host_seconds, finished = time.perf_counter(), 0, 0.0, []
    for block in dataset.iter_rows():
        if block["missing"]:
            raise MissingTextError(
                f"score: {block['missing']}; the candidates, the training queries ({options.query_lang}) and the "
                f"passages ({options.passage_lang}) must come from the same collection (translate them first)"
            )
        scored, host_seconds = scored + block["rows"], host_seconds + block["host_seconds"]
        finished.append((block["finished"], block["rows"]))
    seconds = time.perf_counter() - started
    return {"teacher_pairs_per_s": scored / seconds if seconds else 0.0,
            "teacher_steady_pairs_per_s": steady_pace(finished),
            "host_ms_per_block": 1000 * host_seconds / max(len(finished), 1)}


def provenance(options: ScoreConfig) -> dict:
    """How the scores were made, stored with the table (and beside an exported score file)."""
    made = {"source": "model", "teacher": options.teacher, "teacher_revision": options.teacher_revision,
            "teacher_kind": options.teacher_kind, "query_lang": options.query_lang, "passage_lang": options.passage_lang,
            "max_length": options.max_length, "top_k": options.top_k}
    if options.teacher_kind == "seq2seq":
        made |= {"template": options.template, "true_word": options.true_word, "false_word": options.false_word,
                 "score": "log_softmax([false, true])[true] at the first decoding step"}
    else:
        made["score"] = "relevance logit"
    return made
