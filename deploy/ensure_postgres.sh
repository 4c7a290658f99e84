#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries the deployment tests need are installed (Debian package
# `postgresql`). Installs them when missing and we are root with apt-get; otherwise says why the
# Postgres tests will skip. Never creates or starts a cluster: the test fixture starts its own
# throwaway server on a free loopback port and stops it.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing the Debian package postgresql (server binaries for the Postgres tests)"
  mkdir -p /etc/postgresql-common
  # no 'main' cluster on :5432 from the package's post-install
  [ -e /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
else
  echo "PostgreSQL server not installed and not root: the Postgres-backed tests will be SKIPPED" \
       "(install it with: apt-get install -y postgresql)" >&2
fi
