"""The Ray Train loop run by every worker: DDP over the student (dense or ColBERT-X), the configured loss against
the teacher, gradient accumulation, mixed precision on GPU, checkpoints, and a resume that replays the same steps.

Every random draw of a step (passages, languages, dropout) is seeded by (seed, rank, step, micro-batch), each
epoch is shuffled by (seed, epoch), and a resumed worker skips the micro-batches its epoch had already consumed.
With one worker a restart from a checkpoint therefore repeats the losses an uninterrupted run would have had;
each worker reads a fixed share of the examples, so that holds with several workers too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from td_ray import devices
from td_ray.config import DistillConfig
from td_ray.distill.data import ExampleShard, TextSource
from td_ray.distill.losses import ContrastiveLoss, KLDistillationLoss, MarginMSELoss
from td_ray.distill.sampling import (
    TrainingEntry,
    build_contrastive_entries,
    build_entries,
)
from td_ray.encoders.buckets import length_buckets, restore_order

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HF_DIR = "hf"


class StepLogger:
    """Per-step metrics to the stage's MLflow run (rank 0 only), buffered and sent as one batch every
    `log_every` steps, at each checkpoint and at the end.

    A failed send is logged and kept for the next flush, which retries it; tracking never stops training. At most
    MAX_BUFFERED metrics wait (the oldest are dropped past that, with a warning), so a tracking server that stays
    down cannot fill the worker's memory.
    """

    MAX_BUFFERED = 100_000
    BATCH_LIMIT = 1000
    """Metrics per log_batch request (MLflow's limit)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, client=None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.client = client or (MlflowClient(tracking_uri) if tracking_uri and run_id else None)
        self.run_id = run_id
        self.buffer: list = []
        self.failures = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self.buffer) > self.MAX_BUFFERED:
            dropped = len(self.buffer) - self.MAX_BUFFERED
            self.buffer = self.buffer[dropped:]
            logger.warning("MLflow unreachable: dropped the %d oldest buffered step metrics", dropped)

    def flush(self) -> bool:
        """Send every buffered metric; on failure keep them for the next flush. Returns whether all were sent."""
        while self.buffer:
            batch = self.buffer[:self.BATCH_LIMIT]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as error:  # any tracking failure: training goes on, the metrics wait
                self.failures += 1
                logger.warning("could not log %d step metrics to MLflow (%s); will retry at the next flush",
                               len(self.buffer), error)
                return False
            del self.buffer[:len(batch)]
        return True


@dataclass
class TrainingTexts:
    """Where a worker finds text: query text by qid, passage text by pid per language."""

    queries: TextSource
    passages: dict[str, TextSource]


class Student:
    """The student being trained, in float32, and how texts become its inputs: a dense dual encoder (HF tokenizer)
    or ColBERT-X (marker tokens, [MASK]-padded queries). Both models map (queries, passages) to [batch, nway]."""

    def __init__(self, config: DistillConfig, path: str):
        self.config = config
        if config.student_kind == "colbert":
            from td_ray.encoders.colbert import ColBERTSpec, load_colbert

            spec = ColBERTSpec(dim=config.colbert_dim, query_maxlen=config.query_maxlen,
                               doc_maxlen=config.passage_maxlen)
            self.model, self.tokenizer = load_colbert(path, spec)
        else:
            from transformers import AutoTokenizer

            from td_ray.encoders.dense import DualEncoder

            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = DualEncoder.from_pretrained(path, config.pooling, config.similarity)
        # float32 master weights whatever the checkpoint's dtype: bf16's spacing (2^-8 of a weight) would round a
        # 5e-6 step away; mixed precision only autocasts the forward pass
        self.model.float()

    def tokenize(self, queries: list[str], passages: list[str]) -> tuple[dict, dict]:
        """Model inputs on the host: the queries, and the passages in `length_buckets` buckets of similar length
        (one bucket: padded together, in order)."""
        count = self.config.length_buckets
        buckets = length_buckets([len(text) for text in passages], count) if count > 1 else [list(range(len(passages)))]
        if self.config.student_kind == "colbert":
            query = self.tokenizer.queries(queries)
            parts = [self.tokenizer.documents([passages[i] for i in bucket], self.config.passage_maxlen)
                     for bucket in buckets]
        else:
            query, *parts = (dict(self.tokenizer(texts, truncation=True, max_length=length, padding=True,
                                                 return_tensors="pt"))
                             for texts, length in ((queries, self.config.query_maxlen),
                                                   *(([passages[i] for i in bucket], self.config.passage_maxlen)
                                                     for bucket in buckets)))
        query, *parts = ({key: value for key, value in part.items() if key != "token_type_ids"}
                         for part in (query, *parts))
        if len(parts) == 1:
            return query, parts[0]
        return query, {"buckets": parts, "restore": restore_order(buckets)}

    def inputs(self, queries: list[str], passages: list[str], device: torch.device) -> tuple[dict, dict]:
        """`tokenize`, on `device`."""
        return to_device(self.tokenize(queries, passages), device)

    def save(self, directory: Path) -> None:
        if self.config.student_kind == "colbert":
            self.model.save_pretrained(directory, self.tokenizer)
        else:  # sentence-transformers reads passages up to the length they were trained at
            self.model.save_pretrained(directory, self.tokenizer, max_length=self.config.passage_maxlen)


