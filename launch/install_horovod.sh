#!/usr/bin/env bash
# install_horovod.sh -- build and install Horovod 0.28.1 (PyTorch + Gloo, CPU,
# no MPI / TensorFlow / MXNet) against the torch that is already installed.
#
# Why this script exists
#   * Horovod's last release (0.28.1) ships no wheel for Python 3.11, so pip
#     builds it from the sdist.
#   * As shipped, its CMake files ask for C++14 (top-level CMakeLists.txt and
#     horovod/torch/CMakeLists.txt), but the headers of torch >= 2.1 need
#     C++17, so the build fails. We patch both to C++17 with sed and verify
#     that the patch took (the script aborts loudly if it did not).
#   * The build must use the *installed* torch (torch==2.13.0+cpu here), so it
#     runs with `--no-build-isolation`; pip must never be allowed to pull in
#     another torch (a CUDA build is several GB). Everything horovod-related
#     is therefore installed with --no-deps, runtime deps are installed
#     explicitly.
#
# What it does
#   1. Exit at once if `import horovod.torch` already works with the
#      installed torch and Horovod was built with Gloo (idempotent).
#   2. If a cached wheel built for this exact (horovod, python, torch) exists,
#      install it and verify (a reinstall takes seconds).
#   3. Otherwise: check/install build tools (g++, make, cmake >= 3.13),
#      `pip download --no-deps --no-binary :all: horovod==0.28.1` into a temp
#      dir, unpack, patch C++14 -> C++17, `pip wheel --no-build-isolation`
#      with HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
#      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 and MAKEFLAGS=-jN,
#      copy the wheel to the cache, install it with --no-deps.
#   4. Smoke test: `horovodrun -np 2 -H localhost:2 --gloo python -c ...`
#      doing an allreduce; fails the script if the result is wrong.
#
# Wheel cache
#   $THREELC_HOROVOD_CACHE (default ~/.cache/threelc-horovod)/
#       py<XY>-torch<version>/horovod-0.28.1-*.whl
#   The key includes the torch version because the extension links against
#   libtorch and is ABI-bound to it. Delete the directory (or set
#   THREELC_HOROVOD_NO_CACHE=1) to force a build from source.
#
# Environment knobs
#   PYTHON                     interpreter to use (default: python)
#   THREELC_HOROVOD_CACHE      wheel cache dir (default ~/.cache/threelc-horovod)
#   THREELC_HOROVOD_NO_CACHE=1 neither read nor write the wheel cache
#   THREELC_HOROVOD_FORCE=1    rebuild/reinstall even if horovod imports
#   THREELC_HOROVOD_JOBS       parallel compile jobs (default: nproc)
#   THREELC_HOROVOD_SKIP_SMOKE=1  skip the final horovodrun check
#
# Timing (2 cores, Debian 12, Python 3.11.7, torch 2.13.0+cpu, gcc 12.2, cmake 3.25.1):
#   build from sdist: 194 s on a quiet machine, 393 s with other jobs competing
#   for the cores (budget ~7 min); whole script incl. smoke test +15-25 s.
#   Install from the cached wheel + smoke test: ~25 s. Already installed: ~5 s.
#
# Requirements: Debian/Ubuntu (apt-get is used only if g++/make/cmake are
# missing and we are root), network access to PyPI.

set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python}
CACHE_ROOT=${THREELC_HOROVOD_CACHE:-$HOME/.cache/threelc-horovod}
NO_CACHE=${THREELC_HOROVOD_NO_CACHE:-0}
FORCE=${THREELC_HOROVOD_FORCE:-0}
JOBS=${THREELC_HOROVOD_JOBS:-$(nproc 2>/dev/null || echo 2)}
SKIP_SMOKE=${THREELC_HOROVOD_SKIP_SMOKE:-0}

