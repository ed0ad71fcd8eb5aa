#!/usr/bin/env bash
# Every accelerator measurement in one go (about 25 minutes on one H100/H200, the run
# groups' compilations a good part of it).
#
#   bash benchmarks/accelerator.sh            # writes to $OUT (default ./accel_out)
#   bash benchmarks/accelerator.sh --check    # only checks the Python packages
#   bash benchmarks/accelerator.sh --smoke    # every step at a tiny size on the CPU
#   bash benchmarks/accelerator.sh --vendor DIR
#       copies the pure-Python packages the benchmarks need (ml_collections,
#       tqdm) from this interpreter into DIR, for a machine that lacks them;
#       run there with EXTRA_PYTHONPATH=DIR.
#
# Runs from the repository root without installing it (PYTHONPATH=.). Needs
# JAX, Flax, Optax, NumPy, SciPy, tqdm and etils (Flax's own dependency);
# compare.py also PyTorch (with torchvision if present); trainer_overhead.py
# also ml_collections and Orbax; group_step.py (a run group's step against
# its runs one after another) also ml_collections. Imports no TensorFlow. A step whose packages are missing is skipped
# and named; a step that fails does not stop the others. Each step writes
# NAME.txt (its output) and NAME.json (its figures) under $OUT, and
# summary.json lists them all.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-python}

if [ "${1:-}" = "--vendor" ]; then
  dest=${2:?usage: accelerator.sh --vendor DIR}
  mkdir -p "$dest"
  exec "$PY" - "$dest" <<'EOF'
import importlib.util, pathlib, shutil, sys
dest = pathlib.Path(sys.argv[1])
for name in ("ml_collections", "tqdm"):
  src = pathlib.Path(importlib.util.find_spec(name).submodule_search_locations[0])
  shutil.copytree(src, dest / name, dirs_exist_ok=True,
                  ignore=shutil.ignore_patterns("__pycache__"))
  print(f"copied {name} from {src}")
EOF
fi

OUT=${OUT:-./accel_out}
mkdir -p "$OUT"

# Which steps can run: the missing packages of each, or nothing.
missing() {
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
def absent(name):
  try:
    return importlib.util.find_spec(name) is None
  except ModuleNotFoundError:  # Its parent package is missing.
    return True
print(" ".join(m for m in sys.argv[1:] if absent(m)))
EOF
}
CORE="numpy jax flax optax scipy tqdm etils"
core_missing=$(missing $CORE)
torch_missing=$(missing torch)
trainer_missing=$(missing ml_collections orbax.checkpoint)
group_missing=$(missing ml_collections)
echo "missing for every step: ${core_missing:-none}"
tv=$([ -z "$(missing torchvision)" ] && echo present || echo "absent: ResNet18 built by hand")
echo "missing for compare.py: ${torch_missing:-none} (torchvision: $tv)"
echo "missing for trainer_overhead.py: ${trainer_missing:-none}"
echo "missing for group_step.py: ${group_missing:-none}"
if [ -n "$core_missing" ]; then
  echo "ERROR: missing Python packages: $core_missing (pure-Python ones can be copied" \
       "with 'accelerator.sh --vendor DIR' elsewhere and EXTRA_PYTHONPATH=DIR here)" >&2
  exit 2
fi
[ "${1:-}" = "--check" ] && exit 0

# The real sizes, or tiny ones that check the wiring on a CPU in a few minutes.
PATCH=512 DTYPE=bfloat16 DEVICE=cuda BATCHES="12 64" WARMUP=5 STEPS=30 ROI=""
TRAINER="--patch 512 --batch 12 --epochs 4" DETECT="--batch 64" T=1
GROUP="--batch 12 --groups 1,2,5,8,15 --unmapped 2,5 --host-steps 20"
if [ "${1:-}" = "--smoke" ]; then
  PATCH=64 DTYPE=float32 DEVICE=cpu BATCHES="2 4" WARMUP=1 STEPS=1
  ROI="--width 300 --height 200" DETECT="--batch 4" T=4
  TRAINER="--patch 64 --batch 4 --epochs 2 --patches 16 --cases 2 --roi 256 --steps 2"
  GROUP="--batch 2 --groups 1,2 --unmapped 2 --host-steps 2 --roi 512"
  export CUDA_VISIBLE_DEVICES=""
fi

