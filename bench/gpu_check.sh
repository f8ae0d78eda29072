#!/usr/bin/env bash
# GPU check of the rollout engines (trustrl's sampler and vLLM): a few GRPO steps on a
# Qwen2.5-0.5B-shaped random model in bf16; prints generated tokens/s, step time, peak GPU
# memory, MFU and the behaviour/trainer log-prob gap. Needs a CUDA GPU; vLLM is installed
# here when missing (pip install 'trustrl[vllm]'). Not run yet: no GPU has been lent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if ! "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[vllm]" || echo "gpu_check: vLLM could not be installed; only trustrl's sampler runs"
fi
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" bench/gpu_check_vllm.py "$@"
