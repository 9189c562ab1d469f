"""Register the distilled student in the MLflow model registry as a pyfunc that turns texts into vectors."""
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
        from td_ray.distill.model import StudentEncoder

        self.encoder = StudentEncoder(context.artifacts["student"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        texts = model_input.iloc[:, 0].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
        return self.encoder.encode([str(text) for text in texts])


def register_student(student_dir: Path, name: str, alias: str, tags: dict[str, str]) -> str:
    """Log the student into the active run, register it under `name`, point `alias` at it; returns the version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    import td_ray

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
    client.set_registered_model_alias(name, alias, registered)
    for key, value in tags.items():
        client.set_model_version_tag(name, registered, key, value)
    logger.info("registered %s version %s as @%s", name, registered, alias)
    return registered
