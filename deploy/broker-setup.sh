#!/usr/bin/env bash
# Least-privilege broker users for one Keelson namespace (issue 12, "Hard edges").
#
#   deploy/broker-setup.sh [--vhost V] [--create-vhost] [--namespace NS] [--user-prefix P] SECRETS_DIR
#
# Creates (or updates) the broker users keelson-gateway, keelson-logic and
# keelson-operator (each name preceded by P, default none) and sets their
# configure/write/read permissions on vhost V (default "/") for the exchanges and
# queues of namespace NS (default "keelson"), as listed in protocol/TOPOLOGY.md,
# "Broker users and permissions". Gateways and logic servers get no configure right
# on the namespace's exchanges and durable queues: run them with
# `declare_topology = false` in [transport], after the operator has declared the
# topology once (and again for a new service):
#   keelson topology declare --config operator.toml [--service NAME ...]
# Each password
# is read from SECRETS_DIR/<user>.password, or generated into that file (mode 600)
# when it does not exist. Run it on a broker node (it calls rabbitmqctl; set
# RABBITMQCTL to use another command). Idempotent: running it again changes nothing
# but the passwords' files it reads.
#
# Then give the logic servers `trusted_publishers = ["keelson-gateway",
# "keelson-operator"]` (the operator's `keelson dlq replay` re-sends requests that
# name users) and each process the URL of its own user, e.g.
#   urls = ["amqp://keelson-gateway@broker:5672/%2f"], password_env = "KEELSON_AMQP_PASSWORD"
set -euo pipefail

vhost=/
create_vhost=0
ns=keelson
ctl=${RABBITMQCTL:-rabbitmqctl}
prefix=
usage() { sed -n '4,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --vhost) vhost=${2:?--vhost needs a value}; shift 2 ;;
    --create-vhost) create_vhost=1; shift ;;
    --namespace) ns=${2:?--namespace needs a value}; shift 2 ;;
    --user-prefix) prefix=${2:?--user-prefix needs a value}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
secrets=$1
case $ns in
  *[!A-Za-z0-9_-]*|'') echo "namespace must be letters, digits, - and _ (got '$ns')" >&2; exit 2 ;;
esac
mkdir -p "$secrets"
chmod 700 "$secrets"

if [ "$create_vhost" = 1 ] && ! $ctl -q list_vhosts --no-table-headers name | grep -qxF -- "$vhost"; then
  $ctl -q add_vhost "$vhost"
fi

password_of() { # the user's password, generated into its file if missing
  local file=$secrets/$1.password
  if [ ! -s "$file" ]; then
    (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > "$file")
  fi
  cat "$file"
}

N="${ns}\\."            # the namespace prefix, dots escaped
GEN='amq\.gen-.*'       # server-named queues: subscriptions and the reply-node probe
DEFAULT='amq\.default'  # the default exchange: replies, copies, the reply-node probe

# role configure write read
# Gateways and logic servers declare the namespace's exchanges and durable queues
# passively (no right needed) and configure only their server-named queues. Binding
# a queue needs write on the queue and read on the exchange; publishing, write on
# the exchange; consuming, read on the queue.
roles=(
  "keelson-gateway"
  "^${GEN}\$"
  "^(${N}requests|${GEN}|${DEFAULT})\$"
  "^(${N}control|${GEN})\$"

  "keelson-logic"
  "^(${N}lease\\..*|${GEN})\$"
  "^(${N}(requests|dead-letter|delay|control|context|svc\\..*)|${GEN}|${DEFAULT})\$"
  "^(${N}(requests|control|context|svc\\..*|lease\\..*)|${GEN})\$"

  "keelson-operator"
  "^(${N}.*|${GEN})\$"
  "^(${N}.*|${GEN}|${DEFAULT})\$"
  "^(${N}.*|${GEN})\$"
)

users=$($ctl -q list_users --no-table-headers | cut -f1)
for ((i = 0; i < ${#roles[@]}; i += 4)); do
  user=$prefix${roles[i]}
  password=$(password_of "$user")
  if printf '%s\n' "$users" | grep -qxF -- "$user"; then
    $ctl -q change_password "$user" "$password"
  else
    $ctl -q add_user "$user" "$password"
  fi
  $ctl -q set_permissions -p "$vhost" "$user" "${roles[i+1]}" "${roles[i+2]}" "${roles[i+3]}"
  echo "$user: configure ${roles[i+1]}  write ${roles[i+2]}  read ${roles[i+3]}"
done
echo "passwords in $secrets/<user>.password"
