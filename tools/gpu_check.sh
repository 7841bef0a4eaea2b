#!/usr/bin/env bash
# The one-command check for a lent GPU, and (--cpu) for this CPU machine in CI.
#
#   tools/gpu_check.sh [--cpu] [--quality-minutes N] [--work DIR] [--zoo-cache DIR] [--skip a,b]
#
# Installs nothing. It needs this checkout installed (pip install -e '.[test]') and, on a GPU, a CUDA
# build of torch; the quality slice also needs the real extra (pip install -e '.[real]') and is
# skipped without it. Prints one summary table at the end; exits non-zero if any section failed.
# The sections are described in tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch, deepspeed, transformers" >/dev/null 2>&1; then
    echo "gpu_check: torch, deepspeed and transformers must be importable by $PYTHON: pip install -e '.[test]'" >&2
    exit 1
fi
case " $* " in
    *" --cpu "*) ;;
    *)
        if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
            version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null)
            echo "gpu_check: torch $version sees no CUDA device. On a GPU machine install a CUDA build first, e.g." >&2
            echo "    pip install torch --index-url https://download.pytorch.org/whl/cu124" >&2
            echo "(the CUDA version must match the driver: nvidia-smi shows it), or run tools/gpu_check.sh --cpu" >&2
            exit 1
        fi
        ;;
esac
exec "$PYTHON" tools/gpu_check.py "$@"
