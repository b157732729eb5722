#!/usr/bin/env bash
# The lab end to end (what `make test-lab` runs, as root): split lab up, deploy, a second deploy
# and a --check --diff run that must both report changed=0, testinfra, a short load test, the
# operations under load, and always teardown. With LAB_LLM_UPSTREAM=1, then a real upstream that
# is not the simulator: llama.cpp's server (tools/llm) on the controller, the app hosts redeployed
# to stream from it, testinfra and a short load test again (they judge without the text).
# Prints the wall time of each step and a summary; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
    echo "lab_e2e: needs root (systemd-nspawn, network namespaces)" >&2
    exit 1
fi

LAB_TOPOLOGY="${LAB_TOPOLOGY:-split}"
LAB_RELEASE="${LAB_RELEASE:-bookworm}"
LOADTEST_ARGS="${LOADTEST_ARGS:---users 100 --run-time 30s}"
LAB_LLM_UPSTREAM="${LAB_LLM_UPSTREAM:-0}"
# Fewer users than the server decodes at once (tools/llm/serve.py --parallel 32). The model
# decodes on one of the machine's two cores, beside the generator, the gateway and nginx: now and
# then a starved moment merges a few tokens of the streams open then (2 of 193 answers at one
# instant, the generator itself not lagging), so 3 % may look buffered; a buffering relay makes
# every answer look so (tests/load: 100 %). Failures keep the default gate: llama.cpp's server
# closes after every streamed answer while promising keep-alive, and the gateway's one retry of a
# request dropped on a reused connection goes to a fresh one (tests/unit/test_gateway_transport.py).
LLM_LOADTEST_ARGS="${LLM_LOADTEST_ARGS:---users 8 --run-time 30s --slo-buffered-ratio 0.03}"
LLM_PORT=8080
LOG_DIR="$(mktemp -d -t streamgate-e2e-XXXXXX)"
SUMMARY=()
# Next to the lab's inventory, so the lab's group_vars apply to it too (git-ignored).
SMALLER_INVENTORY=ansible/inventories/lab/hosts-minus-one-app.yml
# The lab's inventory with the app hosts on the llama.cpp server (host variables win over the
# lab's group_vars).
LLM_INVENTORY=ansible/inventories/lab/hosts-llm.yml
LLM_MODEL="$LOG_DIR/test-llama-paced.gguf"
LLM_PID=""

# Prerequisites before the trap: a failure here has made no lab, so there is nothing to
# remove (and lab-destroy would only remove a lab that someone else made).
make --no-print-directory venv deps

# On a failure, what each app host's gateway logged about its 5xx answers (one JSON line each,
# with the upstream's error), into the log directory, before the hosts are gone.
save_gateway_errors() {
    local host
    for host in $(.venv/bin/python -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["all"]["children"]["app"]["hosts"]))' "$LAB_INVENTORY" 2>/dev/null); do
        timeout 60 .venv/bin/python lab/labctl.py ssh "$host" sudo journalctl -u streamgate --no-pager -o cat --since -60min \
            | grep -E '"status": ?5[0-9][0-9]' | tail -n 200 >"$LOG_DIR/gateway-5xx-$host.log" || true
    done
}

teardown() {
    local status=$?
    if [ "$status" != 0 ] && [ -f "${LAB_INVENTORY:-}" ]; then
        save_gateway_errors
    fi
    echo "== teardown (make lab-destroy)"
    if [ -n "$LLM_PID" ]; then
        kill "$LLM_PID" 2>/dev/null || true
        wait "$LLM_PID" 2>/dev/null || true
    fi
    make --no-print-directory lab-destroy || echo "lab_e2e: lab-destroy failed: remove the lab by hand" >&2
    rm -f "$SMALLER_INVENTORY" "$LLM_INVENTORY" "$LLM_MODEL"
    echo "== summary (logs in $LOG_DIR)"
    printf '  %s\n' "${SUMMARY[@]}"
    exit "$status"
}
trap teardown EXIT

