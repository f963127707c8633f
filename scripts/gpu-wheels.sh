#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels a GPU machine without a package registry lacks, at the versions of
# qlora_rft/constraints.txt, so that they travel with the working tree. Run on a machine with a registry.
# Usage: bash scripts/gpu-wheels.sh [PACKAGE ...]   (default: what a machine with torch, torchvision, numpy,
#        pillow and an older transformers lacks); PYTHON_VERSION=3.12 (the GPU machine's) by default.
# On the GPU machine:
#   rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
packages=("$@")
if [ ${#packages[@]} -eq 0 ]; then
  packages=(bitsandbytes trl datasets dill multiprocess qwen-vl-utils pycocotools transformers peft accelerate
            huggingface-hub httpx2 httpcore2 click truststore regex tokenizers safetensors)
  # Not `kernels`: the project never loads hub kernels unless model.hub_kernels=true.
fi
pins=()
for p in "${packages[@]}"; do
  pins+=("$(python3 - "$p" <<'PY'
import re, sys
name = re.sub(r"[-_.]+", "-", sys.argv[1]).lower()
for line in open("qlora_rft/constraints.txt", encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if "==" in line and re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() == name:
        print(line)
        break
else:
    sys.exit(f"{sys.argv[1]} is not in qlora_rft/constraints.txt")
PY
)")
done
rm -rf .whl && mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pin in "${pins[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${plat[@]}" -d .whl "$pin"
done
# A CUDA 13 machine needs only bitsandbytes' CUDA 13 libraries (43 MB -> 7 MB): the tree travels in 64 MiB.
for w in .whl/bitsandbytes-*.whl; do
  [ -e "$w" ] || continue
  python3 - "$w" <<'PY'
import re, shutil, sys, zipfile
src = sys.argv[1]; tmp = src + ".tmp"
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+)\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not drop.search(item.filename):
            zout.writestr(item, zin.read(item.filename))
shutil.move(tmp, src)
PY
done
printf '%s\n' "${pins[@]}" > .whl/PINS
du -ch .whl/*.whl | tail -1
