-- Second database for MLflow on the same Postgres (the compose file's POSTGRES_DB is prefect).
CREATE DATABASE mlflow;