# step NAME COMMAND...: run, tee the output to a log, record the wall time.
step() {
    local name=$1
    shift
    local started=$SECONDS
    echo "== $name: $*"
    if "$@" 2>&1 | tee "$LOG_DIR/$name.log"; then
        SUMMARY+=("$(printf '%-12s %4ss  ok' "$name" $((SECONDS - started)))")
    else
        SUMMARY+=("$(printf '%-12s %4ss  FAILED' "$name" $((SECONDS - started)))")
        return 1
    fi
}

# Sum of changed=N over the PLAY RECAP lines of a deploy log.
recap_changed() {
    awk '/^PLAY RECAP/ {recap = 1; next} recap && / changed=/ {
        for (i = 1; i <= NF; i++) if ($i ~ /^changed=/) { split($i, kv, "="); sum += kv[2] }
    } END { print sum + 0 }' "$1"
}

step lab make --no-print-directory lab LAB_TOPOLOGY="$LAB_TOPOLOGY" LAB_RELEASE="$LAB_RELEASE"

# Scale-out, as an operator does it: deploy without the last app host, then with the whole
# inventory. The hosts already deployed must report changed=0 except the edge (new upstream).
LAB_INVENTORY=ansible/inventories/lab/hosts.yml
added_app_host=$(.venv/bin/python - "$LAB_INVENTORY" "$SMALLER_INVENTORY" <<'PY'
import sys, yaml
inventory = yaml.safe_load(open(sys.argv[1]))
app_hosts = inventory["all"]["children"]["app"]["hosts"]
if len(app_hosts) > 1:
    added = sorted(app_hosts)[-1]
    del app_hosts[added]
    yaml.safe_dump(inventory, open(sys.argv[2], "w"))
    print(added)
PY
)
if [ -n "$added_app_host" ]; then
    step deploy-less make --no-print-directory deploy INVENTORY="$SMALLER_INVENTORY" DEPLOY_ARGS=-v