{
  date -u
  nvidia-smi -L 2>&1 || echo "nvidia-smi not available"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
} | tee "$OUT/machine.txt"

STATUS="$OUT/status.tsv"
: > "$STATUS"
# step NAME TIMEOUT_S COMMAND...: runs it, keeps its output and exit status.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee "$OUT/$name.txt"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "^\s*$" | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STATUS"
  echo "--- $name: exit $rc, $((SECONDS - start)) s"
}
skip() {
  echo "=== $1: skipped, missing $2" | tee "$OUT/$1.txt"
  printf '%s\tskipped: missing %s\t0\n' "$1" "$2" >> "$STATUS"
}

B=benchmarks
for b in $BATCHES; do
  step "model_step_b$b" $((150 * T)) "$PY" $B/model_step.py --patch $PATCH --batch $b \
    --dtype $DTYPE --warmup $WARMUP --steps $STEPS --json "$OUT/model_step_b$b.json"
done
if [ -z "$torch_missing" ]; then
  for b in $BATCHES; do
    step "compare_b$b" $((180 * T)) "$PY" $B/compare.py --device $DEVICE --patch $PATCH \
      --batch $b --dtype $DTYPE --warmup $WARMUP --steps $STEPS --json "$OUT/compare_b$b.json"
  done
else
  skip compare "$torch_missing"
fi
step detect $((150 * T)) "$PY" $B/detect.py --patch $PATCH $DETECT --dtype $DTYPE \
  --steps $STEPS $ROI --json "$OUT/detect.json"
if [ -z "$trainer_missing" ]; then
  step trainer_overhead $((180 * T)) "$PY" $B/trainer_overhead.py $TRAINER --dtype $DTYPE \
    --json "$OUT/trainer_overhead.json"
else
  skip trainer_overhead "$trainer_missing"
fi
# Run groups at the paper's batch: K runs in one program against K runs one after
# another, each group size on its own (an out-of-memory K is reported, the others go on);
# groups of 2 and 5 also with their runs' passes unmapped (if batched convolutions are slow).
if [ -z "$group_missing" ]; then
  step group_step $((1500 * T)) "$PY" $B/group_step.py --patch $PATCH --dtype $DTYPE \
    --warmup $WARMUP --steps $STEPS $GROUP --json "$OUT/group_step.json"
else
  skip group_step "$group_missing"
fi
# A trace of the small-batch train step, for the next optimisation (JAX profiler).
b=${BATCHES%% *}
step "profile_b$b" $((120 * T)) "$PY" $B/model_step.py --patch $PATCH --batch $b \
  --dtype $DTYPE --mode train --warmup $WARMUP --steps 10 --profile "$OUT/profile_b$b"

# Time to reproduce the paper from what was measured.
"$PY" - "$OUT" <<'EOF' | tee "$OUT/reproduce_time.txt"
import json, pathlib, subprocess, sys
out = pathlib.Path(sys.argv[1])
def load(name):
  p = out / f"{name}.json"
  return json.loads(p.read_text()) if p.exists() else None
summary = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))
           if p.stem != "summary"}
summary["status"] = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
step = load("model_step_b12") or load("model_step_b2")
det = load("detect")
group = load("group_step")
if step and det:
  flags = ["--train-img-s", str(step["train"]), "--forward-img-s", str(step["forward"]),
           "--detect-windows-s", str(det["windows_per_second"]), "--host-patches-s", "2160"]
  print("reproduce_time.py", " ".join(flags))
  subprocess.run([sys.executable, "benchmarks/reproduce_time.py", *flags], check=False)
  # Grouped: each measured group size, its host rate where it was measured.
  for k, row in sorted((group or {}).get("groups", {}).items(), key=lambda kv: int(kv[0])):
    if int(k) < 2 or not row.get("img_s"):
      continue
    grouped = flags[:-2] + ["--host-patches-s", str(row.get("host_crops_s", 2160)),
                            "--group", str(k), "--group-img-s", str(row["img_s"])]
    print("reproduce_time.py", " ".join(grouped))
    subprocess.run([sys.executable, "benchmarks/reproduce_time.py", *grouped], check=False)
else:
  print("reproduce_time.py: no train-step or detection figures were measured")
EOF
echo "status (step, exit, seconds):"
cat "$STATUS"
echo "all output under $OUT"