SCRIPT_START=$(date +%s)
log()  { printf '[install_horovod %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - SCRIPT_START ))" "$*" >&2; }
die()  { printf '[install_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

PIP=("$PYTHON" -m pip --disable-pip-version-check)

# ---------------------------------------------------------------- sanity ---
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found"
TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
    || die "torch is not importable with $PYTHON; install the pinned torch first (this script never installs torch)"
PY_TAG=$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
log "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ($(command -v "$PYTHON")), torch: $TORCH_VERSION"

CACHE_DIR="$CACHE_ROOT/${PY_TAG}-torch${TORCH_VERSION}"

# Checks that horovod.torch imports with the installed torch, that its
# version is the one we build and that Gloo is compiled in.
horovod_ok() {
    "$PYTHON" - "$HOROVOD_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import torch  # noqa: F401  (must import first, horovod links libtorch)
import horovod
import horovod.torch as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built(), "horovod built without gloo"
EOF
}

smoke_test() {
    if [[ "$SKIP_SMOKE" == 1 ]]; then
        log "skipping horovodrun smoke test (THREELC_HOROVOD_SKIP_SMOKE=1)"
        return 0
    fi
    # horovodrun of *this* interpreter's environment (pip puts it next to python).
    local hvdrun
    hvdrun=$("$PYTHON" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "horovodrun"))')
    [[ -x "$hvdrun" ]] || hvdrun=$(command -v horovodrun) || die "horovodrun not found after install"
    log "smoke test: $hvdrun -np 2 -H localhost:2 --gloo (allreduce Sum)"
    local out
    # -H localhost:2 avoids horovodrun probing hosts; --gloo because there is no MPI.
    if ! out=$(timeout 180 "$hvdrun" -np 2 -H localhost:2 --gloo "$PYTHON" -c '
import torch, horovod.torch as hvd
hvd.init()
r = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
assert hvd.size() == 2 and r.item() == 3.0, (hvd.size(), r)
print("HVD_SMOKE_OK rank=%d size=%d sum=%s" % (hvd.rank(), hvd.size(), r.item()))
' 2>&1); then
        printf '%s\n' "$out" >&2
        die "horovodrun smoke test failed"
    fi
    printf '%s\n' "$out" | grep 'HVD_SMOKE_OK' >&2 || true
    local n
    n=$(printf '%s\n' "$out" | grep -c 'HVD_SMOKE_OK' || true)
    [[ "$n" == 2 ]] || { printf '%s\n' "$out" >&2; die "smoke test: expected 2 OK lines, got $n"; }
    log "smoke test passed"
}

install_runtime_deps() {
    # Horovod runtime deps (setup.py require_list); never let pip touch torch.
    local missing=()
    "$PYTHON" -c 'import cloudpickle' 2>/dev/null || missing+=(cloudpickle)
    "$PYTHON" -c 'import psutil'      2>/dev/null || missing+=(psutil)
    "$PYTHON" -c 'import yaml'        2>/dev/null || missing+=(pyyaml)
    "$PYTHON" -c 'import packaging'   2>/dev/null || missing+=(packaging)
    if (( ${#missing[@]} )); then
        log "installing horovod runtime deps: ${missing[*]}"
        "${PIP[@]}" install "${missing[@]}"
    fi
}

finish() {
    horovod_ok || die "horovod installed but 'import horovod.torch' (with gloo) fails; run: $PYTHON -c 'import horovod.torch'"
    log "horovod $("$PYTHON" -c 'import horovod; print(horovod.__version__)') imports with torch $TORCH_VERSION"
    smoke_test
    log "done in $(( $(date +%s) - SCRIPT_START ))s"
}

# ---------------------------------------------------------- 1. idempotent ---
if [[ "$FORCE" != 1 ]] && horovod_ok; then
    log "horovod $HOROVOD_VERSION already importable with torch $TORCH_VERSION (gloo built); nothing to do"
    exit 0
fi

# --------------------------------------------------------- 2. cached wheel ---
if [[ "$NO_CACHE" != 1 ]]; then
    shopt -s nullglob
    cached=("$CACHE_DIR"/horovod-"$HOROVOD_VERSION"-*.whl)
    shopt -u nullglob
    if (( ${#cached[@]} )); then
        log "installing cached wheel ${cached[0]}"
        install_runtime_deps
        "${PIP[@]}" install --no-deps --force-reinstall "${cached[0]}"
        if horovod_ok; then
            finish
            exit 0
        fi
        log "cached wheel does not import; removing it and building from source"
        rm -f "${cached[0]}"
    fi
fi

# ------------------------------------------------------------ 3. build deps ---
SUDO=()
if [[ $(id -u) != 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "missing build tools ($*) and apt-get is not available; install them manually"
    if [[ $(id -u) != 0 && ${#SUDO[@]} == 0 ]]; then
        die "missing build tools ($*); not root and no sudo; install them manually"
    fi
    log "apt-get install $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

need_apt=()
command -v g++  >/dev/null 2>&1 || need_apt+=(g++)
command -v gcc  >/dev/null 2>&1 || need_apt+=(gcc)
command -v make >/dev/null 2>&1 || need_apt+=(make)
if (( ${#need_apt[@]} )); then apt_install "${need_apt[@]}"; fi

cmake_ok() {
    command -v cmake >/dev/null 2>&1 || return 1
    local v
    v=$(cmake --version | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p' | head -1)
    # Horovod needs >= 3.13. Bundled gloo/flatbuffers declare
    # cmake_minimum_required < 3.5, which CMake 4 rejects (see
    # CMAKE_POLICY_VERSION_MINIMUM below), so 3.x is preferred.
    "$PYTHON" - "$v" <<'EOF'
import sys
from packaging.version import Version
sys.exit(0 if Version(sys.argv[1]) >= Version("3.13") else 1)
EOF
}
if ! "$PYTHON" -c 'import packaging' 2>/dev/null; then "${PIP[@]}" install packaging; fi
if ! cmake_ok; then
    if command -v apt-get >/dev/null 2>&1 && { [[ $(id -u) == 0 ]] || (( ${#SUDO[@]} )); }; then
        apt_install cmake
    fi
    if ! cmake_ok; then
        log "no usable system cmake; installing pip 'cmake>=3.13,<4'"
        "${PIP[@]}" install 'cmake>=3.13,<4'
        hash -r
        cmake_ok || die "cmake >= 3.13 still not available"
    fi
fi
log "cmake: $(command -v cmake) ($(cmake --version | head -1)), g++: $(g++ -dumpfullversion)"
# CMake 4.x refuses cmake_minimum_required(VERSION <3.5) in the bundled
# third_party projects unless this is set; ignored by CMake 3.x.
export CMAKE_POLICY_VERSION_MINIMUM=3.5

# --no-build-isolation means the build backend comes from this environment.
build_missing=()
"$PYTHON" -c 'import setuptools' 2>/dev/null || build_missing+=(setuptools)
"$PYTHON" -c 'import wheel'      2>/dev/null || build_missing+=(wheel)
if (( ${#build_missing[@]} )); then
    log "installing python build deps: ${build_missing[*]}"
    "${PIP[@]}" install "${build_missing[@]}"
fi
install_runtime_deps

# ---------------------------------------------------- 4. download + patch ---
WORK=$(mktemp -d "${TMPDIR:-/tmp}/threelc-horovod.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

log "downloading horovod==$HOROVOD_VERSION sdist into $WORK"
"${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK/sdist" >&2
SDIST=$(ls "$WORK"/sdist/horovod-"$HOROVOD_VERSION".tar.gz 2>/dev/null) || die "sdist not found after pip download"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"
[[ -f "$SRC/setup.py" ]] || die "unexpected sdist layout: $SRC/setup.py missing"

log "patching CMAKE_CXX_STANDARD 14 -> 17 (torch >= 2.1 headers need C++17)"
for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    [[ -f "$f" ]] || die "patch target missing: $f"
    # Anchored at line start so that e.g. the string(PREPEND ... "set(CMAKE_CXX_STANDARD 17)")
    # for TF's gloo copy in the top-level file does not count as "patched".
    sed -i -E 's/^([[:space:]]*set\(CMAKE_CXX_STANDARD[[:space:]]+)(11|14)([[:space:]]*\))/\117\3/' "$f"
    if grep -Eq '^[[:space:]]*set\(CMAKE_CXX_STANDARD[[:space:]]+(11|14)[[:space:]]*\)' "$f"; then
        die "C++ standard patch did not apply in $f (still C++11/14)"
    fi
    grep -Eq '^[[:space:]]*set\(CMAKE_CXX_STANDARD[[:space:]]+17[[:space:]]*\)' "$f" \
        || die "C++ standard patch did not apply in $f (no 'set(CMAKE_CXX_STANDARD 17)' line); sdist layout changed?"
    log "  patched ${f#"$SRC"/}: $(grep -En '^[[:space:]]*set\(CMAKE_CXX_STANDARD[[:space:]]+17' "$f" | sed 's/[[:space:]]\+/ /g' | tr '\n' ' ')"
done

# ---------------------------------------------------------------- 5. build ---
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
# Horovod's setup.py uses -j8 unless MAKEFLAGS is set.
export MAKEFLAGS="-j${JOBS}"
unset HOROVOD_GPU HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_WITH_MPI || true

log "building wheel (MAKEFLAGS=$MAKEFLAGS; 3-7 min on 2 cores) ..."
BUILD_START=$(date +%s)
BUILD_LOG="$WORK/build.log"
if ! "${PIP[@]}" wheel --no-build-isolation --no-deps -v -w "$WORK/wheelhouse" "$SRC" >"$BUILD_LOG" 2>&1; then
    tail -n 80 "$BUILD_LOG" >&2
    cp "$BUILD_LOG" "${TMPDIR:-/tmp}/threelc-horovod-build.log" 2>/dev/null || true
    die "horovod build failed (last 80 lines above; full log copied to ${TMPDIR:-/tmp}/threelc-horovod-build.log)"
fi
BUILD_SECS=$(( $(date +%s) - BUILD_START ))
WHEEL=$(ls "$WORK"/wheelhouse/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -1)
[[ -n "$WHEEL" ]] || die "build succeeded but no wheel in $WORK/wheelhouse"
log "built $(basename "$WHEEL") in ${BUILD_SECS}s"

if [[ "$NO_CACHE" != 1 ]]; then
    mkdir -p "$CACHE_DIR"
    cp "$WHEEL" "$CACHE_DIR/"
    cp "$BUILD_LOG" "$CACHE_DIR/build.log"
    log "cached wheel (and build.log) in $CACHE_DIR"
fi

log "installing $(basename "$WHEEL") (--no-deps: torch is left untouched)"
"${PIP[@]}" install --no-deps --force-reinstall "$WHEEL"

finish
