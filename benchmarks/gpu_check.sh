#!/usr/bin/env bash
# Everything in stepweave that needs a GPU, in one run (about 6 minutes on one H100, the preset
# build included), so that a short lease of a GPU machine is enough:
#   1. install the wheels carried in .whl/ (a GPU machine here has torch, transformers and
#      accelerate, but no network and no diffusers, msgspec, pyzmq or pytest-asyncio; fetch them
#      beforehand with `bash benchmarks/fetch_gpu_wheels.sh`);
#   2. run the CUDA-marked tests (diffusers equivalence on CUDA in fp32, bf16 and torch.compile,
#      worker processes with abort; multi-GPU tests skip on one GPU);
#   3. run the throughput benchmark on the GPU-scale preset (gpu-qwen-image, bf16) at 512x512 and
#      1024x1024, open loop and saturated: diffusers sequential and static against stepweave-8
#      and -16, with the batch-compute limit measured in the same run;
#   4. write one log, the JSON of every run and the saturated runs' plots to $OUT (default
#      benchmarks/results/gpu_check): 7 files, within what a device call brings back (8).
# Without a GPU, `--cpu-smoke` runs the same steps on the CPU with the tiny preset and a tiny
# workload (a CI test does), so the script does not rot between GPU leases.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then mode=cpu; fi
out="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
python=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stepweave-site .whl/*.whl
  export PYTHONPATH="/tmp/stepweave-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export STEPWEAVE_CACHE_DIR="${STEPWEAVE_CACHE_DIR:-/tmp/stepweave-presets}"
export PYTHONUNBUFFERED=1

if [ "$mode" = gpu ]; then
  "$python" -c "import torch, sys; torch.cuda.is_available() or sys.exit('no CUDA device: use --cpu-smoke')"
  "$python" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  model=gpu-qwen-image; device=cuda; dtype=bfloat16; sizes="512 1024"
  workload=(--num-requests 16 --steps 10 20 --max-num-seqs 8 16 --threads 4)
else
  "$python" -c "import torch; print('device: cpu (smoke) | torch', torch.__version__)"
  model=tiny-qwen-image; device=cpu; dtype=float32; sizes="32"
  workload=(--num-requests 3 --steps 2 3 --max-num-seqs 2 --executor inproc)
fi

"$python" -c "import transformers, diffusers; print('transformers', transformers.__version__, '| diffusers', diffusers.__version__)"

# A failing step is reported and the run goes on, so one short lease still yields every figure.
failed=()
echo "== CUDA tests"
"$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py || failed+=("CUDA tests")

for side in $sizes; do
  for load in open saturated; do
    rate=(--rate 1000); plot=(--plot "$out/throughput_${side}_${load}.png")
    if [ "$load" = open ]; then
      plot=(--plot "")
      rate=(); [ "$mode" = cpu ] && rate=(--rate 50)
    fi
    echo "== throughput: $model ${side}x${side} $dtype on $device, $load"
    "$python" benchmarks/throughput.py --model "$model" --device "$device" --dtype "$dtype" \
      --height "$side" --width "$side" "${workload[@]}" "${rate[@]}" \
      --json "$out/throughput_${side}_${load}.json" "${plot[@]}" 2>&1 | grep -v -e "Loading" -e "Writing model" \
      || failed+=("throughput ${side} ${load}")
  done
done
echo "== wrote $(ls "$out" | wc -l) files to $out"
if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
