#!/usr/bin/env bash
# Start (if not running) the servers the test suite talks to: Redis, PostgreSQL, MariaDB, and the
# brokers the adapters' tests need (NATS with JetStream, RabbitMQ, tansu for Kafka). Idempotent: a running service
# is left alone. Installs what is missing from Debian's packages. Exits non-zero if one of them
# cannot be reached.
set -uo pipefail

need_install=()
command -v redis-server >/dev/null || need_install+=(redis-server)
command -v redis-cli >/dev/null || need_install+=(redis-tools)
command -v openssl >/dev/null || need_install+=(openssl)  # the TLS test makes its certificates
command -v pg_ctlcluster >/dev/null || need_install+=(postgresql)
[ -x /usr/sbin/mariadbd ] || need_install+=(mariadb-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing: ${need_install[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}"
fi
# The brokers the adapters' tests need (NATS with JetStream for idem-nats, RabbitMQ and its
# rabbitmqctl for idem-rabbitmq), installed apart, so that a failed install is reported as such.
brokers=()
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || brokers+=(nats-server)
if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
  brokers+=(rabbitmq-server)
  # Loopback only, before the package's first start.
  if [ ! -e /etc/rabbitmq/rabbitmq.conf ]; then
    mkdir -p /etc/rabbitmq && echo "listeners.tcp.local = 127.0.0.1:5672" >/etc/rabbitmq/rabbitmq.conf
  fi
fi
if [ ${#brokers[@]} -gt 0 ]; then
  echo "installing: ${brokers[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${brokers[@]}"; } ||
    echo "could not install ${brokers[*]} (the adapters' tests need them)" >&2
fi

wait_for() { # name, command, [tries of 0.5 s]
  for _ in $(seq 1 "${3:-60}"); do
    if eval "$2" >/dev/null 2>&1; then echo "$1: up"; return 0; fi
    sleep 0.5
  done
  echo "$1: NOT reachable" >&2
  return 1
}

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

status=0

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for redis "redis-cli -h 127.0.0.1 -p 6379 ping" || status=1

if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
wait_for postgres "pg_isready -h 127.0.0.1 -p 5432" || status=1
psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" || true

if ! mariadb -h 127.0.0.1 -uroot -e 'SELECT 1' >/dev/null 2>&1; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
fi
wait_for mariadb "mariadb -h 127.0.0.1 -uroot -e 'SELECT 1'" || status=1
mariadb -h 127.0.0.1 -uroot -e 'CREATE DATABASE IF NOT EXISTS test' || true

# NATS with JetStream (required: idem-nats); a run without it exits non-zero.
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
if ! port_open 127.0.0.1 4222 && [ -x "$nats_bin" ]; then
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$nats_bin" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
fi
wait_for nats "port_open 127.0.0.1 4222" 20 || status=1
# RabbitMQ (required: idem-rabbitmq): started if it is not running; the run fails without it.
if ! port_open 127.0.0.1 5672; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_for rabbitmq "port_open 127.0.0.1 5672 && rabbitmqctl -q await_startup" 120 || status=1

# tansu, a Kafka-protocol broker (required: idem-kafka), with its PostgreSQL engine in a database
# of its own (`tansu`, schema from tansu's repository at v0.6.0: the crate does not ship it).
# Installed with cargo if missing (about 7 min on 2 cores), started on 127.0.0.1:9092.
tansu_root=/opt/idem-brokers
tansu_bin="$tansu_root/bin/tansu"
if [ ! -x "$tansu_bin" ]; then
  echo "installing: tansu 0.6.0 (cargo install, about 7 min)"
  tansu_build=$(mktemp -d /tmp/tansu-build.XXXXXX)
  cargo install --locked --root "$tansu_root" --features dynostore,postgres tansu@0.6.0 \
    --target-dir "$tansu_build" || echo "could not install tansu (idem-kafka's tests need it)" >&2
  rm -rf "$tansu_build"
fi
tansu_db_ready() {
  psql -h 127.0.0.1 -U postgres -d tansu -tAc "SELECT to_regclass('public.record') IS NOT NULL" 2>/dev/null | grep -q t
}
if ! tansu_db_ready; then
  psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'tansu'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE tansu" || true
  psql -h 127.0.0.1 -U postgres -d tansu -v ON_ERROR_STOP=1 -q \
    -f "$(dirname "$0")/tansu/pg-schema-0.6.0.sql" >/dev/null || true
fi
tansu_db_ready || { echo "tansu's database: schema NOT loaded" >&2; status=1; }
if ! port_open 127.0.0.1 9092 && [ -x "$tansu_bin" ]; then
  mkdir -p /var/log/tansu
  nohup "$tansu_bin" broker \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine "postgres://postgres@127.0.0.1:5432/tansu?sslmode=disable" \
    >>/var/log/tansu/broker.log 2>&1 </dev/null &
fi
wait_for tansu "port_open 127.0.0.1 9092" 60 || status=1

exit "$status"
