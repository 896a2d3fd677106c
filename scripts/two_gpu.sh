#!/usr/bin/env bash
# The two-GPU checks: DDP scaling, the ring variants' context parallelism at 32K, 128K and 1M, and
# the benchmark's ring rows at P = 2 (NCCL; NVLink multicast stays off: NVLS hung on lent machines).
#   bash scripts/two_gpu.sh   -> logs and summaries under $OUT (or ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.device_count(), 'GPUs', flush=True)"
fit() {  # name, devices, extra args...
  local name=$1 devices=$2; shift 2
  timeout 500 python3 train.py fit --config configs/longnet.yaml --trainer.devices=$devices --trainer.strategy=ddp \
    --trainer.max_steps=${STEPS:-30} --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false \
    --trainer.default_root_dir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?: $(grep -h 'fit summary' "$OUT/$name.log" || grep -h -m3 -E 'Error|error' "$OUT/$name.log")"
}
# DDP scaling at the same global batch (2 windows): 1 GPU x batch 2 vs 2 GPUs x batch 1.
fit ddp-1gpu 1 --config configs/seq/32k.yaml --data.batch_size=2
fit ddp-2gpu 2 --config configs/seq/32k.yaml --data.batch_size=1
# Context parallel over both GPUs.
for v in ring_dilated ring_multihead_dilated; do
  fit cp2-$v-32k 2 --config configs/attention/$v.yaml --config configs/seq/32k.yaml
  fit cp2-$v-128k 2 --config configs/attention/$v.yaml --config configs/seq/128k.yaml
done
fit cp2-ring-1m 2 --config configs/attention/ring_dilated.yaml --config configs/seq/1m.yaml --config configs/passkey.yaml
# The benchmark's ring rows at P = 2 (each rank holds T/2 tokens).
torchrun --nproc-per-node 2 -m longctx.benchmark --preset long --variants ring_dilated ring_multihead_dilated \
  --warmup 1 --repeats 5 --out "$OUT/bench-p2" > "$OUT/bench-p2.log" 2>&1; tail -n 20 "$OUT/bench-p2.log"
