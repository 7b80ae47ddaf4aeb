#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no registry there): build llama.cpp with CUDA once,
# prove the appliance serves a Qwen 3.5 (qwen35moe) model on the GPU, then benchmark it
# against llama-server built from the same sources.
#
#   bench/gpu/device_run.sh setup check      # first call: build + first real run
#   bench/gpu/device_run.sh bench            # later call on the same warm machine
#
# What travels (see bench/README.md, "On a GPU machine"): .device/llama-src.tar.gz (the
# llama-cpp-python 0.3.36 sdist's llama_cpp/ and vendor/llama.cpp without models/docs),
# .device/whl/*.whl (the appliance's dependencies the machine lacks, for its python3),
# optionally .device/smol1.bin + smol2.bin (SmolLM2's GGUF in two pieces).
set -uo pipefail
ROOT=$(pwd)
W=${GPU_WORK:-/tmp/gpuwork}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
export PATH="/usr/local/cuda/bin:$PATH"
export PYTHONPATH="/tmp/site:$ROOT" PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH="/tmp/site/llama_cpp/lib:${LD_LIBRARY_PATH:-}"
A3B="$W/models/a3b/qwen35moe-a3b-shape.gguf"
SMOL="$W/models/smol/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

setup() {
    if [ -x "$W/build/bin/llama-server" ] && [ -e /tmp/site/llama_cpp/lib/libllama.so ]; then
        say "setup: already built"; return 0
    fi
    mkdir -p "$W/src" "$W/models/a3b" "$W/models/tiny"
    tar -xzf .device/llama-src.tar.gz -C "$W/src"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .device/whl/*.whl || return 1
    cp -r "$W/src/llama_cpp" /tmp/site/llama_cpp
    # The models are written while nvcc runs (one core each, the build takes the rest).
    python3 bench/gpu/make_qwen35moe.py "$A3B" >"$W/gen.log" 2>&1 &
    nvcc --version | tail -2
    cmake -S "$W/src/vendor/llama.cpp" -B "$W/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_CURL=OFF >"$W/cmake.log" 2>&1 || { tail -30 "$W/cmake.log"; return 1; }
    say "configured"
    cmake --build "$W/build" --target llama-server llama -j 20 >"$W/build.log" 2>&1 \
        || { grep -m5 -B2 -A10 "error" "$W/build.log"; tail -20 "$W/build.log"; return 1; }
    say "built"
    mkdir -p /tmp/site/llama_cpp/lib
    find "$W/build" -name 'lib*.so*' -exec cp -a {} /tmp/site/llama_cpp/lib/ \;
    ls /tmp/site/llama_cpp/lib
    wait
    cat "$W/gen.log"
}

assemble_smol() {
    [ -e "$SMOL" ] && return 0
    [ -e .device/smol1.bin ] && [ -e .device/smol2.bin ] || { say "no SmolLM2 pieces here"; return 1; }
    mkdir -p "$(dirname "$SMOL")"
    cat .device/smol1.bin .device/smol2.bin >"$SMOL"
    echo "$SMOL_SHA  $SMOL" | sha256sum -c - || { rm -f "$SMOL"; return 1; }
}

check() {
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
    python3 -c "import llama_cpp; print('llama_supports_gpu_offload:', llama_cpp.llama_supports_gpu_offload())"
    serve_and_call "$A3B" a3b
}

tests() {  # the tiny qwen35moe tests (greedy, grammar, batched == solo, hybrid cache) on CUDA
    timeout 150 python3 -X faulthandler -m pytest -q -W ignore tests/engine/test_tiny_qwen35.py \
        tests/engine/test_scheduler.py::test_tiny_qwen35moe_batched_equals_solo \
        tests/engine/test_scheduler.py::test_hybrid_model_checkpoint_reuse_matches_cache_off \
        >"$OUT/pytest.log" 2>&1
    local rc=$?
    grep -E "passed|failed|error|Fatal|Segmentation|File \"/work" "$OUT/pytest.log" | head -25
    say "tests rc=$rc"
}

serve_and_call() {  # MODEL NAME: run the appliance as a user would and call it with curl
    local model=$1 name=$2 port=8011 data="$W/data-$2"
    rm -rf "$data"; mkdir -p "$data"
    local key
    key=$(python3 -m appliance keys create gpu --data-dir "$data" | tail -1)
    python3 -m appliance serve --models-dir "$(dirname "$model")" --data-dir "$data" \
        --default-model "$(basename "$model" .gguf | tr A-Z a-z)" --port $port --parallel 8 \
        --ctx-size 8192 >"$OUT/serve-$name.log" 2>&1 &
    local pid=$! start
    start=$(date +%s.%N)
    for _ in $(seq 600); do
        curl -sf localhost:$port/health >/dev/null && break; sleep 0.1
    done
    say "health 200 after $(python3 -c "import time; print(round(time.time() - $start, 2))") s"
    local auth="Authorization: Bearer $key" id
    id=$(curl -s localhost:$port/v1/models -H "$auth" | python3 -c 'import json,sys; d=json.load(sys.stdin)["data"][0]; print(d["id"]); print(json.dumps(d), file=sys.stderr)')
    curl -s localhost:$port/v1/chat/completions -H "$auth" -H 'Content-Type: application/json' \
        -d '{"model":"'"$id"'","messages":[{"role":"user","content":"Hello there"}],"max_tokens":64,"temperature":0}'
    echo
    curl -sN localhost:$port/v1/chat/completions -H "$auth" -H 'Content-Type: application/json' \
        -d '{"model":"'"$id"'","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}' | tail -4
    curl -s localhost:$port/v1/chat/completions -H "$auth" -H 'Content-Type: application/json' -d '{"model":"'"$id"'",
        "messages":[{"role":"user","content":"Weather in Paris?"}],"max_tokens":64,
        "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}],
        "tool_choice":{"type":"function","function":{"name":"get_weather"}}}'
    echo
    nvidia-smi --query-gpu=memory.used --format=csv,noheader
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
    curl -s localhost:$port/metrics | grep -E '^appliance_(requests_total|tokens_total|kv|memory|prefix)' | head -12
    grep -iE "offload|CUDA0|model buffer|KV buffer|loaded" "$OUT/serve-$name.log" | head -12
    kill -INT $pid; wait $pid
    say "served $name"
}

bench() {
    local ls="$W/build/bin/llama-server" common=(--quick --ignore-eos --python python3 --threads 8 --parallel 8)
    timeout "${BENCH_TIMEOUT:-200}" python3 bench/serving_bench.py "${common[@]}" --llama-server "$ls" \
        --model "$A3B" --ctx 16384 --concurrency 1,4,8 --output "$OUT/bench-a3b.json" 2>&1 | tail -45
    say "a3b bench done"
    if assemble_smol; then
        timeout 250 python3 bench/serving_bench.py "${common[@]}" --llama-server "$ls" --model "$SMOL" \
            --output "$OUT/bench-smol.json" 2>&1 | tail -45
        say "smol bench done"
    fi
}

for stage in "$@"; do
    say "== $stage"
    "$stage" || say "$stage failed"
done