def save_untrained_student(config: DistillConfig, directory: Path) -> None:
    """The student as training starts it (seeded as each worker seeds it), saved as distill saves the trained one:
    what `compare_untrained` indexes and evaluates."""
    torch.manual_seed(config.seed)
    Student(config, config.student).save(directory)


def make_loss(config: DistillConfig) -> torch.nn.Module:
    """The configured training loss over student and teacher scores [batch, nway]."""
    if config.loss == "margin_mse":
        return MarginMSELoss()
    if config.loss == "contrastive":
        return ContrastiveLoss(config.contrastive_temperature, config.in_batch_negatives)
    return KLDistillationLoss(config.alpha, config.student_temperature)


def make_entries(batch: dict, config: DistillConfig, rng: np.random.Generator, progress: float) -> list[TrainingEntry]:
    """Per example row, its training entries: nway passages drawn by the sampler, in the languages MTD mixing
    picks (round-robin yields one entry per language); with `positives: qrels`, a positive and nway - 1 negatives."""
    entries: list[TrainingEntry] = []
    for qid, pids, scores, positives in zip(batch["qid"], batch["pids"], batch["teacher_scores"], batch["positives"]):
        pids = [str(pid) for pid in pids]
        if config.positives == "qrels":
            entries += build_contrastive_entries(str(qid), pids, [str(p) for p in positives], config.nway, rng,
                                                 languages=config.passage_langs, sampler=config.sampler,
                                                 mixing=config.mixing, progress=progress,
                                                 max_beta=config.sampling_max_beta)
        else:
            entries += build_entries(str(qid), pids, list(scores), config.nway, rng, languages=config.passage_langs,
                                     sampler=config.sampler, mixing=config.mixing, progress=progress,
                                     max_beta=config.sampling_max_beta, keep_top=config.keep_top, top_k=config.top_k,
                                     short_list_policy="error")
    return entries


def join_text(entries: list[TrainingEntry], texts: TrainingTexts) -> tuple[list[str], list[str]]:
    """Query texts, and passage texts grouped query by query, each passage in its entry's language."""
    queries = texts.queries([entry.qid for entry in entries])
    wanted = [(lang, pid) for entry in entries for pid, lang in zip(entry.pids, entry.langs)]
    passages: list[str] = [""] * len(wanted)
    for lang in sorted({lang for lang, _ in wanted}):
        positions = [i for i, (each, _) in enumerate(wanted) if each == lang]
        for position, text in zip(positions, texts.passages[lang]([wanted[i][1] for i in positions])):
            passages[position] = text
    return queries, passages


def same_query_mask(entries: list[TrainingEntry]) -> torch.Tensor:
    """[n, n] bool: entries i != j that are copies of the same query (round-robin MTD)."""
    qids = [entry.qid for entry in entries]
    same = torch.tensor([[a == b for b in qids] for a in qids], dtype=torch.bool)
    return same & ~torch.eye(len(qids), dtype=torch.bool)


