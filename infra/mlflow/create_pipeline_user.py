"""Create the MLflow user the pipeline logs as, or reset its password: the `mlflow-init` one-shot of
infra/compose.yaml runs it once the server is healthy, logged in as the admin.

The pipeline (Prefect worker, Ray nodes) never holds the admin login. Its own user is not an admin:
with `default_permission = READ` (basic_auth.ini) it creates its experiments and registered models and
manages those, reads the others, and cannot manage users. Rerunning is safe: an existing user keeps
its permissions, gets the password from the environment and loses admin rights if it had them.

Environment: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the admin),
MLFLOW_PIPELINE_USERNAME / MLFLOW_PIPELINE_PASSWORD. Prints names, never passwords.
"""

from __future__ import annotations

import os
import sys

REQUIRED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_PIPELINE_USERNAME", "MLFLOW_PIPELINE_PASSWORD")


def main() -> int:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        print(f"create_pipeline_user: set {', '.join(missing)}", file=sys.stderr)
        return 2
    username = os.environ["MLFLOW_PIPELINE_USERNAME"]
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        print(f"create_pipeline_user: MLFLOW_PIPELINE_USERNAME is the admin ({username}); "
              "the pipeline needs a user of its own", file=sys.stderr)
        return 2

    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    password = os.environ["MLFLOW_PIPELINE_PASSWORD"]
    try:
        user = client.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        print(f"create_pipeline_user: created MLflow user {username}")
        return 0
    client.update_user_password(username, password)
    if user.is_admin:
        client.update_user_admin(username, False)
    print(f"create_pipeline_user: MLflow user {username} exists; password set from the environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
