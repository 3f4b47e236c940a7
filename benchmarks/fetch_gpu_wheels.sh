#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels a GPU machine without network lacks for
# benchmarks/gpu_check.sh, into .whl/ (ignored by git; carry it to that machine). The versions are
# the ones this checkout runs with; the GPU machine's Python is 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in diffusers msgspec pyzmq pytest-asyncio importlib-metadata; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$name==$(version "$name")"
done
ls -la .whl
