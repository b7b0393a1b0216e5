#!/usr/bin/env bash
# The training and sampling benchmarks on an NVIDIA GPU, in one command:
#
#   bash experiments/bench/gpu.sh [RESULTS_DIR]            # default: $OUT, else ./bench-results
#   bash experiments/bench/gpu.sh --dry-run [RESULTS_DIR]  # the same steps, tiny, on any backend
#   bash experiments/bench/gpu.sh --only train [RESULTS_DIR]  # some of: train, transformers,
#                                                             # kernels, variants, sampling, ot
#
# From the repository root of a clone whose virtual environment (.venv, or $PYTHON) has the
# project installed (`pip install -r requirements.txt && pip install -e . --no-deps`). It
#  1. installs the CUDA 12 build of the JAX version pinned in requirements.txt, unless the
#     JAX there already runs on a GPU (any version: an image with its own CUDA JAX keeps it;
#     offline, point pip at downloaded wheels with PIP_FIND_LINKS=DIR PIP_NO_INDEX=1),
#  2. checks that the benchmarks' imports resolve (a missing package is named before any
#     timing starts), records nvidia-smi and the devices JAX sees,
#  3. times the train step of the Meta CIFAR-10 preset (unet_cifar10_meta, 32x32x3) in
#     bfloat16 at per-device batch 128 on every GPU: ms/step (steps dispatched back to back,
#     as training runs them, and each step alone), images/s, GFLOP/step, the
#     fraction of a bfloat16 matmul peak measured on the same GPU, and the projected
#     GPU-hours of the Meta recipe (175k steps x 512); then torchcfm's preset the same way,
#  3b. times the transformers' train steps the same way (part "transformers",
#     experiments/bench/train.py --transformers): SiT-S/2 on CIFAR-10 pixels (32x32x3, batch
#     128), SiT-B/2 and SiT-XL/2 (with remat) on 32x32x4 latents at batch 256, 1,000 classes,
#  4. traces the Meta preset's train step (experiments/bench/kernels.py): device time by kind
#     of kernel, idle time, the longest kernels, and the Euler sampling cost of the same U-Net
#     (ms per velocity evaluation at batch 500, projected FID-50k time); the raw trace and the
#     step's HLO go to RESULTS_DIR/kernels/ for a finer reading offline,
#  4b. compares ways of computing the Meta preset (part "variants"): its train step with
#     cuDNN's fused attention, and with Flax's GroupNorm, against fmjax's own forms
#     (experiments/bench/train.py --model-option attention=cudnn --model-option
#     group_norm=flax, with a control; a failure is logged and the script goes on), and the
#     GroupNorm and attention layers of both presets alone, each way (experiments/bench/layers.py),
#  5. runs the sampling benchmarks (experiments/bench/sampling.py) and the exact-OT ones
#     (experiments/bench/ot.py: the host and in-graph assignment solvers on the GPU, which
#     decides whether "auto" should keep calling the host there),
# writing gpu.log (everything printed) and one JSON file per benchmark to RESULTS_DIR.
#
# --dry-run skips the install and nvidia-smi and runs steps 3-5 at tiny sizes (8x8 images,
# batch 1, one timed step, --quick sampling) on whatever backend JAX has: a check of this
# script on a CPU machine (there the variants part compares attention=xla with itself: cuDNN
# needs a GPU; SiT-XL/2's compile alone takes minutes on a small CPU). --only PARTS
# (comma-separated: train, transformers, kernels, variants, sampling, ot) runs those parts of
# steps 3-5 alone, e.g. to split the work over two shorter sessions on a device.
set -euo pipefail
cd "$(dirname "$0")/../.."

dry_run=0 parts=train,transformers,kernels,variants,sampling,ot results=
all_parts="train, transformers, kernels, variants, sampling, ot"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --only)
      parts=${2:?--only needs PARTS: a comma-separated subset of $all_parts}
      shift
      ;;
    -*)
      echo "unknown option $1; usage: gpu.sh [--dry-run] [--only PARTS] [RESULTS_DIR]" >&2
      exit 2
      ;;
    *) results=$1 ;;
  esac
  shift
