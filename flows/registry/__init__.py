"""MLflow: the pipeline's run and its lineage, the pyfunc model, its versions, the champion gate, the summary.

tracking.py finds or creates the one MLflow run of a flow run and logs params, lineage tags and the
evaluation once; pyfunc.py is the pickle-free pyfunc a model pack becomes; versions.py logs it to the
run and registers it once per run; loading.py reads registered models back (the gate, `flows
generate`); gate.py decides and records champion or not; summary.py writes the Prefect summary.
Every call takes an explicit tracking URI and builds its own client: nothing here reads or changes
MLflow's process-wide tracking or registry URI, `MLFLOW_TRACKING_URI` or the active run.
"""

from flows.registry.gate import CHALLENGER, CHAMPION, GateDecision, Registration, champion_gate, decide
from flows.registry.loading import download_model, generate, resolve_model_uri
from flows.registry.summary import run_url, summary_markdown
from flows.registry.tracking import (
    FLOW_RUN_TAG,
    close_pipeline_run,
    git_tags,
    library_versions,
    log_evaluation,
    mlflow_client,
    set_run_tags,
    start_pipeline_run,
)
from flows.registry.versions import log_model_version

__all__ = ["CHALLENGER", "CHAMPION", "FLOW_RUN_TAG", "GateDecision", "Registration", "champion_gate",
           "close_pipeline_run", "decide", "download_model", "generate", "git_tags", "library_versions",
           "log_evaluation", "log_model_version", "mlflow_client", "resolve_model_uri", "run_url",
           "set_run_tags", "start_pipeline_run", "summary_markdown"]