def to_device(inputs, device: torch.device, pin: bool = False):
    """Every tensor in nested tuples, lists and dicts moved to `device` (asynchronously: the host copies come from
    pinned memory), or with `pin` only pinned, which is done on the host ahead of time."""
    if isinstance(inputs, torch.Tensor):
        if pin:
            return inputs.pin_memory()
        return inputs.to(device, non_blocking=True)
    if dataclasses.is_dataclass(inputs):
        return dataclasses.replace(inputs, **{field.name: to_device(getattr(inputs, field.name), device, pin)
                                              for field in dataclasses.fields(inputs)})
    if isinstance(inputs, dict):
        return {key: to_device(value, device, pin) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(value, device, pin) for value in inputs)
    return inputs


@dataclass
class MicroBatch:
    """One micro-batch made ready on the host: model inputs, teacher scores (or the same-query mask of a contrastive
    loss), and the seed of its dropout."""

    step: int
    torch_seed: int
    query: dict
    passages: dict
    teacher: torch.Tensor | None
    same_query: torch.Tensor | None


def prepare(student: Student, texts: TrainingTexts, batch: dict, config: DistillConfig, rng: np.random.Generator,
            step: int, torch_seed: int) -> MicroBatch:
    """Draw a micro-batch's entries, join their text and tokenize it: all the host's work for one micro-batch."""
    entries = make_entries(batch, config, rng, step / config.steps)
    query, passages = student.tokenize(*join_text(entries, texts))
    contrastive = config.loss == "contrastive"
    teacher = None if contrastive else torch.as_tensor(np.asarray([entry.teacher_scores for entry in entries]),
                                                      dtype=torch.float32)
    same = same_query_mask(entries) if contrastive and config.in_batch_negatives else None
    return MicroBatch(step, torch_seed, query, passages, teacher, same)


def micro_batch_loss(model, loss_fn, micro: MicroBatch, config: DistillConfig, device: torch.device) -> torch.Tensor:
    """The loss of a prepared micro-batch, its dropout seeded by its step."""
    torch.manual_seed(micro.torch_seed)
    query, passages, teacher, same = to_device((micro.query, micro.passages, micro.teacher, micro.same_query), device)
    scores = model(query, passages, all_pairs=config.in_batch_negatives).float()
    if config.loss == "contrastive":
        return loss_fn(scores, same)
    return loss_fn(scores, teacher)


def train_step(model, loss_fn, student: Student, texts: TrainingTexts, batch: dict, config: DistillConfig,
               device: torch.device, rng: np.random.Generator, progress: float = 0.0) -> torch.Tensor:
    """The loss of one micro-batch of example rows, prepared and computed in series."""
    micro = prepare(student, texts, batch, config, rng, round(progress * config.steps), int(rng.integers(2**62)))
    return micro_batch_loss(model, loss_fn, micro, config, device)


class Prefetcher:
    """Runs `produce` (an iterator of ready micro-batches) in a thread up to `depth` items ahead, so the host's work
    for the next micro-batch overlaps the device's for this one. Its errors are raised by `next`."""

    _END = object()

    def __init__(self, produce: Iterator, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(produce,), name="td-ray-prefetch", daemon=True)
        self.thread.start()

    def _run(self, produce: Iterator) -> None:
        try:
            for item in produce:
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the training thread, which raises it
            self._put(error)
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self.closed.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=30)


class StepMetrics:
    """Each step's loss and gradient norm kept on the device, brought to the host (and averaged over the workers)
    together once per logging interval: one host-device sync per interval, not several per step."""

    def __init__(self):
        self.pending: list[tuple[int, float, torch.Tensor]] = []
        self.host_syncs = 0

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, lr, torch.stack([loss.detach().float(), grad_norm.detach().float()])))

    def collect(self, device: torch.device) -> list[tuple[int, dict[str, float]]]:
        """(step, metrics) of every step added since the last call; the loss is the mean over the workers."""
        if not self.pending:
            return []
        values = torch.stack([value for _, _, value in self.pending])
        values[:, 0] = mean_over_workers(values[:, 0].to(device), device)
        host = values.cpu().tolist()
        self.host_syncs += 1
        collected = [(step, {"loss": loss, "grad_norm": norm, "lr": lr})
                     for (step, lr, _), (loss, norm) in zip(self.pending, host)]
        self.pending = []
        return collected


