#!/bin/sh
# One role and one database per service, each with its own password (the compose file's .env); the same layout
# `llmops services start --team` creates on this machine (llmops/services/team.py: TEAM_SERVICES["postgres"]).
set -eu
for db in prefect mlflow mlflow_auth ledger; do
  pw=$(eval echo "\${$(echo "$db" | tr a-z A-Z)_DB_PASSWORD}")
  psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -v role="$db" -v pw="$pw" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'pw';
CREATE DATABASE :"role" OWNER :"role";
REVOKE ALL ON DATABASE :"role" FROM PUBLIC;
SQL
done
