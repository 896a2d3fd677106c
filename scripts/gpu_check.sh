#!/usr/bin/env bash
# Check longctx on a GPU machine in one call: the GPU tests, the benchmark's reference cells and
# the training presets. Usage:
#   bash scripts/gpu_check.sh [STAGE ...]   (default: tests bench train)
# Stages: tests (GPU parity and training tests), bench (the seed preset's 8K cells and the long
# preset's op rows against dense SDPA), train (configs/longnet.yaml at 32K with configs/graphs.yaml,
# and 1M eager, with validation and checkpoints), variants (each other variant at 32K, graphed),
# union (the union kernels' parity and tile sweep: tools/kernels/union_probe.py), hopper (the
# Gluon backward passes, sm_90's default, against the Triton ones, LONGCTX_HOPPER=0: the op to 1M
# and the LM at 32K; the tests stage runs the GPU suite with them on, ~10 minutes on an H100), ws
# (tools/kernels/ws_probe.py, ws_bwd_probe.py, ws_upper_probe.py: the CUDA producer/consumer forward
# and backward passes against cuDNN and Gluon, the upper ones against the Triton upper passes), cuda (the CUDA passes in the op, LONGCTX_HOPPER_CUDA=1, local and,
# where the segments allow, upper: their GPU tests, then the long preset's op and the seed preset's
# with head_split, each with them off and on), cudaops (the long preset's op at 64K and the seed's at
# 32K kernel by kernel, torch.profiler, off and on), cudalm (the LM at 32K with them off and on), ncu (those passes,
# cuDNN's and the Triton upper passes under Nsight Compute: tools/kernels/ws_ncu.py).
# Results go to $OUT (the device tool's folder) or ./gpu_out. Wheels in .whl/ (jsonargparse and
# what it needs, for train.py) are installed first where the image lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), flush=True)"

fit() {  # name, steps, train.py arguments...: one run's summary line
  local name=$1 steps=$2; shift 2
  local start; start=$(date +%s)
  timeout ${FIT_TIMEOUT:-400} python3 train.py fit --config configs/longnet.yaml "$@" --trainer.max_steps=$steps \
    --trainer.enable_progress_bar=false --trainer.default_root_dir="$OUT/train" > "$OUT/train-$name.log" 2>&1
  echo "$name rc=$? wall $(( $(date +%s) - start )) s: $(grep -h 'fit summary' "$OUT/train-$name.log" \
    || grep -h -m3 -E 'Error|error' "$OUT/train-$name.log")"
}

