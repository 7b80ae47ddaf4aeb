#!/usr/bin/env bash
# Build the reference `llama-server` from the llama.cpp sources vendored in the
# very llama-cpp-python sdist the appliance links against, so both servers run
# the same ggml/llama code.
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36, the project's pin)
#   LLAMA_SDIST_DIR           an already unpacked sdist directory to reuse
#                             (e.g. /tmp/sdist/llama_cpp_python-0.3.36); when
#                             unset the sdist is downloaded into bench/.cache/
#   LLAMA_BUILD_DIR           cmake build directory
#                             (default bench/.cache/llama-server-build[-cuda])
#   CUDA=1                    build with -DGGML_CUDA=on
#   JOBS                      parallel build jobs (default 2)
#
# Prints the path of the binary on its last line of stdout. Idempotent: when
# the binary already exists nothing is rebuilt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${HERE}/.cache"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
CUDA="${CUDA:-0}"

suffix=""
if [[ "${CUDA}" == "1" ]]; then
    suffix="-cuda"
fi
BUILD_DIR="${LLAMA_BUILD_DIR:-${CACHE}/llama-server-build${suffix}}"
BIN="${BUILD_DIR}/bin/llama-server"

if [[ -x "${BIN}" ]]; then
    echo "llama-server already built" >&2
    echo "${BIN}"
    exit 0
fi

mkdir -p "${CACHE}"

if [[ -n "${LLAMA_SDIST_DIR:-}" ]]; then
    SDIST="${LLAMA_SDIST_DIR}"
else
    SDIST="${CACHE}/llama_cpp_python-${VERSION}"
    if [[ ! -d "${SDIST}/vendor/llama.cpp" ]]; then
        PIP="${PIP:-}"
        if [[ -z "${PIP}" ]]; then
            if [[ -x "${HERE}/../.venv/bin/pip" ]]; then
                PIP="${HERE}/../.venv/bin/pip"
            else
                PIP="pip"
            fi
        fi
        dl="${CACHE}/download"
        mkdir -p "${dl}"
        echo "downloading llama-cpp-python==${VERSION} sdist" >&2
        "${PIP}" download --no-deps --no-binary :all: \
            "llama-cpp-python==${VERSION}" -d "${dl}" >&2
        tarball="$(ls "${dl}"/llama_cpp_python-"${VERSION}".tar.gz)"
        tar -xzf "${tarball}" -C "${CACHE}"
    fi
fi

SRC="${SDIST}/vendor/llama.cpp"
if [[ ! -f "${SRC}/CMakeLists.txt" ]]; then
    echo "no llama.cpp sources at ${SRC}" >&2
    exit 1
fi

cmake_args=(
    -S "${SRC}" -B "${BUILD_DIR}"
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DCMAKE_BUILD_TYPE=Release
)
if command -v ninja >/dev/null 2>&1; then
    cmake_args+=(-G Ninja)
fi
if [[ "${CUDA}" == "1" ]]; then
    cmake_args+=(-DGGML_CUDA=on)
fi

echo "configuring ${SRC} -> ${BUILD_DIR}" >&2
cmake "${cmake_args[@]}" >&2
echo "building llama-server with ${JOBS} jobs" >&2
cmake --build "${BUILD_DIR}" --target llama-server -j"${JOBS}" >&2

if [[ ! -x "${BIN}" ]]; then
    echo "build finished but ${BIN} is missing" >&2
    exit 1
fi
echo "${BIN}"