class Precision:
    """Mixed precision on GPU (bf16 autocast, or fp16 with a gradient scaler); float32 on CPU."""

    def __init__(self, setting: str, device: torch.device):
        self.dtype = None
        if device.type == "cuda" and setting != "off":
            bf16 = setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported())
            self.dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.device_type = device.type

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer, parameters, max_norm: float | None = None) -> torch.Tensor:
        """Unscale, clip the gradients' global norm to `max_norm` (none: only measure it), and step; returns the norm
        before clipping, on the device (reading it would make the host wait)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_norm or float("inf"))
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm


def epoch_seed(seed: int, epoch: int) -> int:
    """The local shuffle seed of one epoch: every epoch is shuffled differently, and the same way again on resume."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def micro_batches(shard: ExampleShard, config: DistillConfig, start: int) -> Iterator[dict]:
    """Full batches of the worker's shard, epoch after epoch, each epoch shuffled by (seed, epoch); the first
    `start` micro-batches of the run are passed over (a resume reads exactly the batches an uninterrupted run
    would have read, whatever the number of workers)."""
    per_epoch = shard.rows // config.batch_size
    if per_epoch == 0:
        raise ValueError(f"a worker's share of the examples ({shard.rows}) holds no full batch of {config.batch_size}; "
                         "lower distill.batch_size or distill.num_workers, or train on more queries")
    epoch, skip = divmod(start, per_epoch)
    while True:
        for batch in shard.batches(config.batch_size, config.shuffle_buffer, epoch_seed(config.seed, epoch)):
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


def seeded(config: DistillConfig, rank: int, step: int, micro: int) -> tuple[np.random.Generator, int]:
    """The generator of one micro-batch's draws, and its dropout seed, drawn first from the same key."""
    rng = np.random.default_rng([config.seed, rank, step, micro])
    return rng, int(rng.integers(2**62))