for s in ${*:-tests bench train}; do
  echo "=== $s $(date -u +%FT%TZ)"
  case $s in
    tests)  # into a file, so that a call stopped by its limit keeps what ran and the failures' messages.
      # TESTS_SHARD=i/n runs every n-th test from the i-th (1-based): the suite takes ~10 minutes on an
      # H100, more than one call holds with anything else.
      files="tests/test_gpu.py tests/test_combine.py tests/test_fused.py tests/test_rotary.py ${TESTS_EXTRA:-}"
      if [ -n "${TESTS_SHARD:-}" ]; then
        python3 -m pytest --collect-only -q $files 2>/dev/null | grep "::" \
          | awk -v i="${TESTS_SHARD%/*}" -v n="${TESTS_SHARD#*/}" '(NR - i) % n == 0' > "$OUT/test-ids.txt"
        echo "shard $TESTS_SHARD: $(wc -l < "$OUT/test-ids.txt") tests"
        python3 -c "import sys, pytest; sys.exit(pytest.main(['-q', '-x', '-rf'] + open(sys.argv[1]).read().splitlines()))" \
          "$OUT/test-ids.txt" > "$OUT/tests.txt" 2>&1
      else
        python3 -m pytest -q -x -rf $files > "$OUT/tests.txt" 2>&1
      fi
      grep -E "^FAILED|^E  |passed|failed" "$OUT/tests.txt" | tail -15 ;;
    bench)
      python3 -m longctx.benchmark --preset seed --lengths 8192 --cuda-graph --out "$OUT/seed" > "$OUT/seed.log" 2>&1
      grep -A12 "Sequence Length: 8192  \[bfloat16, fwd+bwd, head_split=True\]" "$OUT/seed.log" | grep -E "^\|"
      python3 -m longctx.benchmark --preset long --variants sdpa improved_dilated ring_dilated \
        --lengths ${LONG_LENGTHS:-65536 131072} --modes fwd+bwd --warmup 1 --repeats 5 --out "$OUT/long" \
        > "$OUT/long.log" 2>&1
      grep -E "^\|" "$OUT/long.log" | grep -E "sdpa|improved|ring" ;;
    train)
      fit 32k-graphs ${STEPS_32K:-40} --config configs/seq/32k.yaml --config configs/graphs.yaml \
        --trainer.val_check_interval=20 --trainer.limit_val_batches=2
      fit 1m-eager ${STEPS_1M:-4} --config configs/seq/1m.yaml --config configs/passkey.yaml --trainer.limit_val_batches=0
      find "$OUT/train" -name "*.ckpt" | head ;;
    variants)
      for v in ${VARIANTS:-dilated multihead_dilated improved_multihead_dilated ring_dilated ring_multihead_dilated}; do
        ckpt=false; case $v in dilated|multihead_dilated) ckpt=true ;; esac  # the reference's memory
        fit "32k-$v" 16 --config configs/attention/$v.yaml --config configs/seq/32k.yaml --config configs/graphs.yaml \
          --model.activation_checkpointing=$ckpt --trainer.val_check_interval=8 --trainer.limit_val_batches=1
      done ;;
    union)
      python3 -m pytest -q -x -rf tests/test_gpu.py -k union > "$OUT/union-tests.txt" 2>&1
      grep -E "^FAILED|passed|failed" "$OUT/union-tests.txt" | tail -3
      python3 tools/kernels/union_probe.py ${UNION_LENGTHS:-} 2>&1 | grep -v -i warn | tee "$OUT/union_probe.txt" ;;
    hopper)  # the Gluon local backward passes (longctx/kernels/hopper.py) against the Triton ones: op, LM
      for h in 0 1; do
        LONGCTX_HOPPER=$h python3 -m longctx.benchmark --preset long --variants improved_dilated --modes fwd+bwd \
          --lengths ${LONG_LENGTHS:-65536 131072 262144 1048576} --warmup 1 --repeats 7 --cuda-graph \
          --out "$OUT/hopper$h" > "$OUT/hopper$h.log" 2>&1
        echo "LONGCTX_HOPPER=$h: $(grep -E 'fwd\+bwd ok' "$OUT/hopper$h.log" | awk '{print $3, $(NF-1), $NF}' | tr '\n' ' ')"
      done
      for h in 0 1; do
        LONGCTX_HOPPER=$h fit "32k-hopper$h" ${STEPS_32K:-300} --config configs/seq/32k.yaml --config configs/graphs.yaml \
          --trainer.limit_val_batches=0
      done ;;
    ws)  # causal 2,048-row segments and whole sequences, with the long preset's weight terms, the seed's segments;
      # each run time-limited: a wrong barrier parity hangs a kernel rather than failing it. First the checks
      # alone in the watchdog build (LONGCTX_CUDA_WATCHDOG=1: a wait that never completes names its barrier
      # and fails the launch); the timings only if they pass.
      fail=0 upper=1
      for probe in ws_probe ws_bwd_probe ws_upper_probe; do
        LONGCTX_CUDA_WATCHDOG=1 timeout ${WS_CHECK_TIMEOUT:-120} python3 tools/kernels/$probe.py --check-only \
          > "$OUT/$probe-check.txt" 2>&1 || { [ $probe = ws_upper_probe ] && upper=0 || fail=1; }
        grep -v -i warn "$OUT/$probe-check.txt"
      done
      if [ $fail = 1 ]; then echo "the checks failed or hung: not timed"; continue; fi
      for args in "" "--branches 5 --segments 2048" "--full --heads 8 --segments 1024 2048 --lengths 8192 32768"; do
        timeout ${WS_TIMEOUT:-240} python3 tools/kernels/ws_probe.py $args 2>&1 | grep -v -i warn | tee -a "$OUT/ws_probe.txt"
      done
      timeout ${WS_TIMEOUT:-240} python3 tools/kernels/ws_bwd_probe.py --branches 5 2>&1 | grep -v -i warn \
        | tee -a "$OUT/ws_probe.txt"
      if [ $upper = 1 ]; then  # the upper passes' own check failing leaves the local passes' timings above
        timeout ${WS_TIMEOUT:-240} python3 tools/kernels/ws_upper_probe.py 2>&1 | grep -v -i warn | tee -a "$OUT/ws_probe.txt"
      else echo "the upper passes' checks failed or hung: not timed"; fi ;;
    cuda)  # the union op's passes in CUDA (longctx/kernels/hopper_cuda.py) against the Triton and Gluon ones; the
      # tests in the watchdog build (a barrier that never completes fails its test instead of hanging the call)
      LONGCTX_CUDA_WATCHDOG=1 timeout ${CUDA_TEST_TIMEOUT:-300} python3 -m pytest -q -x -rf tests/test_gpu.py -k hopper_cuda \
        > "$OUT/cuda-tests.txt" 2>&1; rc=$?
      grep -E "^FAILED|^E  |passed|failed|watchdog" "$OUT/cuda-tests.txt" | tail -8
      if [ $rc != 0 ]; then echo "the tests failed or hung (rc $rc): not timed"; continue; fi
      for c in 0 1; do
        LONGCTX_HOPPER_CUDA=$c python3 -m longctx.benchmark --preset long --variants sdpa improved_dilated \
          --modes fwd fwd+bwd --lengths ${LONG_LENGTHS:-65536 131072 262144} --warmup 1 --repeats 7 --cuda-graph \
          --out "$OUT/cuda$c" > "$OUT/cuda$c.log" 2>&1
        echo "LONGCTX_HOPPER_CUDA=$c:"; grep -E "^\|" "$OUT/cuda$c.log" | grep -E "sdpa|improved"
        LONGCTX_HOPPER_CUDA=$c python3 -m longctx.benchmark --preset seed --variants sdpa improved_dilated \
          --batch 1 2 --lengths 8192 32768 --head-split on --modes fwd+bwd --cuda-graph --out "$OUT/seed-cuda$c" \
          > "$OUT/seed-cuda$c.log" 2>&1
        grep -E "^\|" "$OUT/seed-cuda$c.log" | grep -E "sdpa|improved"
      done ;;
    cudaops)  # where the op's time goes, kernel by kernel, with the CUDA passes off and on: the long preset at 64K,
      # the seed preset with head_split at 32K
      for c in 0 1; do
        for args in "${OPS_LENGTH:-65536} 0 long" "32768 1 seed"; do
          echo "LONGCTX_HOPPER_CUDA=$c, profile_op.py $args:"
          LONGCTX_HOPPER_CUDA=$c timeout ${WS_TIMEOUT:-240} python3 tools/kernels/profile_op.py $args 2>&1 \
            | grep -v -i warn | tee -a "$OUT/cudaops$c.txt" | tail -19
        done
      done ;;
    cudalm)  # the LM at 32K with the CUDA local passes off and on (a call of its own: ~4 minutes)
      for c in 0 1; do
        LONGCTX_HOPPER_CUDA=$c fit "32k-cuda$c" ${STEPS_32K:-300} --config configs/seq/32k.yaml --config configs/graphs.yaml \
          --trainer.limit_val_batches=0
      done ;;
    ncu)  # the CUDA local passes and cuDNN's under Nsight Compute (tools/kernels/ws_ncu.py): time, instructions, stalls
      NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      timeout ${NCU_TIMEOUT:-300} "$NCU" --kernel-name regex:'ws_|cudnn|flash|_upper' --section SpeedOfLight \
        --section WarpStateStats --section InstructionStats --section Occupancy \
        python3 tools/kernels/ws_ncu.py ${NCU_ARGS:-} > "$OUT/ncu.txt" 2>&1
      grep -E "^== |\([0-9]+, 1, 1\)x|ws_|cudnn|flash|_upper|Duration|Executed Instructions  |Warp Cycles Per Issued|Compute \(SM\) Throughput|Issue Slots Busy" \
        "$OUT/ncu.txt" | head -200 ;;
    *) echo "unknown stage $s (tests bench train variants union hopper ws cuda cudaops cudalm ncu)" ;;
  esac
done