done
for part in ${parts//,/ }; do
  [[ "$part" =~ ^(train|transformers|kernels|variants|sampling|ot)$ ]] || {
    echo "--only: unknown part '$part'; expected some of $all_parts" >&2
    exit 2
  }
done
wants() { [[ ",$parts," == *",$1,"* ]]; }
results=${results:-${OUT:-bench-results}}
mkdir -p "$results"
python=${PYTHON:-.venv/bin/python}
[[ -x "$python" ]] || python=python3
exec > >(tee -a "$results/gpu.log") 2>&1
# The commit, and whether the working tree differs from it (a copied tree may carry an older .git).
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
[[ "$commit" == '?' ]] || git diff --quiet HEAD || commit="$commit, working tree changed"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $commit -> $results"
# One compilation cache for this run's processes, empty at its start: the train part's compile
# times stay cold, and the kernels part reuses the Meta step the train part compiled (a
# minute on an H200). A cache the caller set is kept.
if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
  export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
fi

if ((dry_run)); then
  shape=(--image-shape 8,8,3) batch=1 repeats=1 quick=(--quick)
  sample=(--sample-batch 1 --sample-steps 2) traced=1 attention=xla
  transformers=(--image-shape 8,8,3 --batch-per-device 1)
else
  jax_version=$(sed -n 's/^jax==//p' requirements.txt)
  read -r found backend < <("$python" -c 'import jax; print(jax.__version__, jax.default_backend())' \
    2>/dev/null || echo "none none")
  if [[ "$backend" == gpu ]]; then
    echo "== JAX $found already runs on the GPU (requirements.txt pins $jax_version)"
  else
    echo "== installing jax[cuda12]==$jax_version (found JAX $found on $backend)"
    "$python" -m pip install -q -U "jax[cuda12]==$jax_version"
  fi
  nvidia-smi | tee "$results/nvidia-smi.txt"
  shape=() batch=128 repeats=20 quick=()
  sample=(--sample-batch 500 --sample-steps 20) traced=3 attention=cudnn
  transformers=()
fi
if ! "$python" -c 'import experiments.bench.kernels, experiments.bench.layers, experiments.bench.ot, experiments.bench.sampling'; then
  echo "== a package the benchmarks import is missing (above): pip install -r requirements.txt," \
    "or offline, from wheels downloaded elsewhere: pip install --no-index --no-deps WHEELS" >&2
  exit 1
fi
"$python" -c 'import jax; print("== jax", jax.__version__, jax.default_backend(), jax.devices())'

if wants train; then
  for preset in unet_cifar10_meta unet_cifar10_torchcfm; do
    echo "== train step: $preset, bfloat16, per-device batch $batch"
    "$python" -m experiments.bench.train --preset "$preset" --dtype bfloat16 \
      --batch-per-device "$batch" --repeats "$repeats" "${shape[@]}" \
      --json "$results/train_${preset}_bf16.json"
  done
fi
if wants transformers; then
  echo "== train step: transformers (sit_s_2 on pixels, sit_b_2 and sit_xl_2 on latents), bfloat16"
  "$python" -m experiments.bench.train --transformers --dtype bfloat16 --repeats "$repeats" \
    "${transformers[@]}" --json "$results/train_transformers_bf16.json" ||
    echo "== transformers: the train-step rows failed (above); going on"
fi
if wants kernels; then
  echo "== kernels: unet_cifar10_meta, bfloat16, batch $batch; Euler sampling"
  "$python" -m experiments.bench.kernels --preset unet_cifar10_meta --dtype bfloat16 \
    --batch "$batch" --steps "$traced" "${shape[@]}" "${sample[@]}" \
    --save "$results/kernels" --json "$results/kernels.json"
fi
if wants variants; then
  echo "== variants: unet_cifar10_meta, bfloat16, batch $batch: attention=$attention," \
    "group_norm=flax; layers"
  "$python" -m experiments.bench.train --preset unet_cifar10_meta --dtype bfloat16 \
    --batch-per-device "$batch" --repeats "$repeats" "${shape[@]}" \
    --model-option "attention=$attention" --model-option group_norm=flax \
    --json "$results/variants_meta_bf16.json" ||
    echo "== variants: the step comparison failed (above); going on"
  for preset in unet_cifar10_meta unet_cifar10_torchcfm; do
    "$python" -m experiments.bench.layers --preset "$preset" --dtype bfloat16 \
      --batch "$batch" --repeats "$repeats" "${shape[@]}" --json "$results/layers_$preset.json"
  done
fi
if wants sampling; then
  echo "== sampling"
  "$python" -m experiments.bench --only sampling "${quick[@]}" --json "$results/sampling.json"
fi
if wants ot; then
  echo "== exact OT"
  "$python" -m experiments.bench --only ot "${quick[@]}" --json "$results/ot.json"
fi
echo "== done: $results"
