#!/usr/bin/env bash
# reference_smoke.sh - run the reference mesh-llm's own OpenAI client smoke scripts against a running node.
#
# Responsibility: extract the reference implementation's client smokes (openai-python, openai-node, LiteLLM,
# langchain-openai) from its local git mirror into a temporary directory, run each one unchanged against the
# node's OpenAI API, and print one PASS / FAIL / SKIP line per script. Only the launch lines differ from the
# reference CI (scripts/ci-compat-smoke.sh there): the base URL and model id come from here, the node is already
# running. Nothing is fetched from the internet (LiteLLM is told to use its bundled model-cost map).
#
# Usage: bench/reference_smoke.sh [BASE_URL]      (default http://127.0.0.1:9337; "/v1" is appended if missing)
#
# Environment:
#   MESH_REF_REPO  git dir of the reference mirror (default /work/.mirror/michaelneale+mesh-llm/repo)
#   MESH_REF_REV   revision to extract the scripts from (default HEAD)
#   PYTHON         interpreter that has the client packages (default python3); e.g. /tmp/smokevenv/bin/python
#   NODE_PATH      where `require('openai')` is found (default: `npm root -g`)
#   SMOKE_MODEL    model id for the LiteLLM / LangChain scripts (default: the first id of /v1/models, as the
#                  reference CI does; "auto" also works)
#   SMOKE_TIMEOUT  seconds per script (default 300)
#
# Exit status: 0 when every script that ran passed (skipped ones do not fail the run), 1 otherwise, 2 when the
# node or the mirror cannot be used at all.

set -uo pipefail

BASE_URL="${1:-http://127.0.0.1:9337}"
BASE_URL="${BASE_URL%/}"
[[ "$BASE_URL" == *://* ]] || BASE_URL="http://$BASE_URL"
[[ "$BASE_URL" == */v1 ]] || BASE_URL="$BASE_URL/v1"
REPO="${MESH_REF_REPO:-/work/.mirror/michaelneale+mesh-llm/repo}"
REV="${MESH_REF_REV:-HEAD}"
PY="${PYTHON:-python3}"
TIMEOUT="${SMOKE_TIMEOUT:-300}"

export LITELLM_LOCAL_MODEL_COST_MAP=True # LiteLLM otherwise downloads its model-cost map at import
export NO_PROXY="127.0.0.1,localhost,::1${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

if ! git --git-dir="$REPO" rev-parse --verify --quiet "$REV^{commit}" >/dev/null; then
    echo "reference mirror not usable: $REPO ($REV)" >&2
    exit 2
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/reference-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

MODELS_JSON="$(curl -sf --max-time 10 "$BASE_URL/models" || true)"
FIRST_MODEL="$(printf '%s' "$MODELS_JSON" | python3 -c 'import json,sys
data = json.load(sys.stdin).get("data", [])
print(data[0].get("id", "") if data else "")' 2>/dev/null || true)"
if [[ -z "$FIRST_MODEL" ]]; then
    echo "no model listed at $BASE_URL/models: is the node running and serving? (got: ${MODELS_JSON:0:200})" >&2
    exit 2
fi
MODEL="${SMOKE_MODEL:-$FIRST_MODEL}"
if [[ -z "${NODE_PATH:-}" ]] && command -v npm >/dev/null 2>&1; then
    NODE_PATH="$(npm root -g 2>/dev/null || true)"
fi
export NODE_PATH="${NODE_PATH:-}"

echo "reference: $REPO @ $(git --git-dir="$REPO" rev-parse --short "$REV")"
echo "node:      $BASE_URL (model for LiteLLM/LangChain: $MODEL)"

FAILED=0
line() { printf '%-4s %-34s %s\n' "$1" "$2" "$3"; }

# run_one NAME CHECK_KIND PACKAGE CMD... : skip when PACKAGE is missing, else run CMD and report.
run_one() {
    local name="$1" kind="$2" package="$3"
    shift 3
    if ! git --git-dir="$REPO" show "$REV:scripts/$name" >"$WORK/$name" 2>/dev/null; then
        line SKIP "$name" "not in the reference at $REV"
        return
    fi
    if [[ "$kind" == python ]]; then
        if ! "$PY" -c "import $package" >/dev/null 2>&1; then
            line SKIP "$name" "python package '$package' missing for $PY (pip install ${package//_/-})"
            return
        fi
    elif ! command -v node >/dev/null 2>&1; then
        line SKIP "$name" "node is not installed"
        return
    elif ! node -e "require('$package')" >/dev/null 2>&1; then
        line SKIP "$name" "npm package '$package' missing (npm install $package; set NODE_PATH to its node_modules)"
        return
    fi
    local log="$WORK/$name.log" started=$SECONDS rc=0
    (cd "$WORK" && timeout "$TIMEOUT" "$@") >"$log" 2>&1 || rc=$?
    if ((rc == 0)); then
        line PASS "$name" "$((SECONDS - started))s"
    else
        FAILED=1
        line FAIL "$name" "exit $rc$( ((rc == 124)) && echo ' (timed out)') after $((SECONDS - started))s; output tail:"
        tail -n 15 "$log" | sed 's/^/       /'
    fi
}

run_one ci-openai-python-smoke.py python openai "$PY" ci-openai-python-smoke.py --base-url "$BASE_URL"
run_one ci-openai-node-smoke.cjs node openai node ci-openai-node-smoke.cjs --base-url "$BASE_URL"
run_one ci-litellm-smoke.py python litellm "$PY" ci-litellm-smoke.py --base-url "$BASE_URL" --model "$MODEL"
run_one ci-langchain-openai-smoke.py python langchain_openai \
    "$PY" ci-langchain-openai-smoke.py --base-url "$BASE_URL" --model "$MODEL"

exit "$FAILED"
