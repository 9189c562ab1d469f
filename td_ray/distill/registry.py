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


def register_student(student_dir: Path, name: str, alias: str, tags: dict[str, str]) -> str:
    """Log the student into the active run, register it under `name`, tag it, then point `alias` at it; returns the
    version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    import td_ray
    from td_ray.encoders.spec import is_colbert

    if is_colbert(student_dir):
        signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                                   params=ParamSchema([ParamSpec("side", "string", "query")]))
    else:
        signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
    requirements = [f"{package}=={version(package)}" for package in ("torch", "transformers", "numpy", "pandas")]
    info = mlflow.pyfunc.log_model(
        name="student",
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"student": str(student_dir)},
        code_paths=[str(Path(td_ray.__file__).parent)],
        pip_requirements=requirements,
        signature=signature,
        registered_model_name=name,
    )
    registered = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():  # every tag before the alias moves: who loads @alias finds its lineage
        client.set_model_version_tag(name, registered, key, value)
    client.set_registered_model_alias(name, alias, registered)
    logger.info("registered %s version %s as @%s", name, registered, alias)
    return registered
