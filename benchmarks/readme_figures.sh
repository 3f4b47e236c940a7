#!/usr/bin/env bash
# Rerun every benchmark behind README's "Current figures" and write the JSON it quotes to
# docs/results/ (plots README shows go to docs/). tests/test_benchmarks.py checks that README's
# figures equal these files, so after running this, update README from them in the same commit.
# About 15 minutes on a 2-core CPU. Usage: bash benchmarks/readme_figures.sh [STEP ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
R=docs/results
mkdir -p "$R"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(overhead cfg pp throughput adapter flux-sd3 client video http slo)
for step in "${steps[@]}"; do
    echo "== $step ($(date -u +%H:%M:%S))"
    case "$step" in
        overhead) python benchmarks/overhead.py --json "$R/overhead.json" ;;
        cfg) python benchmarks/cfg_parallel.py --json "$R/cfg_parallel.json" --plot "" ;;
        pp) python benchmarks/pipeline_parallel.py --json "$R/pipeline_parallel.json" --plot "" ;;
        throughput)
            python benchmarks/throughput.py --json "$R/throughput_open.json" --plot docs/throughput.png
            python benchmarks/throughput.py --rate 1000 --max-num-seqs 1 4 8 16 \
                --json "$R/throughput_saturated.json" --plot docs/throughput_saturated.png ;;
        adapter)
            python benchmarks/throughput.py --adapter --json "$R/adapter_throughput_open.json" \
                --plot docs/adapter_throughput.png
            python benchmarks/throughput.py --adapter --rate 1000 --json "$R/adapter_throughput_saturated.json" \
                --plot docs/adapter_throughput_saturated.png ;;
        flux-sd3)
            for model in tiny-flux tiny-sd3 tiny-flux-img2img; do
                python benchmarks/throughput.py --model "$model" --json "$R/throughput_$model.json" \
                    --plot "docs/throughput_$model.png"
            done ;;
        client) python benchmarks/client_overhead.py --json "$R/client_overhead.json" --plot docs/client_overhead.png ;;
        video) python benchmarks/video_throughput.py --json "$R/video_throughput.json" --plot docs/video_throughput.png ;;
        http) python benchmarks/http_overhead.py --json "$R/http_overhead.json" --plot docs/http_overhead.png ;;
        slo)  # the simulator at scale (deterministic), then the real engine against the simulator
            python benchmarks/slo.py --sim benchmarks/profiles/flux-dev-h100.json --json "$R/slo_flux-dev-h100.json" \
                --plot docs/slo_flux-dev-h100.png
            python benchmarks/slo.py --sim benchmarks/profiles/small-qwen-image-cpu.json \
                --json "$R/slo_small-qwen-image.json" --plot docs/slo_small-qwen-image.png
            python benchmarks/slo.py --real --real-loads 1.0 1.5 --json "$R/slo_real.json" --plot docs/slo_real.png ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
