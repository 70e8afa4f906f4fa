#!/usr/bin/env bash
# The checks that need a GPU, for a machine with one NVIDIA GPU and the project installed
# (bash scripts/install.sh). One line per check: PASS or FAIL, seconds per step, peak GPU memory.
# Uses the embedded SmolLM2-135M model (no download). It cannot run on CPU-only machines.
# Checks: built-in engine on cuda; built-in engine + vLLM sampler; TRL engine + vLLM colocate;
# TRL engine in 2 processes (2 GPUs); Qwen2.5-VL-3B on the built-in and the TRL engine (weights needed locally). Estimated 1-2 minutes each on one recent GPU (never run: written
# on machines without a GPU).
#
#   bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0

if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "FAIL setup: torch sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))"
  exit 1
fi

# report NAME RUN_DIR STATUS: one PASS/FAIL line from a run directory's metrics.jsonl
report() {
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import json, sys
name, run, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
except OSError:
    steps = []
ok = status == 0 and len(steps) == 2 and all(s.get("memory/peak_gpu_gb", 0) > 0 for s in steps)
sec = sum(s.get("time/step_s", 0) for s in steps) / max(len(steps), 1)
mem = max((s.get("memory/peak_gpu_gb", 0) for s in steps), default=0)
print(f"{'PASS' if ok else 'FAIL'} {name}: exit {status}, {len(steps)} steps, {sec:.1f} s/step, peak {mem:.2f} GiB")
sys.exit(0 if ok else 1)
PYEOF
}

# 1. the built-in engine on cuda, 2 steps of SPINE (LoRA, KL on: reference pass included)
timeout 480 "$PY" -m spine_ttrl adapt --device cuda --preset spine --data arith:2:8:0 --steps 2 \
  --questions-per-step 4 --num-votes 8 --max-new-tokens 128 --lora-r 16 --kl-coef 0.05 --lr 1e-4 \
  --eval-samples 0 --eval-limit 4 --no-progress --out "$tmp/builtin" > "$tmp/builtin.log" 2>&1
report builtin-cuda "$tmp/builtin" $? || { fail=1; tail -5 "$tmp/builtin.log"; }

# 2. the built-in engine with vLLM generating the votes (needs: pip install -e '.[vllm]')
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout 480 "$PY" -m spine_ttrl adapt --device cuda --sampler vllm --vllm-gpu-memory-utilization 0.3 \
    --preset spine --data arith:2:8:0 --steps 2 --questions-per-step 4 --num-votes 8 --max-new-tokens 128 \
    --lora-r 16 --lr 1e-4 --eval-samples 0 --eval-limit 4 --no-progress --out "$tmp/vllm" > "$tmp/vllm.log" 2>&1
  report builtin-vllm-sampler "$tmp/vllm" $? || { fail=1; tail -5 "$tmp/vllm.log"; }
else
  echo "FAIL builtin-vllm-sampler: vllm is not installed (pip install -e '.[vllm]')"; fail=1
fi

# 3. the TRL engine with vLLM colocated (needs: pip install -e '.[trl,vllm]')
if "$PY" -c "import trl, vllm" 2>/dev/null; then
  timeout 480 "$PY" -m spine_ttrl adapt --engine trl --device cuda --sampler vllm --vllm-gpu-memory-utilization 0.3 \
    --preset spine --data arith:2:8:0 --steps 2 --questions-per-step 4 --num-votes 8 --max-new-tokens 128 \
    --lora-r 16 --lr 1e-4 --eval-samples 0 --eval-limit 4 --no-progress --out "$tmp/trl" > "$tmp/trl.log" 2>&1
  report trl-vllm-colocate "$tmp/trl" $? || { fail=1; tail -5 "$tmp/trl.log"; }
else
  echo "FAIL trl-vllm-colocate: trl or vllm is not installed (pip install -e '.[trl,vllm]')"; fail=1
fi

# 4. the TRL engine in 2 processes (torchrun). accelerate gives process i the GPU cuda:i and NCCL refuses
#    two processes on one GPU, so this needs 2 GPUs; with one it says SKIP (not a failure).
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ] && "$PY" -c "import trl" 2>/dev/null; then
  timeout 480 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m spine_ttrl adapt --engine trl \
    --device cuda --preset spine --data arith:2:8:0 --steps 2 --questions-per-step 4 --num-votes 8 \
    --max-new-tokens 128 --lora-r 16 --lr 1e-4 --eval-samples 0 --eval-limit 4 --no-progress \
    --out "$tmp/trl2" > "$tmp/trl2.log" 2>&1
  report trl-2-processes "$tmp/trl2" $? || { fail=1; tail -5 "$tmp/trl2.log"; }
else
  echo "SKIP trl-2-processes: needs 2 GPUs and trl (this machine: $ngpu GPU(s))"
fi

# 5. a vision-language model on the built-in engine: Qwen2.5-VL-3B-Instruct (LoRA, frozen vision tower) on the
#    built-in shapes: task. Needs the weights locally: $QWEN_VL (a directory), else the Hugging Face cache.
QWEN_VL=${QWEN_VL:-Qwen/Qwen2.5-VL-3B-Instruct}
if [ -d "$QWEN_VL" ] || HF_HUB_OFFLINE=1 "$PY" -c "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])" "$QWEN_VL" 2>/dev/null; then
  HF_HUB_OFFLINE=1 timeout 900 "$PY" -m spine_ttrl adapt --device cuda --model "$QWEN_VL" --data shapes:8 --preset spine \
    --steps 2 --questions-per-step 4 --num-votes 8 --max-new-tokens 128 --lora-r 16 --lr 1e-4 \
    --eval-samples 0 --eval-limit 4 --no-progress --out "$tmp/vlm" > "$tmp/vlm.log" 2>&1
  report qwen2.5-vl-builtin "$tmp/vlm" $? || { fail=1; tail -5 "$tmp/vlm.log"; }
  # 6. the same model through the TRL engine (one process)
  if "$PY" -c "import trl" 2>/dev/null; then
    HF_HUB_OFFLINE=1 timeout 900 "$PY" -m spine_ttrl adapt --engine trl --device cuda --model "$QWEN_VL" --data shapes:8 \
      --preset spine --steps 2 --questions-per-step 4 --num-votes 8 --num-train-samples 8 --micro-batch-size 8 \
      --max-new-tokens 128 --lora-r 16 --lr 1e-4 --eval-samples 0 --eval-limit 4 --no-progress \
      --out "$tmp/vlm-trl" > "$tmp/vlm-trl.log" 2>&1
    report qwen2.5-vl-trl "$tmp/vlm-trl" $? || { fail=1; tail -5 "$tmp/vlm-trl.log"; }
  else
    echo "FAIL qwen2.5-vl-trl: trl is not installed (pip install -e '.[trl]')"; fail=1
  fi
else
  echo "SKIP qwen2.5-vl-builtin: weights of $QWEN_VL not found locally (set QWEN_VL=/path/to/Qwen2.5-VL-3B-Instruct)"
  echo "SKIP qwen2.5-vl-trl: weights of $QWEN_VL not found locally"
fi

exit $fail
