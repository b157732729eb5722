#!/usr/bin/env bash
# The lab end to end (what `make test-lab` runs, as root): split lab up, deploy, a second deploy
# and a --check --diff run that must both report changed=0, testinfra, a short load test, the
# operations under load, and always teardown. With LAB_LLM=llamacpp the lab also has an llm host
# (llama.cpp's server, the llm role, deployed with the rest while the app hosts still stream from
# the simulator); after the operations the app hosts are redeployed to stream from it, and
# testinfra (which then compares the engine's stream with the gateway's) and a short load test
# run again, judging without the text.
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
LAB_LLM="${LAB_LLM:-}"
# As many users as the server decodes at once (the llm role's streamgate_llm_parallel). The model
# decodes on one of the machine's two cores, beside the generator, the gateway and nginx: now and
# then a starved moment merges a few tokens of the streams open then (2 of 193 answers at one
# instant, the generator itself not lagging), so 3 % may look buffered; a buffering relay makes
# every answer look so (tests/load: 100 %). Failures keep the default gate: llama.cpp's server
# closes after every streamed answer while promising keep-alive, and the gateway's one retry of a
# request dropped on a reused connection goes to a fresh one (tests/unit/test_gateway_transport.py).
LLM_LOADTEST_ARGS="${LLM_LOADTEST_ARGS:---users 8 --run-time 30s --slo-buffered-ratio 0.03}"
LOG_DIR="$(mktemp -d -t streamgate-e2e-XXXXXX)"
SUMMARY=()
# Next to the lab's inventory, so the lab's group_vars apply to it too (git-ignored).
SMALLER_INVENTORY=ansible/inventories/lab/hosts-minus-one-app.yml
# The lab's inventory with the app hosts on the llm host (labctl writes it; git-ignored).
LLM_INVENTORY=ansible/inventories/lab/hosts-llm.yml

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
    make --no-print-directory lab-destroy || echo "lab_e2e: lab-destroy failed: remove the lab by hand" >&2
    rm -f "$SMALLER_INVENTORY" "$LLM_INVENTORY"
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

# The app hosts stream from the simulator first, whether or not there is an llm host.
step lab make --no-print-directory lab LAB_TOPOLOGY="$LAB_TOPOLOGY" LAB_RELEASE="$LAB_RELEASE" \
    LAB_LLM="$LAB_LLM" LAB_UPSTREAM=simulator

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
    # The edge gets a new upstream, the simulator's and the llm server's firewalls let the new app
    # host in; every other host (the app hosts already there) must report changed=0.
    edge_hosts=$(.venv/bin/python -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))["all"]["children"]; print(" ".join([*c["edge"]["hosts"], *((c.get("simulator") or {}).get("hosts") or {}), *((c.get("llm") or {}).get("hosts") or {})]))' "$LAB_INVENTORY")
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
if [ -n "$LAB_LLM" ]; then
    # Real inference: the app hosts redeployed to stream from the llm host's llama.cpp server.
    step llm-inventory .venv/bin/python lab/labctl.py inventory --upstream llm --output "$LLM_INVENTORY"
    step deploy-llm make --no-print-directory deploy INVENTORY="$LLM_INVENTORY" DEPLOY_ARGS=-v
    step testinfra-llm make --no-print-directory testinfra INVENTORY="$LLM_INVENTORY"
    step loadtest-llm make --no-print-directory loadtest INVENTORY="$LLM_INVENTORY" LOADTEST_ARGS="$LLM_LOADTEST_ARGS"
fi
# Last, once every log has its share (deploys, testinfra, the load tests): no key in any of them.
step secrets env STREAMGATE_E2E_LOG_DIR="$LOG_DIR" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/infra/test_secrets_in_logs.py --hosts='ansible://all' --ansible-inventory="$PWD/$LAB_INVENTORY"
echo "lab_e2e: all steps passed"
