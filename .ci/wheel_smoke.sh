#!/usr/bin/env bash
# Smoke test of an installed wheel, as a user who ran `pip install hybridnorm_zoo-*.whl` would
# use it: run from an empty folder outside the source tree, with a fresh HF cache.
# Usage: .ci/wheel_smoke.sh PYTHON   (the python of the venv the wheel is installed in)
set -euo pipefail
python=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export HF_HOME="$work/hf-home"
unset ZOO_ENDPOINT HF_HUB_CACHE HUGGINGFACE_HUB_CACHE
bin=$(dirname "$python")

echo "== wheel smoke in $work"
"$bin/zoo" list
"$bin/zoo" info olmoe-1b-7b-hybridnorm-star
"$bin/zoo" check attention:mla router:hash --check options --check save_load   # the kit, a fresh process included
snapshot=$("$bin/zoo" pull tiny-dense-hybridnorm | tail -1)
echo "pulled into $snapshot"
case "$snapshot" in "$HF_HOME"/*) ;; *) echo "smoke: the pull did not land in the fresh HF_HOME" >&2; exit 1 ;; esac
test -s "$snapshot/model.safetensors"

"$python" - "$snapshot" <<'PY'
import pathlib, sys

import torch
from safetensors.torch import load_file

import zoo

installed = pathlib.Path(zoo.__file__).resolve()
assert "site-packages" in installed.parts, f"zoo imported from {installed}, not from the installed wheel"

moe = zoo.build("tiny-moe-hybridnorm")
idx = torch.randint(0, 256, (2, 32))
out = moe(idx, targets=idx.roll(-1, 1))
(out.loss + out.aux_loss).backward()
missing = [n for n, p in moe.named_parameters() if p.grad is None]
assert torch.isfinite(out.loss) and not missing, (out.loss, missing)

model = zoo.build("tiny-dense-hybridnorm", pretrained=True)
published = load_file(pathlib.Path(sys.argv[1]) / "model.safetensors")
state = model.state_dict()
assert published and all(torch.equal(state[k], v) for k, v in published.items()), "pretrained weights differ from the pulled file"
print(f"smoke ok: zoo {installed.parent}; tiny-moe loss {out.loss.item():.3f}; "
      f"pretrained tiny-dense-hybridnorm holds the pulled {len(published)} tensors")
PY
