"""The command line: `python -m flows run|submit|generate|serve ...` (also installed as `attention-pipeline`).

This is the edge: the environment (MLFLOW_TRACKING_URI, RAY_ADDRESS, RAY_API_SERVER_ADDRESS) is read
here, once, into the config or the call; nothing deeper reads it. Errors a user can cause print one
line on stderr and exit with code 2; `--debug` shows the traceback. `run` keeps the libraries' own
output off the console (flows/console.py): it goes to a log file under the workdir, and `--debug`
shows it all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="pipeline config (YAML)")
    p.add_argument("--config-json", metavar="JSON", help="a whole pipeline config as JSON (what `submit` ships)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and all the libraries' output")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline once (prepare, train, evaluate, register)")
    _add_config_args(run)
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks and all the libraries' output (else in workdir/logs/)")
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
    _add_sweep_parser(sub)
    _add_generate_parser(sub)
    _add_export_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="search hyperparameters with Ray Tune (ASHA early stopping), every trial "
                        "an MLflow run, and register the best")
    _add_config_args(sw)
    sw.add_argument("--search", action="append", default=[], metavar="KEY=SPEC",
                    help="a config key and its space: choice:a,b,c | uniform:LO:HI | loguniform:LO:HI | int:LO:HI "
                    "(repeatable; added to the config file's sweep.search)")
    sw.add_argument("--trials", type=int, metavar="N", help="trials to sample (default: 8)")
    sw.add_argument("--max-concurrent", type=int, metavar="M", help="trials at once (default: as many as the "
                    "cluster holds)")
    sw.add_argument("--scheduler", choices=["asha", "fifo"], help="asha stops poor trials early (default); "
                    "fifo runs all to the end")
    sw.add_argument("--searcher", choices=["random", "optuna"], help="random (default) or optuna (the optuna extra)")
    sw.add_argument("--metric", choices=["val_loss", "train_loss"], help="what to minimise (default: val_loss)")
    sw.add_argument("--seed", type=int, metavar="S", help="the searcher's seed (default: 0)")
    sw.add_argument("--name", help="the sweep's name (default: derived from the config and the search, so the "
                    "same command resumes the same sweep)")
    sw.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="show tracebacks and all the libraries' output (else in workdir/logs/)")


def _add_export_parser(sub) -> None:
    exp = sub.add_parser("export", help="write a registered model in the Hugging Face format (transformers "
                         "loads it with no custom code)")
    exp.add_argument("--model-uri", default="models:/attention-transformer@champion",
                     help="registered model URI (default: %(default)s)")
    exp.add_argument("--format", choices=["hf"], default="hf", help="hf: config.json, model.safetensors and a "
                     "fast tokenizer, as GPT-2, Llama or Qwen3 (default)")
    exp.add_argument("--out", required=True, metavar="DIR", help="directory to write (replaced if it exists)")
    exp.add_argument("--check-text", metavar="TEXT", help="also load DIR with transformers (the hf extra) and "
                     "compare its logits and greedy tokens with the model's on TEXT")
    exp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                     "SQLite store in the workdir of --config/--set, as `run` uses)")
    _add_config_args(exp)
    exp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with a registered model (MLflow pyfunc)")
    gen.add_argument("--model-uri", default="models:/attention-transformer@champion",
                     help="registered model URI (default: %(default)s)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=100, metavar="N",
                     help="tokens to generate, at most the limit (default: 100)")
    gen.add_argument("--max-new-tokens-limit", type=int, metavar="L",
                     help="the most new tokens (and prompt tokens) allowed; default: the model's block_size "
                     "or 1024, whichever is larger")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0: greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the top K tokens; 0: all (default)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    gen.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                     "SQLite store in the workdir of --config/--set, as `run` uses)")
    _add_config_args(gen)
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve the pipeline on the nightly schedule from this process "
                           "(no work pool or worker needed)")
    serve.add_argument("--cron", help="cron schedule (default: the nightly deployment's in prefect.yaml)")
    serve.add_argument("--timezone", help="time zone of the cron schedule (default: the nightly deployment's)")
    serve.add_argument("--name", default="nightly", help="deployment name (default: %(default)s)")
    _add_config_args(serve)
    serve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _load_config(args, *, environment: bool = True):
    """The config of --config/--config-json and --set, with the environment filled in (the edge)
    unless `environment` is False."""
    from flows.config import load_config, with_environment

    cfg = load_config(args.config, args.overrides, json_text=args.config_json)
    return with_environment(cfg) if environment else cfg


def cmd_run(args) -> int:
    from flows.config import with_environment
    from flows.data import check_source
    from flows.preflight import check_before_run

    given = _load_config(args, environment=False)
    cfg = with_environment(given)
    check_source(cfg.data.source)  # fail fast on a missing path, before any service starts
    check_before_run(cfg)  # workers the local Ray can place, memory per worker, the samples' KV cache
    # The input is good (checked before torch or Prefect is even imported): the temporary Prefect server,
    # when the run needs one, boots on another core while this process imports the pipeline.
    from flows.prefect_server import start_temporary_server

    server = start_temporary_server()
    from flows import timing
    from flows.pipeline import training_pipeline_flow
    from flows.reaper import start_reaper

    start_reaper()  # if this process is killed, what it starts (Prefect's server, Ray's agents) goes too

    timing.hold("startup", timing.process_age())
    # The flow reads the same environment at its entry; its parameter (shown in Prefect's UI)
    # stays as given, so a tracking URI with credentials in MLFLOW_TRACKING_URI never becomes one.
    reg = _run_flow_quietly(args, cfg, server, lambda: training_pipeline_flow(config=given))
    _print_registration(reg, cfg)
    return 0


def _run_flow_quietly(args, cfg, server, call):
    """call() (a flow) with the console quiet (the libraries' output to <workdir>/logs) unless --debug,
    on the temporary Prefect server `server` when there is one."""
    from flows import timing
    from flows.console import log_to, quiet_console
    from flows.prefect_server import use_temporary_server

    with contextlib.nullcontext() if args.debug else quiet_console():
        log_to(cfg.workdir_path)  # says where the libraries' output goes (inside a quiet run)
        if server is not None:
            with timing.holding("prefect_start"):
                url = use_temporary_server(server)
            print(f"Prefect: a temporary server on {url}, stopped at exit (PREFECT_API_URL: use your own)",
                  file=sys.stderr)  # the log file's, or --debug's
        timing.open_stage("flow_start")  # closed where the flow's first task begins
        return call()


def _print_registration(reg, cfg) -> None:
    print(f"\nRegistered model: {reg.model_uri}  (alias champion: {'yes' if reg.champion else 'no'})")
    print(f"  also as models:/{reg.model_name}@challenger")
    print(mlflow_ui_line(cfg.tracking_uri(), reg.experiment_id))


def cmd_sweep(args) -> int:
    from flows.config import with_environment
    from flows.data import check_source
    from flows.preflight import check_before_run
    from flows.sweep.spec import check_sweep, load_sweep, sweep_name

    given = _load_config(args, environment=False)
    sweep = load_sweep(args.config, args.search, trials=args.trials, max_concurrent=args.max_concurrent,
                       scheduler=args.scheduler, searcher=args.searcher, metric=args.metric, seed=args.seed,
                       name=args.name)
    cfg = with_environment(given)
    check_sweep(cfg, sweep)  # every key and spec, before any service starts
    check_source(cfg.data.source)
    check_before_run(cfg)
    from flows.prefect_server import start_temporary_server

    server = start_temporary_server()
    from flows.reaper import start_reaper
    from flows.sweep.flow import sweep_flow

    start_reaper()
    name = sweep_name(cfg, sweep)
    print(f"Sweep {name}: {sweep.trials} trial(s) of {', '.join(f'{k}={v}' for k, v in sweep.search.items())}")
    reg = _run_flow_quietly(args, cfg, server, lambda: sweep_flow(config=given, sweep=sweep))
    _print_registration(reg, cfg)
    print(f"  the sweep's run (results table, figures): the run named {name} in experiment {cfg.registry.experiment}")
    return 0


def mlflow_ui_line(tracking_uri: str, experiment_id: str | None = None) -> str:
    """Where to see the run: the tracking server itself, else an `mlflow ui` on the store; credentials
    masked. With the experiment, the page to open: its runs in the UI's model-training view (MLflow 3
    otherwise opens in its GenAI view of traces and prompts), in the saved view that charts the losses
    first (flows/registry/ui_view.py)."""
    from flows.masking import mask_uri
    from flows.registry.ui_view import VIEW_ID

    local = not tracking_uri.startswith(("http://", "https://"))
    base = "http://127.0.0.1:5000" if local else mask_uri(tracking_uri).rstrip("/")
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_ID}"
    page = f", then open {base}/#/experiments/{experiment_id}/runs?{query}" if experiment_id else ""
    if not local:
        return f"MLflow UI: {base}" + page.replace(", then open", ";")
    return (f"MLflow UI for this store:  mlflow ui --backend-store-uri {mask_uri(tracking_uri)} "
            f"--host 127.0.0.1 --port 5000{page}")


def cmd_generate(args) -> int:
    from flows.modelpack import check_sampling

    # before MLflow is even imported; the model's own limit is checked once its config is downloaded
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed, limit=args.max_new_tokens_limit)
    from flows.mlflow_model import generate

    uri = args.tracking_uri or _load_config(args).tracking_uri()
    text = generate(args.model_uri, args.prompt, tracking_uri=uri, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                    max_new_tokens_limit=args.max_new_tokens_limit)
    print(args.prompt + text)
    return 0


def cmd_export(args) -> int:
    import tempfile

    from flows.hf_export import check_against_transformers, export_hf
    from flows.registry.loading import download_model_pack, user_facing_errors

    uri = args.tracking_uri or _load_config(args).tracking_uri()
    with tempfile.TemporaryDirectory() as tmp, user_facing_errors(uri, args.model_uri):
        model, tokenizer = download_model_pack(uri, args.model_uri, tmp)
    out = export_hf(model, tokenizer, args.out)
    print(f"{args.model_uri} -> {out} ({json.loads((out / 'config.json').read_text())['architectures'][0]})")
    if args.check_text:
        report = check_against_transformers(out, model, tokenizer, args.check_text)
        print("checked with transformers: " + ", ".join(f"{k} {v}" for k, v in report.items()))
        if not (report["max_abs_logit_diff"] <= 1e-4 and report["tokens_equal"] and report["greedy_equal"]):
            print("error: the export does not reproduce the model", file=sys.stderr)
            return 1
    return 0


def cmd_serve(args) -> int:
    from flows.config import apply_overrides, validate_config
    from flows.pipeline import nightly_deployment, serve_nightly

    nightly = nightly_deployment()
    if args.config or args.config_json:
        cfg = _load_config(args)
    else:  # the nightly deployment's parameters, with --set on top
        cfg = validate_config(apply_overrides(nightly["config"], args.overrides))
    # The served flow reads the environment where each run starts: nothing of this one's is baked in.
    serve_nightly(cfg, cron=args.cron or nightly["cron"], timezone=args.timezone or nightly["timezone"],
                  name=args.name)
    return 0


def cmd_submit(args) -> int:
    from flows.submit import submit_pipeline

    # The job's own `run` reads the cluster's environment; only the address comes from this one.
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    return submit_pipeline(address, config=args.config, config_json=args.config_json, overrides=args.overrides,
                           wait=args.wait, pip=args.pip, environ=os.environ)


class _NoUserErrorTracebacks(logging.Filter):
    """Drop Prefect's traceback records for mistakes in the user's input: without --debug the CLI
    reports those in one line. Tracebacks of real bugs are kept (and the CLI re-raises them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.errors import is_user_error

        if record.exc_info and record.exc_info[1] is not None:
            return not is_user_error(record.exc_info[1])
        message = record.getMessage()
        return not ("Traceback (most recent call last)" in message and "flows.errors.UserError" in message)


def _hide_user_error_tracebacks() -> None:
    import prefect  # noqa: F401 - its logging set-up must come first, or it drops our filters

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoUserErrorTracebacks())


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "submit": cmd_submit, "generate": cmd_generate, "export": cmd_export,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL each run starts a temporary Prefect server; three at once on a fresh
    # PREFECT_HOME (migrating one database) or on busy cores need more than Prefect's 20 s to answer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.errors import is_user_error

    if not args.debug and args.command not in ("run", "sweep"):  # these quiet their console themselves
        _hide_user_error_tracebacks()
    try:
        return COMMANDS[args.command](args)  # a quiet run has restored its streams before an error shows
    except Exception as exc:  # noqa: BLE001 - the CLI decides how errors look
        if args.debug or not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
