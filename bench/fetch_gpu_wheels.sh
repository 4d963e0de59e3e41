#!/usr/bin/env bash
# Download, here, exactly the wheels bench/gpu_run.py installs on a bare GPU image
# (Python 3.12, x86_64, a CUDA torch and transformers 5.17 preinstalled; no diffusers,
# insightface, pydantic, pyarrow, OpenCV or onnxruntime) into .whl/, and check that they
# stay within 40 MB with the project (the device machine takes 64 MiB of files).
# insightface is pure Python and installed without its dependencies: the torch face
# analyzer only reads its mean-shape data file.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
WHEELS=(
  # the versions the test suite runs with (huggingface_hub: the newest transformers 5.17 takes)
  diffusers==0.42.1 peft==0.21.2 accelerate==1.16.0 psutil==7.2.2
  onnx==1.23.2 protobuf==7.36.2 ml_dtypes==0.7.0 insightface==2.1 pillow==13.0.0
  huggingface_hub==1.33.0 requests==2.34.2 urllib3==2.8.0 idna==3.21
  certifi==2026.10.19.post1 charset_normalizer==3.5.3 importlib_metadata==10.2.0 zipp==4.1.2
)
python3 -m pip download --no-deps --only-binary :all: --disable-pip-version-check -q \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
project=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + project))
echo "wheels $((wheels / 1000000)) MB + project $((project / 1000000)) MB = $((total / 1000000)) MB"
if [ "$total" -gt 40000000 ]; then
  echo "over the 40 MB budget" >&2
  exit 1
fi
