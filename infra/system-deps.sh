#!/usr/bin/env bash
# What the test suite needs from the system, installed when missing (as root with apt-get), else reported: the tests
# that need a missing component skip with the reason. Called by `make test` (the README's second command) and so by
# .ci/run. Chromium: the browser tests (Playwright cannot download browsers here); PostgreSQL 15: the team ledger and
# team mode; redis-server: the team response cache and team mode.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing system packages the tests use: ${need[*]}"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; then
    exit 0
  fi
  echo "warning: could not install ${need[*]}; the tests that need them will be skipped with the reason" >&2
else
  echo "note: ${need[*]} not installed (needs root + apt-get); the tests that need them are skipped with the reason" >&2
fi
exit 0
