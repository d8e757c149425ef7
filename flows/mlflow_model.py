"""The import path of the pyfunc before flows/registry/ existed; the model now lives in flows/registry/pyfunc.py.

Every model registered before then stores a copy of the old `_pyfunc_entry.py`, which MLflow executes
at load time and which runs `from flows.mlflow_model import AttentionLM`: this module keeps those
versions loadable. New code imports from flows.registry.
"""

from flows.registry.loading import generate
from flows.registry.pyfunc import PACK, AttentionLM

__all__ = ["PACK", "AttentionLM", "generate"]
