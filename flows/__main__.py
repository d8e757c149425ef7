"""The command line: `python -m flows run|generate ...` (also installed as `attention-pipeline`).

Errors a user can cause print one line on stderr and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="pipeline config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline once (prepare, train, evaluate, register)")
    _add_config_args(run)
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    submit = sub.add_parser("submit", help="submit `run` with this config as a Ray Job to a cluster")
    submit.add_argument("--address", help="Ray dashboard (Jobs API) of the cluster, e.g. http://HEAD:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS)")
    _add_config_args(submit)
    submit.add_argument("--no-wait", dest="wait", action="store_false",
                        help="return after submitting instead of streaming the job's logs")
    submit.add_argument("--pip", action=argparse.BooleanOptionalAction, default=True,
                        help="install pyproject.toml's requirements (minus ray) in the job's runtime env; "
                        "--no-pip when the cluster's image already holds the project")
    submit.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def cmd_run(args) -> int:
    from flows.config import load_config
    from flows.data import resolve_source
    from flows.train import model_config_for

    cfg = load_config(args.config, args.overrides)
    resolve_source(cfg.data.source)      # fail fast on a missing path, before any service starts
    model_config_for(cfg, vocab_size=256)  # and on model options attention_core rejects
    from flows.pipeline import training_pipeline_flow

    reg = training_pipeline_flow(config=cfg)
    uri = cfg.tracking_uri()
    print(f"\nRegistered model: {reg.model_uri}  (alias champion: {'yes' if reg.champion else 'no'})")
    print(f"  also as models:/{reg.model_name}@challenger")
    print(f"MLflow UI for this store:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0


def cmd_submit(args) -> int:
    from flows.submit import submit_pipeline

    return submit_pipeline(args.address, config=args.config, overrides=args.overrides, wait=args.wait, pip=args.pip)


class _NoUserErrorTracebacks(logging.Filter):
    """Drop Prefect's traceback records for mistakes in the user's input: without --debug the CLI
    reports those in one line. Tracebacks of real bugs are kept (and the CLI re-raises them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.errors import is_user_error

        if record.exc_info and record.exc_info[1] is not None:
            return not is_user_error(record.exc_info[1])
        message = record.getMessage()
        return not ("Traceback (most recent call last)" in message
                    and ("flows.errors.UserError" in message or "attention_core.config.ConfigError" in message))


def _hide_user_error_tracebacks() -> None:
    import prefect  # noqa: F401 - its logging set-up must come first, or it drops our filters

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoUserErrorTracebacks())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.errors import is_user_error

    if not args.debug:
        _hide_user_error_tracebacks()
    try:
        return {"run": cmd_run, "submit": cmd_submit}[args.command](args)
    except Exception as exc:  # noqa: BLE001 - the CLI decides how errors look
        if args.debug or not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