fi
# -v: the secrets step below proves that not even a verbose run prints a key.
step deploy make --no-print-directory deploy DEPLOY_ARGS=-v
if [ -n "$added_app_host" ]; then
    # The edge gets a new upstream, the simulator's firewall lets the new app host in; every
    # other host (the app hosts already there) must report changed=0.
    edge_hosts=$(.venv/bin/python -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))["all"]["children"]; print(" ".join([*c["edge"]["hosts"], *(c.get("simulator") or {}).get("hosts", {})]))' "$LAB_INVENTORY")
    touched=$(awk -v skip=" $added_app_host $edge_hosts localhost " '/^PLAY RECAP/ {recap = 1; next}
        recap && / changed=/ && index(skip, " " $1 " ") == 0 && $0 !~ / changed=0 / {print $1}' "$LOG_DIR/deploy.log")
    if [ -n "$touched" ]; then
        SUMMARY+=("scale-out    FAILED: adding $added_app_host changed other hosts: $touched")
        exit 1
    fi
    SUMMARY+=("scale-out    ok: adding $added_app_host changed only it, the edge and the simulator")
fi
step redeploy make --no-print-directory deploy DEPLOY_ARGS=-v
changed=$(recap_changed "$LOG_DIR/redeploy.log")
if ! grep -q '^PLAY RECAP' "$LOG_DIR/redeploy.log" || [ "$changed" != 0 ]; then
    SUMMARY+=("idempotence  FAILED: the second deploy reported changed=$changed")
    echo "lab_e2e: the second deploy is not idempotent (changed=$changed):" >&2
    grep -E '^(changed|TASK)' "$LOG_DIR/redeploy.log" | grep -B1 '^changed' >&2 || true
    exit 1
fi
SUMMARY+=("idempotence  ok: the second deploy reported changed=0")
step check make --no-print-directory deploy DEPLOY_ARGS="--check --diff -v"
changed=$(recap_changed "$LOG_DIR/check.log")
if [ "$changed" != 0 ]; then
    SUMMARY+=("check-diff   FAILED: --check --diff on the provisioned hosts reported changed=$changed")
    exit 1
fi
SUMMARY+=("check-diff   ok: --check --diff on the provisioned hosts reported changed=0")
step testinfra make --no-print-directory testinfra
if [ -f loadtest/run.py ]; then
    step loadtest make --no-print-directory loadtest LOADTEST_ARGS="$LOADTEST_ARGS"
else
    SUMMARY+=("loadtest     skipped: loadtest/run.py does not exist")
fi
# The chat page on the edge over HTTPS, in headless Chromium: it streams word by word (split lab).
if [ "$LAB_TOPOLOGY" = split ]; then
    step browser .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/e2e/test_lab_browser.py \
        --ansible-inventory="$PWD/$LAB_INVENTORY"
fi
# The doctor, hop by hop (tests/doctor_lab): it names no hop on the healthy deployment, and the
# hop of each buffering fault injected (then taken back out) one at a time. Split only: it needs
# an edge apart from two app hosts. Before the operations, which change the deployment.
if [ "$LAB_TOPOLOGY" = split ]; then
    step doctor .venv/bin/python -m pytest -q -p no:cacheprovider tests/doctor_lab \
        --ansible-inventory="$PWD/$LAB_INVENTORY"
fi
# Operations under load (tests/ops): reloads, a new build (rolled across the app hosts, or taken
# over in place on a single host), a stop, a killed host; they change the deployment, so they
# come after testinfra and the load test.
step operations env STREAMGATE_E2E_LOG_DIR="$LOG_DIR" .venv/bin/python -m pytest -q -s -p no:cacheprovider \
    tests/ops --ansible-inventory="$PWD/$LAB_INVENTORY"
if [ "$LAB_LLM_UPSTREAM" = 1 ]; then
    # Any upstream: llama.cpp's own HTTP server (xllamacpp) on a generated model whose pace is a
    # small real model's, bound to the controller's address on the lab network.
    llm_address=$(.venv/bin/python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["all"]["vars"]["lab_controller_address"])' "$LAB_INVENTORY")
    llm_url="http://$llm_address:$LLM_PORT"
    step llm-model .venv/bin/python tools/llm/make_test_model.py "$LLM_MODEL" --size paced
    .venv/bin/python tools/llm/serve.py --model "$LLM_MODEL" --host "$llm_address" --port "$LLM_PORT" \
        >"$LOG_DIR/llm-server.log" 2>&1 &
    LLM_PID=$!
    for _ in $(seq 60); do  # bounded: 60 tries, 1 s apart
        curl -sf --max-time 2 "$llm_url/health" >/dev/null && break
        kill -0 "$LLM_PID" 2>/dev/null || break
        sleep 1
    done
    if ! curl -sf --max-time 2 "$llm_url/health" >/dev/null; then
        SUMMARY+=("llm-server   FAILED: llama.cpp's server did not answer on $llm_url (log: $LOG_DIR/llm-server.log)")
        exit 1
    fi
    SUMMARY+=("llm-server   ok: llama.cpp's server on $llm_url")
    .venv/bin/python - "$LAB_INVENTORY" "$LLM_INVENTORY" "$llm_url/v1" <<'PY'
import sys, yaml
inventory = yaml.safe_load(open(sys.argv[1]))
for host_vars in inventory["all"]["children"]["app"]["hosts"].values():
    host_vars["streamgate_upstream_base_url"] = sys.argv[3]
    host_vars["streamgate_upstream_kind"] = "openai-compatible"
yaml.safe_dump(inventory, open(sys.argv[2], "w"))
PY
    step deploy-llm make --no-print-directory deploy INVENTORY="$LLM_INVENTORY" DEPLOY_ARGS=-v
    step testinfra-llm make --no-print-directory testinfra INVENTORY="$LLM_INVENTORY"
    step loadtest-llm make --no-print-directory loadtest INVENTORY="$LLM_INVENTORY" LOADTEST_ARGS="$LLM_LOADTEST_ARGS"
fi
# Last, once every log has its share (deploys, testinfra, the load tests): no key in any of them.
step secrets env STREAMGATE_E2E_LOG_DIR="$LOG_DIR" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/infra/test_secrets_in_logs.py --hosts='ansible://all' --ansible-inventory="$PWD/$LAB_INVENTORY"
echo "lab_e2e: all steps passed"
