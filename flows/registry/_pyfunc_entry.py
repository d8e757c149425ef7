"""Executed by MLflow when the pyfunc model loads ("models from code"); never imported by the project."""

import mlflow

from flows.registry.pyfunc import AttentionLM

mlflow.models.set_model(AttentionLM())
