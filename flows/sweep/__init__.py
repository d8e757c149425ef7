"""Hyperparameter sweeps: Ray Tune over the pipeline's own training, every trial a child MLflow run.

spec.py reads and checks what is searched (`SweepConfig`, `--search KEY=SPEC`); trials.py is one trial
(Tune's trainable around the pipeline's Ray Train run); tuner.py runs or resumes the Tune experiment
and says how each trial ended; report.py logs the results table and figures to the sweep's parent run;
flow.py is the Prefect flow that prepares the data once, runs the trials and registers the best.
"""
