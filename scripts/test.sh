#!/usr/bin/env bash
# The whole test suite: unit, integration (real Redis/PostgreSQL/MariaDB/SQLite), compile-fail
# and doc tests. Starts the servers first if they are not running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo test --workspace --all-features
