#!/usr/bin/env bash
# The short GPU measurements that decide the next kernel and sampling work, each under its own timeout, alone on
# the GPU (start no experiment job beside them). Everything lands in $OUT/probes.tgz (the device returns at most
# 8 files): unpack with `tar xzf probes.tgz` and move each part to its results folder.
#
# Usage (device): source scripts/gpu-setup.sh; export GACQ_COMMIT=<sha>; bash scripts/gpu-probes.sh $OUT STEP...
#   probe     benchmarks/probe_int_mm.py: which torch._int_mm shapes and layouts cuBLAS takes, exact?, TOPS  (~20 s)
#   convpaths benchmarks/probe_conv_paths.py: 3x3 convs as im2col + cuBLAS int8 (NT) / FP8, cuDNN int8, vs bf16 (~1 min)
#   tests     the GPU-only tests (Triton kernels compiled, int8 cuBLAS layers, GAC's CUDA graph)            (~100 s)
#   tiles     benchmarks/tune_conv_tiles.py --grid quick: tile sweep of the implicit-GEMM convs vs cuDNN   (~3-5 min)
#   bench     gacq bench on ddpm-cifar10, no compile, with --kernels (per-layer TOPS and GEMM peaks)          (~4 min)
#   small     gacq bench on the `small` config (the bundled model's), no compile, with 100-step sampling     (~4 min)
#   compiled  gacq bench on ddpm-cifar10 at batch 1 and 256: bf16 and the exports under torch.compile       (~5-8 min)
#   fq        gacq bench on the bundled `small` config at batch 1000: fake quant W8A8, fused against unfused  (~1 min)
#   parallel  benchmarks/parallel_throughput.py: 1, 2 and 4 W4A8 samplings of 2,000 images at once         (~5 min)
#   dit       before issue 9's DiT-S session (its scripts/gpu-dit-session.sh was removed in session 17): the real DiT-S training command (bf16, compiled)
#             for 1.5 min on 2,000 random images (a speed and compile check; the data has not arrived yet), then
#             experiments/dit-probe.toml on it (FP and GAC W4A8 cells, 2,000 guided samples, 100-iteration
#             reconstruction): its cells' wall times size the real session                                 (~4 min)
# Calls that fit the 10-minute limit: `probe convpaths tests bench`, `tiles fq`, `parallel`, `small`, `compiled`.
set -u
OUT=$1; shift
P=$OUT/probes
mkdir -p "$P"
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    probe) timeout 90 python benchmarks/probe_int_mm.py --out "$P/int_mm" > "$P/int_mm.log" 2>&1 ;;
    convpaths) timeout 150 python benchmarks/probe_conv_paths.py --out "$P/conv_paths" > "$P/conv_paths.log" 2>&1 ;;
    tests) GACQ_TRITON_DEVICE=cuda timeout 300 python -m pytest -q -p no:cacheprovider -k cuda --durations=10 \
             tests/test_triton_w4.py tests/test_export.py tests/quant/test_gac.py > "$P/gpu_tests.log" 2>&1 ;;
    tiles) timeout 270 python benchmarks/tune_conv_tiles.py --grid quick --out "$P/tiles" > "$P/tiles.log" 2>&1 ;;
    bench) timeout 300 python -m gacq bench --config ddpm-cifar10 --no-compile \
             --modes "bf16,int8 W8A8,w4a8,w4a16 W4A16" --kernels --out "$P/bench" > "$P/bench.log" 2>&1 ;;
    small) timeout 330 python -m gacq bench --config small --no-compile --sample-steps 100 \
             --modes "bf16,int8 W8A8,w4a8,w4a16 W4A16" --out "$P/bench_small" > "$P/bench_small.log" 2>&1 ;;
    compiled) timeout 540 python -m gacq bench --config ddpm-cifar10 --batch-sizes 1,256 --modes compiled \
             --out "$P/bench_compiled" > "$P/bench_compiled.log" 2>&1 ;;
    fq) timeout 150 python -m gacq bench --config small --no-compile --no-graphs --batch-sizes 1000 --repeats 10 \
          --modes "fake-quant W8A8,fake-quant W4A8" --out "$P/fq" > "$P/fq.log" 2>&1 ;;
    parallel)
      timeout 120 python -m gacq quantize --method rtn --wbits 4 --abits 8 --device cuda --out runs/probe-rtn-w4a8 \
        > "$P/parallel_quantize.log" 2>&1
      timeout 400 python benchmarks/parallel_throughput.py --procs 1,2,4 --out "$P/parallel" -- \
        python -m gacq sample --model runs/probe-rtn-w4a8 --num 2000 --steps 100 --batch-size 1000 --seed '{i}' \
        --device cuda --out '{dir}' > "$P/parallel.log" 2>&1 ;;
    dit)
      python -c "import numpy as np; g = np.random.default_rng(0); np.savez('runs/dit-probe-data.npz', \
        images=g.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8), labels=g.integers(0, 10, 2000))"
      timeout 200 python -m gacq train --data runs/dit-probe-data.npz --config dit-s --out runs/dit-probe --device cuda \
        --bf16 --compile --batch-size 256 --label-dropout 0.1 --time-budget 1.5 --log-every 50 > "$P/dit_train.log" 2>&1
      cp runs/dit-probe/log.jsonl "$P/dit_train_log.jsonl" 2>/dev/null
      timeout 300 python -m gacq experiment run experiments/dit-probe.toml --parallel 2 --quiet \
        --results "$P/dit_probe" > "$P/dit_probe.log" 2>&1
      cp -r runs/experiments/dit-probe/logs "$P/dit_probe_logs" 2>/dev/null ;;
    *) echo "unknown step $step (probe convpaths tests tiles bench small compiled fq parallel dit)"; continue ;;
  esac
  echo "$step: rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$P/steps.txt"
done
tar czf "$OUT/probes-$(date +%H%M%S).tgz" -C "$OUT" probes && rm -rf "$P"
