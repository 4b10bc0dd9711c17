#!/usr/bin/env bash
# reference_reasoning_compat.sh - the reference mesh-llm's reasoning-compatibility test, run against a mesh-llm node.
#
# Responsibility: extract crates/mesh-llm/tests/test_reasoning_compat.sh from the reference's local git mirror and
# change only its launch lines: instead of starting a bare llama-server on a thinking model, it starts a mesh-llm
# node serving that model (as "test", the name the script's requests use: the model file is written as test.gguf).
# Its seven checks then run unchanged against the node's API: no reasoning by default (streamed and not), none with
# enable_thinking false, reasoning_content when a request turns thinking on (streamed and not), a standard request,
# /v1/models.
#
# The model: a generated thinker (tests/ggufgen.py write_thinker: Qwen3-0.6B's real chat template; it thinks
# "Why? 4." and answers "Four"), or any thinking GGUF given as $1 (Qwen3-8B-Q4_K_M is the reference's).
#
# Usage: bench/reference_reasoning_compat.sh [MODEL.gguf]    (run from the repository root; PORT=18099 by default)
# Needs: the reference mirror (MESH_REF_REPO, default /work/.mirror/michaelneale+mesh-llm/repo), mesh-llm
# installed, curl. Exit status: the reference script's (0 when all seven pass).
set -euo pipefail

REPO="${MESH_REF_REPO:-/work/.mirror/michaelneale+mesh-llm/repo}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/reasoning-compat.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/models" "$WORK/home"
if [ -n "${1:-}" ]; then
    ln -s "$(realpath "$1")" "$WORK/models/test.gguf"
else
    python3 -c "import sys; from pathlib import Path; from tests.ggufgen import write_thinker
write_thinker(Path(sys.argv[1]))" "$WORK/models/test.gguf"
fi
git --git-dir="$REPO" show HEAD:crates/mesh-llm/tests/test_reasoning_compat.sh > "$WORK/reference.sh"
python3 - "$WORK" <<'PY'
import sys
work = sys.argv[1]
s = open(f"{work}/reference.sh").read()
start, end = s.index("# Find llama-server"), s.index("# Confirm thinking is disabled at startup")
launch = f'''# Launch lines changed for mesh-llm: a node serving the model file as "test" (its name is the file's stem)
MESH_LLM_HOME={work}/home setsid mesh-llm --model "$MODEL" --models-dir "$(dirname "$MODEL")" --port $PORT \\
    --console-port $((PORT + 1)) --ctx-size 2048 > {work}/node.log 2>&1 &
SERVER_PID=$!
cleanup() {{
    set +e
    kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null
    echo ""; echo "Results: $PASS passed, $FAIL failed"
    [ "$FAIL" -gt 0 ] && exit 1 || true
}}
trap cleanup EXIT
for i in $(seq 1 300); do
    curl -s "http://localhost:$PORT/v1/models" 2>/dev/null | grep -q '"serving"' && break
    sleep 1
done
'''
open(f"{work}/ours.sh", "w").write(s[:start] + launch + s[end:])
PY
bash "$WORK/ours.sh" "$WORK/models/test.gguf"
