"""The Ray Train loop run by every worker: DDP over the student, KL to the teacher, checkpoints, resume."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from td_ray.config import DistillConfig
from td_ray.distill.losses import ContrastiveLoss, KLDistillationLoss, MarginMSELoss
from td_ray.distill.model import DualEncoder
from td_ray.distill.sampling import build_entries

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HF_DIR = "hf"


class StepLogger:
    """Per-step metrics straight to the stage's MLflow run (rank 0 only)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri) if tracking_uri and run_id else None
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])


def _tokenize(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def make_loss(config: DistillConfig) -> torch.nn.Module:
    """The configured training loss over student and teacher scores [batch, nway]."""
    if config.loss == "margin_mse":
        return MarginMSELoss()
    if config.loss == "contrastive":
        return ContrastiveLoss(config.contrastive_temperature)
    return KLDistillationLoss(config.alpha, config.student_temperature)


def sample_batch(batch: dict, config: DistillConfig, rng: np.random.Generator, progress: float) -> tuple[list, list, list]:
    """Per example, nway of its ranked candidates drawn by the configured sampler: (queries, passages, scores)."""
    queries, passages, scores = [], [], []
    for qid, query, pids, texts, values in zip(batch["qid"], batch["query"], batch["pids"], batch["passages"],
                                               batch["teacher_scores"]):
        entry = build_entries(str(qid), list(pids), list(values), config.nway, rng, languages=[config.passage_lang],
                              sampler=config.sampler, progress=progress, max_beta=config.sampling_max_beta,
                              keep_top=config.keep_top, short_list_policy="error")[0]
        queries.append(str(query))
        passages.extend(str(texts[index]) for index in entry.candidate_indices)
        scores.append(entry.teacher_scores)
    return queries, passages, scores


def train_step(model, loss_fn, tokenizer, batch: dict, config: DistillConfig, device: torch.device,
               rng: np.random.Generator, progress: float = 0.0) -> torch.Tensor:
    """The loss of one batch of examples: each query with nway sampled passages and their teacher scores."""
    queries, passages, scores = sample_batch(batch, config, rng, progress)
    teacher = torch.as_tensor(np.asarray(scores), dtype=torch.float32, device=device)
    student = model(_tokenize(tokenizer, queries, config.query_maxlen, device),
                    _tokenize(tokenizer, passages, config.passage_maxlen, device))
    return loss_fn(student) if config.loss == "contrastive" else loss_fn(student, teacher)


def _save(directory: Path, model, optimizer, scheduler, step: int, tokenizer, final: bool) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step}
    torch.save(state, directory / STATE_FILE)
    if final:
        model.save_pretrained(directory / HF_DIR, tokenizer)


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point: ``loop_config`` holds the DistillConfig, the student path and MLflow ids."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    config = DistillConfig.model_validate(loop_config["distill"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    device = ray.train.torch.get_device()

    tokenizer = AutoTokenizer.from_pretrained(loop_config["student"])
    student = DualEncoder.from_pretrained(loop_config["student"], config.pooling)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        logger.info("rank %d resumed at step %d", rank, step)
    model = ray.train.torch.prepare_model(student)
    loss_fn = make_loss(config)
    shard = ray.train.get_dataset_shard("train")
    step_logger = StepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None

    def report(metrics: dict[str, float], final: bool) -> None:
        # Every rank calls report (it synchronises them); only rank 0 writes the checkpoint.
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            _save(Path(directory), student, optimizer, scheduler, step, tokenizer, final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    start_step = step
    metrics = {"step": float(step), "start_step": float(start_step)}
    while step < config.steps:
        batches = 0
        for batch in shard.iter_batches(batch_size=config.batch_size, drop_last=True, batch_format="numpy"):
            batches += 1
            model.train()
            # Seeded by step and rank, so a resumed run draws the same passages without saving generator state.
            rng = np.random.default_rng([config.seed, rank, step])
            loss = train_step(model, loss_fn, tokenizer, batch, config, device, rng, step / config.steps)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
            optimizer.step()
            scheduler.step()
            step += 1
            metrics = {"loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "step": float(step), "start_step": float(start_step)}
            if step_logger is not None:
                step_logger.log(step, metrics)
            if step % config.checkpoint_every == 0 or step == config.steps:
                report(metrics, final=step == config.steps)
            if step >= config.steps:
                break
        if batches == 0:
            raise ValueError(
                f"worker {rank} got no full batch of {config.batch_size} examples; lower distill.batch_size or "
                "distill.num_workers, or train on more queries"
            )
    if checkpoint is not None and step == start_step:  # resumed a finished run: hand its model back
        report(metrics, final=True)
