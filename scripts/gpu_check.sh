#!/usr/bin/env bash
# One call on a lent GPU: install what the image lacks, run the GPU tests, probe the kernels,
# benchmark, and (with "train") run the training presets. Usage:
#   bash scripts/gpu_check.sh [tests] [probe] [seed] [long] [train] [e2e] …   (default: tests probe seed long;
#   the case list below names every stage)
# Results go to $OUT (the device tool's folder) or ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # jsonargparse & co. for train.py (the image has no registry access)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
stages=${*:-tests probe seed long}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), flush=True)"
for s in $stages; do
  echo "=== $s $(date -u +%FT%TZ)"
  case $s in
    tests) python3 -m pytest -q -x tests/test_gpu.py tests/test_combine.py 2>&1 | tail -15 ;;
    combine)  # the one-pass combine (default) against the piece-by-piece float32 merge, CUDA graphs, one run
      for c in 1 0; do
        LONGCTX_COMBINE=$c python3 -m longctx.benchmark --preset long --lengths ${COMBINE_LENGTHS:-32768 65536 131072 262144} \
          --modes fwd+bwd --variants sdpa improved_dilated --cuda-graph --warmup 2 --repeats 10 --out "$OUT/combine$c" \
          > "$OUT/combine$c.log" 2>&1
        echo "LONGCTX_COMBINE=$c"; grep -E "^\s+(sdpa|improved)" "$OUT/combine$c.log"
      done ;;
    cputests) python3 -m pytest -q -x tests -k "not ring and not train and not cli" 2>&1 | tail -5 ;;
    probe) python3 scripts/kernel_probe.py 2>&1 | tee "$OUT/probe.txt" ;;
    seed) python3 -m longctx.benchmark --preset seed --out "$OUT/seed" > "$OUT/seed.log" 2>&1; tail -n 130 "$OUT/seed.log" | grep -A12 "Sequence Length: 8192  \[bfloat16, fwd+bwd, head_split=True\]" ;;
    long) python3 -m longctx.benchmark --preset long --variants sdpa improved_dilated ring_dilated ${LONG_VARIANTS:-improved_multihead_dilated} --warmup 1 --repeats 5 --max-seconds 20 --out "$OUT/long" > "$OUT/long.log" 2>&1; grep -E "^\s+(sdpa|improved|ring)" "$OUT/long.log" ;;
    train)  # the LongNet-size preset at 32K, a few dozen steps per variant
      for v in ${TRAIN_VARIANTS:-improved_dilated ring_dilated improved_multihead_dilated ring_multihead_dilated dilated multihead_dilated}; do
        ckpt=false; case $v in dilated|multihead_dilated) ckpt=true ;; esac
        timeout 240 python3 train.py fit --config configs/longnet.yaml --config configs/attention/$v.yaml \
          --trainer.max_steps=${TRAIN_STEPS:-30} --trainer.limit_val_batches=0 \
          --trainer.enable_progress_bar=false --model.activation_checkpointing=$ckpt \
          --trainer.default_root_dir="$OUT/train" > "$OUT/train-$v.log" 2>&1
        echo "$v (activation_checkpointing=$ckpt) rc=$?: $(grep -h 'fit summary' "$OUT/train-$v.log" || tail -n 3 "$OUT/train-$v.log")"
      done ;;
    e2e)  # issue 7: dilated vs dense (one branch w = T, r = 1 is exact dense causal attention) at 32K/128K; 1M
      run() {  # name, steps, extra args...
        local name=$1 steps=$2; shift 2
        timeout 300 python3 train.py fit --config configs/longnet.yaml --trainer.max_steps=$steps --trainer.limit_val_batches=0 \
          --trainer.enable_progress_bar=false --trainer.default_root_dir="$OUT/e2e" "$@" > "$OUT/e2e-$name.log" 2>&1
        echo "$name rc=$?: $(grep -h 'fit summary' "$OUT/e2e-$name.log" || grep -h -m3 -E 'Error|error' "$OUT/e2e-$name.log")"
      }
      cases="improved-32k dense-32k improved-128k dense-128k"
      for c in ${E2E_CASES:-$cases}; do  # a subset fits one 600 s call
        case $c in
          improved-32k) run $c 20 --config configs/seq/32k.yaml ;;
          dense-32k) run $c 20 --config configs/seq/32k.yaml --model.segment_lengths=[32768] --model.dilation_rates=[1] ;;
          improved-128k) run $c 10 --config configs/seq/128k.yaml ;;
          dense-128k) run $c 8 --config configs/seq/128k.yaml --model.segment_lengths=[131072] --model.dilation_rates=[1] ;;
          *) echo "E2E_CASES: unknown case $c (one of: $cases)" ;;
        esac
      done ;;
    opcompare)  # issue 7 target 1: the op against dense SDPA, forward+backward in one CUDA graph each (random dO):
      # the long preset at 64K-256K, the seed preset's 8K with head_split at batch 1, 2 and 4
      (cd scripts && python3 -c "import union_probe as u; [u.compare(T) for T in (65536, 131072, 262144)]
[u.compare(8192, B, u.SEED) for B in (1, 2, 4)]") 2>&1 | grep -v -i warn | tee "$OUT/opcompare.txt" ;;
    profile) python3 scripts/profile_op.py 8192 1 2>&1 | tee "$OUT/profile.txt" | tail -n 22
      python3 scripts/profile_op.py 65536 0 long 2>&1 | tee "$OUT/profile_long.txt" | tail -n 22 ;;
    stride) python3 scripts/stride_probe.py 65536 2 2>&1 | tee "$OUT/stride.txt" ;;
    seed32k)  # issue 7 target 3: batch 1, head_split, 8K and 32K
      python3 -m longctx.benchmark --preset seed --batch 1 --lengths 8192 32768 --head-split on --modes fwd+bwd \
        --variants sdpa improved_dilated ring_dilated dilated --out "$OUT/seed32k" > "$OUT/seed32k.log" 2>&1
      grep -E "^\s+(sdpa|improved|ring|dilated)" "$OUT/seed32k.log" ;;
    seed8k)  # issue 7 target 1 (seed part): the seed preset's whole 8K grid (batch 1, 2, 4 x head_split), eager and graphed
      for g in "" --cuda-graph; do
        python3 -m longctx.benchmark --preset seed --lengths 8192 --head-split both --modes fwd+bwd \
          --variants sdpa improved_dilated $g --out "$OUT/seed8k$g" > "$OUT/seed8k$g.log" 2>&1
        echo "seed 8K ${g:-eager}:"; grep -E "^Batch Size|^\| (sdpa|improved)" "$OUT/seed8k$g.log"
      done ;;
    memprobe) python3 scripts/memory_probe.py ${MEMPROBE_T:-1048576} ${MEMPROBE_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/memory_probe.txt" ;;
    graph)  # the same cells with each call captured in a CUDA graph: GPU time without host overhead
      python3 -m longctx.benchmark --preset seed --batch 1 --lengths 8192 32768 --head-split on --modes fwd+bwd \
        --variants sdpa improved_dilated --cuda-graph --out "$OUT/graph-seed" > "$OUT/graph-seed.log" 2>&1
      python3 -m longctx.benchmark --preset long --lengths 32768 65536 131072 --modes fwd+bwd --cuda-graph \
        --variants sdpa improved_dilated --out "$OUT/graph-long" > "$OUT/graph-long.log" 2>&1
      grep -hE "^\s+(sdpa|improved)" "$OUT/graph-seed.log" "$OUT/graph-long.log" ;;
    compile)
      timeout 400 python3 train.py fit --config configs/longnet.yaml --config configs/seq/32k.yaml --model.compile=true \
        --trainer.max_steps=25 --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false \
        --trainer.callbacks.skip_steps=8 --trainer.default_root_dir="$OUT/e2e" > "$OUT/e2e-compile-32k.log" 2>&1
      echo "compile-32k rc=$?: $(grep -h 'fit summary' "$OUT/e2e-compile-32k.log" || grep -h -m3 -E 'Error|error' "$OUT/e2e-compile-32k.log")" ;;
    1m|maxlen)  # issue 7 target 5: a full step at 1M tokens; maxlen: the longest that fits (MAXLEN: lengths to try)
      lengths=1048576; [ $s = maxlen ] && lengths=${MAXLEN:-1310720}
      for T in $lengths; do
        timeout 400 python3 train.py fit --config configs/longnet.yaml --config configs/seq/1m.yaml --config configs/passkey.yaml \
          --data.seq_len=$T --trainer.max_steps=5 --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false \
          --trainer.callbacks.skip_steps=1 --trainer.default_root_dir="$OUT/e2e" ${MAXLEN_EXTRA:-} > "$OUT/e2e-$T.log" 2>&1
        echo "$T tokens rc=$?: $(grep -h 'fit summary' "$OUT/e2e-$T.log" || grep -h -m3 -E 'Error|error' "$OUT/e2e-$T.log")"
      done ;;
    dedup) python3 scripts/dedup_probe.py ${DEDUP_LENGTHS:-65536 131072 262144} 2>&1 | tee "$OUT/dedup_probe.txt" ;;
    host) python3 scripts/host_probe.py 2>&1 | tee "$OUT/host_probe.txt" ;;
    hostab)  # target 3 eager: host time and the eager seed cells of this tree against an older one, interleaved.
      # HOSTAB_OLD: a folder holding an older longctx/ (e.g. `git archive <commit> longctx | tar -x -C .old`).
      ROOT=$PWD
      for round in 1 2; do for tree in "$PWD" ${HOSTAB_OLD:+$PWD/$HOSTAB_OLD}; do
        echo "--- round $round, longctx from $tree"
        (cd "$tree" && PYTHONPATH=$tree:${PYTHONPATH#*:} python3 "$ROOT/scripts/host_probe.py" 2>&1 | grep -v -i warn
         PYTHONPATH=$tree:${PYTHONPATH#*:} python3 -m longctx.benchmark --preset seed --batch 1 --lengths 8192 32768 \
           --head-split on --modes fwd+bwd --variants sdpa improved_dilated ring_dilated --warmup 10 --repeats 50 \
           --out "$OUT/hostab" 2>&1 | grep -E "^\s+(sdpa|improved|ring)")
      done; done 2>&1 | tee "$OUT/hostab.txt" ;;
    bias) python3 scripts/bias_probe.py 2>&1 | tee "$OUT/bias_probe.txt" ;;
    union)  # the union kernels: GPU parity, then scripts/union_probe.py (tile sweep, against the per-branch op)
      [ "${UNION_TESTS:-1}" = 0 ] || python3 -m pytest -q -x tests/test_gpu.py -k union 2>&1 | tail -4
      python3 scripts/union_probe.py ${UNION_LENGTHS:-} 2>&1 | grep -v -i warn | tee "$OUT/union_probe.txt" ;;
    ab)  # the union kernels of this tree against other trees' (AB_TREES: NAME=folder holding a longctx/ ...), in turns
      python3 scripts/ab_probe.py ${AB_TREES:-} 2>&1 | grep -v -i warn | tee "$OUT/ab_probe.txt" ;;
    exp)  # docs/experiments' patches, each applied to a copy of this tree (EXP: names, "a+b" for both;
      # default each alone and all together): this tree's local-pass sweep, then each copy's GPU union tests,
      # local-pass sweep (the same tilings) and whole-pass sweep with the op against dense (EXP_TESTS=0,
      # EXP_SWEEP=0 leave those out), then ab_probe of all
      trees=(); ROOT=$PWD; : > "$OUT/exp.txt"
      (echo "--- this tree"; python3 scripts/union_probe.py local 2>&1 | grep -v -i warn) | tee -a "$OUT/exp.txt"
      names=$(cd docs/experiments 2>/dev/null && ls *.patch 2>/dev/null | sed 's/\.patch$//')
      [ -n "${EXP:-$names}" ] || echo "no patch in docs/experiments" | tee -a "$OUT/exp.txt"
      for spec in ${EXP:-$names $(echo $names | tr ' ' +)}; do
        dir=/tmp/exp-${spec//+/-}; rm -rf "$dir"; mkdir -p "$dir"; cp -r longctx scripts tests "$dir"
        ok=1; for p in ${spec//+/ }; do f=$ROOT/docs/experiments/$p.patch
          (cd "$dir" && { git apply "$f" 2>/dev/null || patch -s -p1 < "$f"; }) || ok=0; done
        [ $ok = 1 ] || { echo "$spec: does not apply" | tee -a "$OUT/exp.txt"; continue; }
        trees+=("$spec=$dir")
        (echo "--- $spec"; cd "$dir" && export PYTHONPATH=$dir:${PYTHONPATH#*:}
         [ "${EXP_TESTS:-1}" = 0 ] || python3 -m pytest -q -x tests/test_gpu.py -k union 2>&1 | tail -2
         python3 scripts/union_probe.py local 2>&1 | grep -v -i warn
         [ "${EXP_SWEEP:-1}" = 0 ] || python3 scripts/union_probe.py 65536 2>&1 | grep -v -i warn | grep -E "best|union op|passes") 2>&1 | tee -a "$OUT/exp.txt"
      done
      python3 scripts/ab_probe.py "${trees[@]}" 2>&1 | grep -v -i warn | tee -a "$OUT/exp.txt" ;;
    localsweep) python3 scripts/union_probe.py local ${LOCAL_T:-65536} 2>&1 | grep -v -i warn | tee "$OUT/local_sweep.txt" ;;
    flex) python3 scripts/flex_probe.py ${FLEX_LENGTHS:-65536} 2>&1 | grep -v -i warn | tee "$OUT/flex_probe.txt" ;;
    defaults)  # the GPU presets as shipped (compiled, CUDA graphs): validation and checkpoints included
      for c in "32k 40 --config configs/seq/32k.yaml --trainer.val_check_interval=20 --trainer.limit_val_batches=2" \
               "128k 12 --config configs/seq/128k.yaml --trainer.val_check_interval=6 --trainer.limit_val_batches=1" \
               "1m 4 --config configs/seq/1m.yaml --config configs/passkey.yaml --trainer.limit_val_batches=0"; do
        set -- $c; name=$1 steps=$2; shift 2
        case " ${DEFAULTS:-32k 128k 1m} " in *" $name "*) ;; *) continue ;; esac
        start=$(date +%s)
        timeout 420 python3 train.py fit --config configs/longnet.yaml "$@" --trainer.max_steps=$steps \
          --trainer.enable_progress_bar=false --trainer.callbacks.skip_steps=3 --trainer.default_root_dir="$OUT/defaults" \
          ${DEFAULTS_EXTRA:-} > "$OUT/defaults-$name.log" 2>&1
        echo "$name rc=$? wall $(( $(date +%s) - start )) s: $(grep -h 'fit summary' "$OUT/defaults-$name.log" || grep -h -m3 -E 'Error|error' "$OUT/defaults-$name.log")"
      done
      find "$OUT/defaults" -name "*.ckpt" | head ;;
    variants)  # configs/graphs.yaml with each other variant at 32K, validation and checkpoints included
      for v in ${GRAPH_VARIANTS:-dilated multihead_dilated improved_multihead_dilated ring_dilated ring_multihead_dilated}; do
        ckpt=false; case $v in dilated|multihead_dilated) ckpt=true ;; esac
        start=$(date +%s) log="$OUT/variants-$v.log"
        [ -e "$log" ] && log="$OUT/variants-$v-$start.log"  # a second run in one call keeps its own log
        timeout 300 python3 train.py fit --config configs/longnet.yaml --config configs/attention/$v.yaml \
          --config configs/seq/32k.yaml --config configs/graphs.yaml --model.activation_checkpointing=$ckpt \
          --trainer.max_steps=16 --trainer.val_check_interval=8 --trainer.limit_val_batches=1 \
          --trainer.enable_progress_bar=false --trainer.callbacks.skip_steps=3 \
          --trainer.default_root_dir="$OUT/variants" ${VARIANTS_EXTRA:-} > "$log" 2>&1
        echo "$v (checkpointing=$ckpt) rc=$? wall $(( $(date +%s) - start )) s: $(grep -h 'fit summary' "$log" || grep -h -m3 -E 'Error|error' "$log")"
      done ;;
    clocks)  # issue 7: long 32K runs (configs/graphs.yaml) with the GPU's clocks, power and temperature
      # sampled beside them (scripts/clock_windows.py); CLOCK_RUNS: residual dtype:steps, in order
      q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
      nvidia-smi --query-gpu=$q --format=csv,noheader > /dev/null 2>&1 || q=${q/clocks_event/clocks_throttle}
      for spec in ${CLOCK_RUNS:-bfloat16:600 float32:600 bfloat16:300}; do
        r=${spec%:*} steps=${spec#*:} dir="$OUT/clocks/$r-$(date +%s)"; mkdir -p "$dir"
        { echo "# epoch $(date +%s.%N)"; exec nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 250; } > "$dir/smi.csv" &
        smi=$!
        timeout 420 python3 train.py fit --config configs/longnet.yaml --config configs/seq/32k.yaml --config configs/graphs.yaml \
          --model.residual_dtype=$r --trainer.max_steps=$steps --trainer.limit_val_batches=0 \
          --trainer.enable_progress_bar=false --trainer.callbacks.skip_steps=3 --trainer.default_root_dir="$dir" > "$dir/train.log" 2>&1
        echo "residual $r, $steps steps rc=$?: $(grep -h 'fit summary' "$dir/train.log" \
          | grep -oE '"(median_step_ms|median_mfu|peak_alloc_gib)": [0-9.]+' | tr '\n' ' ' || tail -n 3 "$dir/train.log")"
        kill $smi; wait $smi 2> /dev/null
        events=$(find "$dir" -name 'events.out.tfevents.*' | head -n 1)
        [ -n "$events" ] && python3 scripts/clock_windows.py "$(dirname "$events")" "$dir/smi.csv" 50
      done ;;
    fusedab)  # longctx/fused.py's kernels (1) against the plain expressions (0), eager: a 32K step's profile, a 1M step
      for f in 0 1; do
        echo "LONGCTX_FUSED=$f"
        LONGCTX_FUSED=$f python3 scripts/profile_step.py 32768 dilated 2>&1 | grep -v -i warn | head -n 12
        LONGCTX_FUSED=$f DEFAULTS=1m bash scripts/gpu_check.sh defaults 2>&1 | grep "^1m"
      done ;;
    combprobe) python3 scripts/combine_probe.py 2>&1 | tee "$OUT/combine_probe.txt" ;;
    capture) python3 -m pytest -q -x tests/test_gpu.py -k capture 2>&1 | tail -n 60
      for order in fresh eager eager-sync; do for b in cudnn flash; do
        LONGCTX_CUDA_ATTENTION=$b python3 scripts/capture_probe.py $order 2>&1 | tail -n 1
      done; done ;;
    strided)  # strided pieces against gathers for the r = 4 branch (3 views, or 1 gather), one GPU
      for n in 3 2; do
        LONGCTX_MAX_STRIDED_PIECES=$n python3 -m longctx.benchmark --preset long --lengths 65536 262144 1048576 \
          --modes fwd+bwd --variants improved_dilated --warmup 1 --repeats 5 --out "$OUT/ab$n" > "$OUT/ab$n.log" 2>&1
        echo "LONGCTX_MAX_STRIDED_PIECES=$n"; grep -E "^\s+improved" "$OUT/ab$n.log"
      done ;;
    compare)  # issue 7 target 4 with torch.compile: dilated vs dense in one run, 32K and 128K
      for c in "improved-32k 25 --config configs/seq/32k.yaml" \
               "dense-32k 25 --config configs/seq/32k.yaml --model.segment_lengths=[32768] --model.dilation_rates=[1]" \
               "improved-128k 14 --config configs/seq/128k.yaml" \
               "dense-128k 12 --config configs/seq/128k.yaml --model.segment_lengths=[131072] --model.dilation_rates=[1]"; do
        set -- $c; name=$1 steps=$2; shift 2
        timeout 300 python3 train.py fit --config configs/longnet.yaml "$@" --model.compile=true --trainer.max_steps=$steps \
          --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false --trainer.callbacks.skip_steps=8 \
          --trainer.callbacks.peak_tflops=989.4 --trainer.default_root_dir="$OUT/cmp" ${CMP_EXTRA:-} > "$OUT/cmp-$name.log" 2>&1
        echo "compiled $name rc=$?: $(grep -h 'fit summary' "$OUT/cmp-$name.log" || grep -h -m3 -E 'Error|error' "$OUT/cmp-$name.log")"
      done ;;
    ckptgraph)  # CUDA graphs with activation checkpointing (configs/seq/128k.yaml as shipped; run 30 failed)
      timeout 300 python3 train.py fit --config configs/longnet.yaml --config configs/seq/128k.yaml --model.compile=true \
        --model.compile_mode=reduce-overhead --trainer.max_steps=12 --trainer.limit_val_batches=0 \
        --trainer.enable_progress_bar=false --trainer.callbacks.skip_steps=6 --trainer.callbacks.peak_tflops=989.4 \
        --trainer.default_root_dir="$OUT/cmp" > "$OUT/ckptgraph-128k.log" 2>&1
      echo "128K checkpointed, CUDA graphs rc=$?: $(grep -h 'fit summary' "$OUT/ckptgraph-128k.log" || grep -h -m3 -E 'Error|error' "$OUT/ckptgraph-128k.log")" ;;
    stepprof)  # issue 7 target 4: where a training step's GPU time goes, dilated and dense
      IFS=';' read -ra runs <<< "${STEPPROF:-32768 dilated compile;32768 dilated graphs;32768 dense compile;32768 dense graphs}"
      for a in "${runs[@]}"; do  # a run's leading NAME=value words are its environment (LONGCTX_FUSED=0 …)
        vars=(); args=()
        for w in $a; do if [[ $w == *=* ]]; then vars+=("$w"); else args+=("$w"); fi; done
        env "${vars[@]}" python3 scripts/profile_step.py "${args[@]}" 2>&1 | tee -a "$OUT/stepprof.txt" | grep -v Warning
      done ;;
    ncu)  # Nsight Compute on each local pass of the union kernels (64K, long preset): where the warps stall
      # (details and raw metrics of all passes in two files, each pass's SASS with its stall samples as CSV)
      for k in ${NCU_PASSES:-fwd dq dkdv}; do
        ncu --clock-control none -k regex:_${k}_local --launch-skip 1 --launch-count 1 --import-source no \
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
          --section Occupancy --section LaunchStats --section InstructionStats --section SourceCounters \
          -f -o /tmp/ncu-$k python3 scripts/ncu_union.py $k > /tmp/ncu-$k.log 2>&1 || tail -n 5 /tmp/ncu-$k.log
        ncu -i /tmp/ncu-$k.ncu-rep --page details 2>&1 | tee -a "$OUT/ncu_details.txt" \
          | grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|Registers Per|Achieved Occ"
        ncu -i /tmp/ncu-$k.ncu-rep --page raw >> "$OUT/ncu_raw.txt" 2>&1
        ncu -i /tmp/ncu-$k.ncu-rep --page source --csv --print-source sass > "$OUT/ncu-$k-sass.csv" 2>&1
      done ;;
    *) echo "unknown stage $s" ;;
  esac
done
