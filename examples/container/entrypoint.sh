#!/bin/sh
# One image, two roles. TESSERA_ROLE=head|worker picks one; under a LeaderWorkerSet the role comes
# from its environment without extra flags: LWS_WORKER_INDEX 0 is the head, the others join
# LWS_LEADER_ADDRESS. Everything else is configured with TESSERA_* variables (see --help).
set -eu

role="${TESSERA_ROLE:-}"
if [ -z "$role" ] && [ -n "${LWS_WORKER_INDEX:-}" ]; then
  if [ "$LWS_WORKER_INDEX" = "0" ]; then role=head; else role=worker; fi
fi
if [ -z "$role" ]; then
  echo "tessera entrypoint: set TESSERA_ROLE=head or TESSERA_ROLE=worker (or run under a LeaderWorkerSet)" >&2
  exit 2
fi

case "$role" in
  head)
    exec tessera-head --data-dir "${TESSERA_DATA_DIR:-/var/lib/tessera/head}" "$@"
    ;;
  worker)
    if [ -z "${TESSERA_HEAD:-}" ]; then
      if [ -n "${LWS_LEADER_ADDRESS:-}" ]; then
        scheme=http
        if [ -n "${TESSERA_TLS_CA:-}" ]; then scheme=https; fi
        TESSERA_HEAD="$scheme://$LWS_LEADER_ADDRESS:${TESSERA_HEAD_PORT:-7470}"
        export TESSERA_HEAD
      else
        echo "tessera entrypoint: a worker needs TESSERA_HEAD (or LWS_LEADER_ADDRESS)" >&2
        exit 2
      fi
    fi
    if [ -z "${TESSERA_NODE_NAME:-}" ] && [ -n "${LWS_WORKER_INDEX:-}" ]; then
      export TESSERA_NODE_NAME="worker-$LWS_WORKER_INDEX"
    fi
    exec tessera-worker --state-dir "${TESSERA_STATE_DIR:-/var/lib/tessera/worker}" "$@"
    ;;
  *)
    echo "tessera entrypoint: unknown TESSERA_ROLE '$role' (head or worker)" >&2
    exit 2
    ;;
esac
