#!/usr/bin/env bash
# Start (if not running) the servers the test suite talks to: Redis, PostgreSQL, MariaDB, and the
# brokers (RabbitMQ, NATS with JetStream) for the message-queue examples and tests. Idempotent: a
# running service is left alone. Installs what is missing from Debian's packages.
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
# RabbitMQ: required by idem-rabbitmq's tests (rabbitmqctl too, which counts unacked messages).
if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
  echo "installing: rabbitmq-server"
  # Loopback only, before the package's first start.
  if [ ! -e /etc/rabbitmq/rabbitmq.conf ]; then
    mkdir -p /etc/rabbitmq && echo "listeners.tcp.local = 127.0.0.1:5672" >/etc/rabbitmq/rabbitmq.conf
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server; } ||
    echo "could not install rabbitmq-server" >&2
fi
# The other brokers apart: no test needs them yet, so a failed install must not cost the others.
brokers=()
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || brokers+=(nats-server)
if [ ${#brokers[@]} -gt 0 ]; then
  echo "installing (optional): ${brokers[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${brokers[@]}"; } ||
    echo "could not install ${brokers[*]}: the brokers are not started" >&2
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

# NATS: no test of the suite needs it yet, so it is started and reported, and its absence does
# not fail the run.
if ! port_open 127.0.0.1 4222; then
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
fi
wait_for nats "port_open 127.0.0.1 4222" 20 || true
# RabbitMQ is required (idem-rabbitmq): started if it is not running, and the run fails without it.
if ! port_open 127.0.0.1 5672; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_for rabbitmq "port_open 127.0.0.1 5672 && rabbitmqctl -q await_startup" 120 || status=1

exit "$status"
