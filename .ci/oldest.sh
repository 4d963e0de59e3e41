#!/usr/bin/env bash
# The engine and face-analysis tests in a second environment with the oldest transformers,
# diffusers and peft that pyproject.toml allows (the same CPU torch 2.13.0: any other torch
# wheel is a CUDA build of several GB). Kept short: the parity tests and the tiny face
# tests, not the full-size stand-ins or the real photos (no model library in them differs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-oldest
PINS=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for name in ("transformers", "diffusers", "peft"):
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    print(f"{name}=={re.search(r'>=([0-9.]+)', spec).group(1)}")
PY
)
echo "oldest allowed: $(echo $PINS)"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]" $PINS
"$VENV/bin/python" -c "import transformers, diffusers, peft; print('running on transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_generation.py tests/test_face_analysis.py \
  tests/test_face_analysis_torch.py -k "not full_size and not real_photos and not lowest_threshold"
