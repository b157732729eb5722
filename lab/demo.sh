#!/usr/bin/env bash
# `make demo` (root): a single-host lab, site.yml against it, then one answer streamed
# through nginx to this terminal word by word. The lab stays up afterwards.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LABCTL=(lab/labctl.py)
RELEASE=${LAB_RELEASE:-bookworm}
# LAB_LLM=llamacpp: an llm host too, and the answer comes from llama.cpp's server (real inference);
# LAB_LLM_MODEL=FILE.gguf: on that model instead of the generated test model (make demo-real).
LLM=${LAB_LLM:-}
LLM_MODEL=${LAB_LLM_MODEL:-}
PROMPT=${DEMO_PROMPT:-Explain in two sentences why nginx buffering breaks token streaming.}
MAX_TOKENS=${DEMO_MAX_TOKENS:-60}

if [ "$(id -u)" != 0 ]; then
  echo "make demo needs root (systemd-nspawn, network namespaces)" >&2
  exit 1
fi

step() { printf '\n==> %s\n' "$*"; }

on_failure() {
  echo >&2
  echo "demo: failed; the lab is left as it is for a look (${PY} lab/labctl.py status, ${PY} lab/labctl.py ssh single)." >&2
  echo "demo: remove it with: make lab-destroy" >&2
}
trap on_failure ERR

step "Clearing any earlier lab"
"$PY" "${LABCTL[@]}" destroy

step "Creating the single-host lab (Debian ${RELEASE})${LLM:+ with an llm host (${LLM})}"
"$PY" "${LABCTL[@]}" create --topology single --release "$RELEASE" ${LLM:+--llm "$LLM"}

step "Deploying the stack with site.yml"
if [ -n "$LLM_MODEL" ]; then
  make --no-print-directory deploy DEPLOY_ARGS="-e streamgate_llm_model_file=$(realpath "$LLM_MODEL")"
else
  make --no-print-directory deploy
fi

EDGE=$("$PY" "${LABCTL[@]}" address edge)
URL="https://${EDGE}/v1/chat/stream"
# What the lab and the play left next to the inventory: the CA of the edge's certificate and the
# lab's client key (read by curl from a file, so the key shows in no command line).
CA=ansible/inventories/lab/ca.pem
AUTH_HEADER=$(mktemp)
trap 'rm -f "$AUTH_HEADER"' EXIT
printf 'Authorization: Bearer %s\n' "$(cat ansible/inventories/lab/client-key)" > "$AUTH_HEADER"
BODY=$("$PY" -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": int(sys.argv[2]), "granularity": "word"}))' \
  "$PROMPT" "$MAX_TOKENS")

step "Streaming an answer through nginx on ${EDGE} (words appear as they arrive)"
# -N: no curl-side buffering, so what reaches the terminal is what nginx sent, when it sent it.
curl -sS -N --fail-with-body --max-time 120 --cacert "$CA" -H @"$AUTH_HEADER" \
  -H 'Content-Type: application/json' -d "$BODY" "$URL"
echo

cat <<EOF

The lab is up.
  Chat page:     https://${EDGE}/  (a browser on this machine; from another one:
                   ssh -L 8443:${EDGE}:443 root@<this machine>, then https://localhost:8443/)
                 It asks for the key in ansible/inventories/lab/client-key. Trust the lab's CA,
                 ${CA}, as an authority in the browser (Chromium: Settings, Privacy and
                 security, Security, Manage certificates, Authorities, Import), or, for this
                 throwaway lab only, accept the certificate warning once.
  Stream again:  curl -N --cacert ${CA} -H "Authorization: Bearer \$(cat ansible/inventories/lab/client-key)" \\
                   -H 'Content-Type: application/json' -d '{"prompt": "hello"}' ${URL}
  Log in:        ${PY} lab/labctl.py ssh single
                 (same as: ssh -i lab/.state/ssh/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null lab@${EDGE})
  Inventory:     ansible/inventories/lab/hosts.yml   (make testinfra, make loadtest use it)
  Remove it:     make lab-destroy
EOF
