#!/usr/bin/env bash
# Issue 7's GPU benchmark in one go (full iResNet50-CBAM, 112 px, batch 128):
#  1. the A-SKD student step, JAX bfloat16 vs PyTorch AMP bfloat16 channels_last eager and
#     torch.compile, with the step's peak memory and a profile of every implementation;
#  2. the teacher step, JAX vs PyTorch AMP channels_last eager.
# On an H200 (fifth session) part 1 took ~6 min: JAX's compile ~50 s, torch.compile's
# first step ~140 s. Results: $OUT/benchmarks.md (tables), $OUT/log.txt (everything, progress lines as they
# come), $OUT/trace_*.json.gz (the JAX perfetto traces). Each part has a time cap so the
# whole run ends within BUDGET seconds (default 570); a part cut short keeps its progress
# lines in the log. Run from the repository root: OUT=gpu_out bash benchmarks/gpu.sh
# (BENCH_ARGS: extra bench flags, last wins, e.g. a tiny model to try the script on a CPU).
set -u
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-570}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Both frameworks share the GPU in one process: JAX preallocates this fraction (default
# 0.75), PyTorch's caching allocator takes from the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
log="$OUT/log.txt"
left() { echo $(( BUDGET - SECONDS )); }
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }
{
  date -u; echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee -a "$log"
BENCH="$PY -m askd_jax.tools.bench --depth=50 --width=1.0 --size=112 --batch=128 --dtype=bfloat16 --steps=20 --out=$OUT/benchmarks.md"
echo "== 1. A-SKD step (cap $(cap 420) s)" | tee -a "$log"
timeout "$(cap 420)" $BENCH --steps_kind=askd --torch=channels_last,compile --memory_batch=128 \
  --profile="$OUT/prof" ${BENCH_ARGS:-} 2>&1 | tee -a "$log"
i=0
for f in $(find "$OUT/prof" -name '*.trace.json.gz' 2>/dev/null); do
  i=$((i + 1)); cp "$f" "$OUT/trace_$i.json.gz"; echo "trace_$i.json.gz <- $f" | tee -a "$log"
done
rm -rf "$OUT/prof"
echo "== 2. teacher step (cap $(cap 150) s)" | tee -a "$log"
if [ "$(left)" -gt 60 ]; then
  timeout "$(cap 150)" $BENCH --steps_kind=teacher --torch=channels_last ${BENCH_ARGS:-} 2>&1 | tee -a "$log"
fi
echo "== done after $SECONDS s" | tee -a "$log"
