"""Look at the MLflow UI as a person would: two pipeline runs on tinyshakespeare, `mlflow ui` on their
store, and screenshots taken by headless Chromium of the pages the README sends people to.

    apt-get install chromium            # Debian's package; not part of `make test`
    .venv/bin/python bench/ui_screenshots.py [--out docs/screenshots] [--steps 300]

The two runs differ in train.lr only. Saved: the experiment's runs in the model-training view, the chart
view comparing the two runs (loss curves, images by key), a run's overview (description, dataset,
source), its attention heatmaps, the champion's model version page (card gist, aliases, tags) and its
logged model's page (the versions it is registered as).
Prints where each screenshot went; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT.parent / "shared" / "data" / "tinyshakespeare.txt"
SMALL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=64", "train.batch_size=12",
         "train.eval_interval=50", "train.log_interval=10", "eval.max_new_tokens=80", "eval.max_tokens=20000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline(workdir: Path, steps: int, lr: float) -> None:
    sets = [*SMALL, f"train.max_steps={steps}", f"train.lr={lr}", f"train.min_lr={lr / 10}",
            f"data.source={CORPUS}", f"workdir={workdir}"]
    env = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": str(PROJECT)}
    subprocess.run([sys.executable, "-m", "flows", "run", *[a for s in sets for a in ("--set", s)]], check=True,
                   env=env, cwd=PROJECT)


def screenshot(chromium: str, url: str, out: Path, size: str = "1600,1000") -> None:
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=60000",  # charts draw late (lazy plotly)
                    "--run-all-compositor-stages-before-draw", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{out}  <- {url}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=PROJECT / "docs" / "screenshots")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workdir", type=Path, help="reuse the store of an earlier call (skips the two runs)")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: chromium not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ui-screens-"))
    if args.workdir is None:
        for lr in (1e-3, 3e-3):
            pipeline(workdir, args.steps, lr)

    from mlflow.tracking import MlflowClient

    from flows.registry.ui_view import VIEW_ID

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("attention-pipeline")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    champion = client.get_model_version_by_alias("attention-transformer", "champion")
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                           "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        e, ids = exp.experiment_id, [r.info.run_id for r in runs]
        ml = "workflowType=machine_learning"
        pages = {
            "runs.png": f"{base}/#/experiments/{e}/runs?{ml}",
            # the pipeline's saved view (flows/registry/ui_view.py): losses first, on one chart
            "compare_charts.png": f"{base}/#/experiments/{e}/runs?{ml}&compareRunsMode=CHART"
                                  f"&viewStateShareKey={VIEW_ID}",
            "compare_runs.png": f"{base}/#/compare-runs?runs=[{','.join(repr(i) for i in ids)}]".replace("'", '"')
                                + f"&experiments=[\"{e}\"]",
            "run_overview.png": f"{base}/#/experiments/{e}/runs/{ids[-1]}?{ml}",
            "run_heatmaps.png": f"{base}/#/experiments/{e}/runs/{ids[-1]}/artifacts/figures/attention_heatmaps.png",
            "model_version.png": f"{base}/#/models/attention-transformer/versions/{champion.version}",
            "logged_model.png": f"{base}/#/experiments/{e}/models/{champion.source.removeprefix('models:/')}",
        }
        for name, url in pages.items():
            screenshot(chromium, url, args.out / name, "1600,2600" if name == "compare_charts.png" else "1600,1000")
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
    print(f"store: {uri}")


if __name__ == "__main__":
    main()
