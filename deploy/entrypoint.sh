#!/bin/sh
# Container entry point: on the first start create the configuration, PKI, schema and admin user, then run the hub.
#
#   (no arguments) or "hub"   init (idempotent), then twistd in the foreground, without a pid file
#   anything else             run it instead, e.g. `bsscihub user list` (docker compose run --rm hub bsscihub ...)
set -eu

config=${HUB_CONFIG:-/config/hub.yaml}
password_file=${HUB_PASSWORD_FILE:-/data/initial-admin-password}
# How the operator runs a command in this container, for the first start's message (the cluster's hubs set theirs).
exec_in=${HUB_EXEC:-docker compose exec hub}

if [ "$#" -gt 0 ] && [ "$1" != hub ]; then
    exec "$@"
fi

# init keeps whatever exists: the configuration, certificates, database and users of a previous start.
set -- --config "$config" init --password-file "$password_file"
for name in ${HUB_HOSTNAMES:-}; do
    set -- "$@" --hostname "$name"
done
out=$(bsscihub "$@") || { status=$?; printf '%s\n' "$out"; exit "$status"; }
printf '%s\n' "$out"

case $out in
*"user admin created"*)
    cat <<MSG
bsscihub: first start. Log in to the web UI (port 8080 of this container; the compose files
bsscihub: publish it on http://127.0.0.1:8080/) as "admin" with the password in $password_file:
bsscihub:     $exec_in cat $password_file
bsscihub: then set your own and delete the file:
bsscihub:     $exec_in bsscihub --config $config user passwd admin
bsscihub:     $exec_in rm $password_file
MSG
    ;;
esac

exec twistd --nodaemon --pidfile= bsscihub --config "$config"
