-- Runs once, when the postgres volume is first initialised: POSTGRES_DB creates the MLflow
-- database; the Prefect server gets its own.
CREATE DATABASE prefect;
