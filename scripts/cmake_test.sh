#!/usr/bin/env bash
# Configures, builds and tests the C++ library with CMake (docs/CMAKE.md):
# build-cmake/ in the repository root, then ctest. Exits non-zero on any failure.
#
# Environment:
#   PYTHON          python whose torch is built against (default: .venv/bin/python)
#   TPX_CMAKE_CUDA  ON / OFF: build the CUDA kernels. Default: ON when torch is a
#                   CUDA build and nvcc is there (/usr/local/cuda/bin/nvcc or on PATH)
#   CMAKE           cmake >= 3.27 (default: the one beside $PYTHON, else on PATH)
#   JOBS            parallel build jobs (default $MAX_JOBS, else 2)
#   BUILD_DIR       build directory (default build-cmake, relative to the repo root)
#   TPX_CMAKE_ARGS  extra arguments for the configure step
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

die() {
  echo "cmake_test.sh: $*" >&2
  exit 1
}

py="${PYTHON:-.venv/bin/python}"
[[ -x "$py" ]] || py="$(command -v "$py" || true)"
[[ -n "$py" && -x "$py" ]] || die "no python at '${PYTHON:-.venv/bin/python}' (set PYTHON)"
# Absolute: tools found beside it (cmake, ninja) are run from other directories.
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"

torch_info="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path); print(torch.version.cuda or "")')" ||
  die "$py cannot import torch"
torch_prefix="$(sed -n 1p <<<"$torch_info")"
torch_cuda="$(sed -n 2p <<<"$torch_info")"

# cmake: the one installed beside the python (pip install cmake), else PATH.
cmake="${CMAKE:-}"
if [[ -z "$cmake" ]]; then
  for c in "$(dirname "$py")/cmake" "$(command -v cmake || true)"; do
    [[ -n "$c" && -x "$c" ]] && { cmake="$c"; break; }
  done
fi
[[ -n "$cmake" ]] || die "cmake not found: pip install 'cmake>=3.27' (or set CMAKE)"
cmake_version="$("$cmake" --version | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')"
if ! printf '3.27\n%s\n' "$cmake_version" | sort -V -C; then
  die "$cmake is version $cmake_version; need >= 3.27 (pip install 'cmake>=3.27')"
fi
ctest="$(dirname "$cmake")/ctest"
[[ -x "$ctest" ]] || ctest="$(command -v ctest)"

cuda="${TPX_CMAKE_CUDA:-}"
if [[ -z "$cuda" ]]; then
  cuda=OFF
  if [[ -n "$torch_cuda" ]] && { [[ -x /usr/local/cuda/bin/nvcc ]] || command -v nvcc >/dev/null; }; then
    cuda=ON
  fi
fi
case "${cuda^^}" in
  ON | 1 | TRUE | YES) cuda=ON ;;
  OFF | 0 | FALSE | NO) cuda=OFF ;;
  *) die "TPX_CMAKE_CUDA must be ON or OFF, got '$cuda'" ;;
esac

build="${BUILD_DIR:-build-cmake}"
jobs="${JOBS:-${MAX_JOBS:-2}}"

# A build directory configured against another torch would keep stale paths.
if [[ -f "$build/CMakeCache.txt" ]]; then
  cached="$(sed -n 's/^Torch_DIR:PATH=//p' "$build/CMakeCache.txt")"
  if [[ -n "$cached" && "$cached" != "$torch_prefix/Torch" ]]; then
    echo "cmake_test.sh: $build was configured for another torch ($cached); starting afresh"
    rm -rf "$build"
  fi
fi

generator=()
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  if [[ -x "$(dirname "$py")/ninja" ]] || command -v ninja >/dev/null; then
    generator=(-G Ninja)
    [[ -x "$(dirname "$py")/ninja" ]] && generator+=("-DCMAKE_MAKE_PROGRAM=$(dirname "$py")/ninja")
  fi
fi

echo "cmake_test.sh: torch CUDA '${torch_cuda:-none}', TPX_WITH_CUDA=$cuda, $cmake ($cmake_version), $build, -j$jobs"
start=$SECONDS
# shellcheck disable=SC2086  # TPX_CMAKE_ARGS is a list of words
"$cmake" -S . -B "$build" "${generator[@]}" \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DTorch_DIR="$torch_prefix/Torch" \
  -DTPX_WITH_CUDA="$cuda" \
  -DTPX_BUILD_TESTS=ON \
  ${TPX_CMAKE_ARGS:-}
"$cmake" --build "$build" -j "$jobs"
built=$SECONDS
"$ctest" --test-dir "$build" --output-on-failure
echo "cmake_test.sh: passed (configure+build $((built - start)) s, tests $((SECONDS - built)) s, TPX_WITH_CUDA=$cuda)"
