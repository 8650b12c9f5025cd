#!/bin/sh
# Probes for the head pod of a LeaderWorkerSet (installed as tessera-lws-check):
#   group-joined   every pod of the group has joined: LWS_GROUP_SIZE nodes alive (startup probe)
#   model-answers  the model on this pod answers a 1-token completion (readiness probe), so a
#                  Service sends requests only to a serving model
# The admin token is read from TESSERA_ADMIN_TOKEN_FILE; the head from TESSERA_HEAD_PORT (7470);
# the model's API from TESSERA_API_PORT (8000, vLLM's default on node rank 0).
set -eu

case "${1:-}" in
  group-joined)
    want="${LWS_GROUP_SIZE:-1}"
    alive=$(tessera --head "127.0.0.1:${TESSERA_HEAD_PORT:-7470}" --token-file "${TESSERA_ADMIN_TOKEN_FILE:-/etc/tessera/tokens/admin.token}" \
      --timeout 3s nodes -o json | grep -c '"state": "alive"' || true)
    if [ "$alive" -lt "$want" ]; then
      echo "$alive of $want nodes alive" >&2
      exit 1
    fi
    ;;
  model-answers)
    exec python3 - "${TESSERA_API_PORT:-8000}" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
try:
    models = json.load(urllib.request.urlopen(base + "/v1/models", timeout=3))["data"]
    body = json.dumps({"model": models[0]["id"], "prompt": "ping", "max_tokens": 1}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    out = json.load(urllib.request.urlopen(req, timeout=5))
    if not out.get("choices"):
        sys.exit(f"no completion: {out}")
except Exception as e:
    sys.exit(f"the model does not answer: {e}")
PY
    ;;
  *)
    echo "usage: tessera-lws-check group-joined|model-answers" >&2
    exit 2
    ;;
esac
