"""Models-from-code entry for the guarded pyfunc (logged as the model's code file)."""
import mlflow

from trojan_gate.plugins.guarded_pyfunc import GuardedModel

mlflow.models.set_model(GuardedModel())
