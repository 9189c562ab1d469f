"""Register the distilled student in the MLflow model registry as a pyfunc that turns texts into vectors.

A dense student returns one vector per text [n, dim]. A ColBERT-X student returns token vectors [n, length, dim]:
queries (the default, `params={"side": "query"}`) padded with [MASK] to query_maxlen, every position scoring;
documents (`params={"side": "document"}`) with only the tokens MaxSim uses, zero-padded to the longest.
"""
from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


class StudentPyfunc(mlflow.pyfunc.PythonModel):
    """`predict` takes texts (a list, or a DataFrame whose first column holds them) and returns vectors."""

    def load_context(self, context) -> None:
        from td_ray.encoders.colbert import ColBERTStudentEncoder
        from td_ray.encoders.spec import is_colbert
        from td_ray.encoders.dense import StudentEncoder

        path = context.artifacts["student"]
        self.colbert = is_colbert(path)
        self.encoder = ColBERTStudentEncoder(path) if self.colbert else StudentEncoder(path)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        texts = model_input.iloc[:, 0].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
        texts = [str(text) for text in texts]
        if not self.colbert:
            return self.encoder.encode(texts)
        side = (params or {}).get("side", "query")
        if side == "query":
            return self.encoder.encode_queries(texts)
        if side != "document":
            raise ValueError(f"params side must be `query` or `document`, got {side!r}")
        documents = self.encoder.encode_documents(texts)
        padded = np.zeros((len(documents), max((len(d) for d in documents), default=0), self.encoder.dim), np.float32)
        for row, vectors in zip(padded, documents):
            row[:len(vectors)] = vectors
        return padded


INPUT_EXAMPLE = ["what is the boiling point of water at altitude"]
"""The example query stored with the model: what `predict` takes."""


def requirements() -> list[str]:
    """What serving the model needs, as an index can install it: exact releases without a local build suffix (the
    `+cpu` of a CPU wheel), and torch as a range that its CUDA builds satisfy too."""
    pins = []
    for package in ("torch", "transformers", "numpy", "pandas"):
        release = version(package).split("+")[0]
        major = int(release.split(".")[0])
        pins.append(f"torch>={release},<{major + 1}" if package == "torch" else f"{package}=={release}")
    return pins


def describe(tags: dict[str, str]) -> str:
    """The model version's description, from its lineage tags (`distill.lineage`).

    >>> print(describe({"td_ray.student_kind": "colbert", "td_ray.loss": "kl", "td_ray.teacher": "t5-3b",
    ...                 "td_ray.passage_lang": "zh", "td_ray.mt_model": "zh=nllb", "td_ray.training_key": "0123456789abcdef",
    ...                 "td_ray.config_hash": "c0ffee"}))
    A colbert student distilled by td-ray (loss kl) from the teacher t5-3b, on passages in zh (MT: zh=nllb). Training key 0123456789ab, config c0ffee; the tags hold the full lineage.
    """
    def get(key: str) -> str:
        return tags.get(f"td_ray.{key}", "unknown")

    return (f"A {get('student_kind')} student distilled by td-ray (loss {get('loss')}) from the teacher "
            f"{get('teacher')}, on passages in {get('passage_lang')} (MT: {get('mt_model')}). Training key "
            f"{get('training_key')[:12]}, config {get('config_hash')}; the tags hold the full lineage.")


def register_student(student_dir: Path, name: str, alias: str, tags: dict[str, str]) -> str:
    """Log the student (with a model card) into the active run, register it under `name`, tag and describe it, then
    point `alias` at it; returns the version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    import td_ray
    from td_ray.encoders.export import model_card
    from td_ray.encoders.spec import is_colbert

    colbert = is_colbert(student_dir)  # the folder is in the layout its library loads: a card makes it a hub model
    (Path(student_dir) / "README.md").write_text(model_card("colbert" if colbert else "dense",
                                                            "plaid-x" if colbert else "sentence-transformers", tags))
    if colbert:
        signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                                   params=ParamSchema([ParamSpec("side", "string", "query")]))
    else:
        signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
    info = mlflow.pyfunc.log_model(
        name="student",
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"student": str(student_dir)},
        code_paths=[str(Path(td_ray.__file__).parent)],
        pip_requirements=requirements(),
        signature=signature,
        input_example=INPUT_EXAMPLE,
        registered_model_name=name,
    )
    registered = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():  # every tag before the alias moves: who loads @alias finds its lineage
        client.set_model_version_tag(name, registered, key, value)
    client.update_model_version(name, registered, description=describe(tags))
    client.set_registered_model_alias(name, alias, registered)
    logger.info("registered %s version %s as @%s", name, registered, alias)
    return registered
