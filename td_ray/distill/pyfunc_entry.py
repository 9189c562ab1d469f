"""MLflow models-from-code entry point: the registered student is rebuilt from code, never unpickled."""
import mlflow

from td_ray.distill.registry import StudentPyfunc

mlflow.models.set_model(StudentPyfunc())