def start_training(student_model: torch.nn.Module, config: DistillConfig, state: dict | None, prepare):
    """The model placed by `prepare` (on its device, DDP-wrapped), then AdamW and its schedule over the parameters
    where they now live, then their saved state. Loading an optimizer's state casts it to its parameters' device
    and dtype, so this order matters: restoring before the move left AdamW's state on the CPU beside parameters
    on the GPU, and every restart failed."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if state is not None:
        student_model.load_state_dict(state["model"])
    model = prepare(student_model)
    optimizer = torch.optim.AdamW(student_model.parameters(), lr=config.lr)
    if config.lr_schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return model, optimizer, scheduler


def mean_over_workers(value, device: torch.device):
    """`value` (a float, or a tensor on `device`) averaged over the DDP workers (the logged loss is the whole
    batch's, not rank 0's shard's)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    if isinstance(value, torch.Tensor):
        total = value.clone()
        dist.all_reduce(total)
        return total / dist.get_world_size()
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def load_state(checkpoint) -> dict | None:
    """The training state of `checkpoint`, or, when its file cannot be read (truncated, corrupt), of the newest
    earlier checkpoint of the same run that can (`checkpoint_keep` keeps them); None when none can, and training
    starts over. Checkpoint folders are named by their time, so their names sort oldest first."""
    import pyarrow.fs as pafs
    import ray.train

    folder = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    siblings = sorted((info.path for info in checkpoint.filesystem.get_file_info(pafs.FileSelector(folder))
                       if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
                       and info.path <= checkpoint.path.rstrip("/")), reverse=True)
    for path in siblings or [checkpoint.path]:
        try:
            with ray.train.Checkpoint(path, checkpoint.filesystem).as_directory() as directory:
                return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file: try the one before
            logger.warning("checkpoint %s cannot be read (%s: %s); trying the one before it", path,
                           type(error).__name__, str(error)[:200])
    logger.warning("no checkpoint of this run can be read; training starts from the student as configured")
    return None


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point. ``loop_config``: the DistillConfig, the student path, the examples table and the text
    files (``texts``: queries and passages per language) in the workspace, and the MLflow ids."""
    import ray.train
    import ray.train.torch

    from td_ray.textjoin import open_lookup
    from td_ray.workspace import Workspace

    config = DistillConfig.model_validate(loop_config["distill"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config.seed)
    devices.use_reserved_threads(max(1, int(config.cpus_per_worker)))  # torch, FAISS and the tokenizer's pool
    device = ray.train.torch.get_device()

    workspace, files = Workspace(loop_config["workspace"]), loop_config["texts"]
    texts = TrainingTexts(open_lookup(workspace, files["queries"], "training queries"),
                          {lang: open_lookup(workspace, folder, f"passages ({lang})")
                           for lang, folder in files["passages"].items()})
    student = Student(config, workspace.resolve(loop_config["student"]))
    precision = Precision(config.mixed_precision, device)
    checkpoint = ray.train.get_checkpoint()
    state = load_state(checkpoint) if checkpoint is not None else None
    model, optimizer, scheduler = start_training(student.model, config, state, ray.train.torch.prepare_model)
    step = 0
    if state is not None:
        if precision.scaler and "scaler" in state:
            precision.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        logger.info("rank %d resumed at step %d", rank, step)
    loss_fn = make_loss(config)
    step_logger = StepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None
    shard = ExampleShard(workspace, loop_config["examples"], rank, context.get_world_size())
    stream = micro_batches(shard, config, step * config.grad_accum_steps)

    def report(metrics: dict[str, float], final: bool) -> None:
        # Every rank calls report (it synchronises them); only rank 0 writes the checkpoint. Checkpoints upload in
        # the background while training goes on; the final one, which holds the model to register, before fit ends.
        if step_logger is not None:
            step_logger.flush()
        if rank != 0:
            ray.train.report(metrics)
            return
        directory = tempfile.mkdtemp(prefix="td-ray-checkpoint-")
        saved = {"model": student.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step}
        if precision.scaler:
            saved["scaler"] = precision.scaler.state_dict()
        torch.save(saved, Path(directory) / STATE_FILE)
        if final:
            student.save(Path(directory) / HF_DIR)
        mode = ray.train.CheckpointUploadMode.SYNC if final else ray.train.CheckpointUploadMode.ASYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)

    start_step = step
    metrics = {"step": float(step), "start_step": float(start_step)}
    step_metrics = StepMetrics()
    pin = device.type == "cuda"

    def produce() -> Iterator[MicroBatch]:
        for upcoming in range(start_step, config.steps):
            for micro in range(config.grad_accum_steps):
                rng, torch_seed = seeded(config, rank, upcoming, micro)
                prepared = prepare(student, texts, next(stream), config, rng, upcoming, torch_seed)
                yield to_device(prepared, device, pin=True) if pin else prepared

    steady_from: tuple[int, float] | None = None  # (step, time) once the first step is done: start-up is not pace

    def log_interval() -> dict[str, float]:
        latest = metrics
        for logged_step, values in step_metrics.collect(device):
            latest = values | {"step": float(logged_step), "start_step": float(start_step)}
            if step_logger is not None:
                step_logger.log(logged_step, latest)
        timed_steps, seconds = step - steady_from[0], time.perf_counter() - steady_from[1]
        return latest | {"steps_per_s": timed_steps / seconds if timed_steps and seconds > 0 else 0.0,
                         "host_syncs_per_step": step_metrics.host_syncs / max(step - start_step, 1),
                         "host_wait_ms_per_step": 1000 * waited / max(timed_steps, 1)}

    prefetched, waited = Prefetcher(produce()), 0.0  # waited: seconds the training thread waited for a micro-batch
    model.train()
    try:
        while step < config.steps:
            optimizer.zero_grad()
            loss_sum = torch.zeros((), device=device)
            for micro in range(config.grad_accum_steps):
                asked = time.perf_counter()
                prepared = next(prefetched)
                if steady_from is not None:  # the first micro-batch waits out the start-up: not pace
                    waited += time.perf_counter() - asked
                last = micro == config.grad_accum_steps - 1
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with precision.autocast():
                        loss = micro_batch_loss(model, loss_fn, prepared, config, device) / config.grad_accum_steps
                    precision.backward(loss)
                loss_sum += loss.detach()
            grad_norm = precision.step(optimizer, model.parameters(), config.max_grad_norm)
            scheduler.step()
            step += 1
            step_metrics.add(step, scheduler.get_last_lr()[0], loss_sum, grad_norm)
            steady_from = steady_from or (step, time.perf_counter())
            checkpoint_due = step % config.checkpoint_every == 0 or step == config.steps
            if step % config.log_every == 0 or checkpoint_due:
                metrics = log_interval()
                if step_logger is not None:
                    step_logger.flush()
            if checkpoint_due:
                report(metrics, final=step == config.steps)
    finally:
        prefetched.close()
    if checkpoint is not None and step == start_step:  # resumed a finished run: hand its model back
        report(metrics, final=True)
