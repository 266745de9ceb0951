#!/usr/bin/env bash
# The GPU machine's checks and benchmarks, in phases that each fit one device command.
#
#   bash benchmarks/gpu_suite.sh tests    # `gpu` tests + GPU encoder tests
#   bash benchmarks/gpu_suite.sh suite    # the whole test suite: on a GPU machine, tests that are
#                                         # not `gpu`-marked take the GPU route too (device auto,
#                                         # a local Ray that sees the GPU)
#   bash benchmarks/gpu_suite.sh kernel   # benchmarks/gpu_encode.py, d x PQ bytes grid, 1M rows
#   bash benchmarks/gpu_suite.sh e2e      # pipeline_throughput.py on the GPU and CPU-only
#   bash benchmarks/gpu_suite.sh scaling  # scaling.py 1/2/4/8 CPU workers + memory.py
#   bash benchmarks/gpu_suite.sh train    # train.py: faiss's PQ training, vecpress's parallel one, GPU k-means
#   bash benchmarks/gpu_suite.sh additive # rq_train.py: RQ16x8, RQ64x8 and LSQ8x8 trained on the CPU and the GPU
#   bash benchmarks/gpu_suite.sh served   # served.py: vecpress's LanceDB index build against create_index
#                                         # (accelerator="cuda"), and with 1/2/4/8/16 tasks at once
#
# Results go to ${RESULTS:-benchmarks/results}; logs beside them. Needs faiss-gpu, CuPy, Ray,
# pylance and lancedb importable (see ../shared/gpu/README.md for an offline machine).
set -uo pipefail
phase=${1:?phase: tests | suite | kernel | e2e | scaling | train | additive | served}
results=${RESULTS:-benchmarks/results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 LANCE_LOG=error
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "$phase" in
  tests)
    # with faiss-gpu alone staged (no Ray, Lance or Prefect there), the kernels' GPU tests only
    where="tests/" extra=tests/pipeline/distributed/test_gpu_pool.py
    if ! $py -c "import ray, lance, lancedb, prefect" 2>/dev/null; then
      where=tests/kernels extra=""
      echo "Ray, Lance, LanceDB or Prefect missing: the kernels' GPU tests only"
    fi
    $py -m pytest -q -p no:cacheprovider -m gpu --slow $where 2>&1 | tee "$results/gpu_tests.log" | tail -25
    $py -m pytest -q -p no:cacheprovider --slow tests/kernels/test_gpu_encode.py $extra 2>&1 \
      | tee -a "$results/gpu_tests.log" | tail -8
    ;;
  suite)
    $py -m pytest -q -p no:cacheprovider --slow tests/ 2>&1 | tee "$results/gpu_suite_tests.log" | tail -25
    ;;
  kernel)
    $py benchmarks/gpu_encode.py --results "$results/gpu_encode.json" ${KERNEL_ARGS:-} 2>&1 \
      | tee "$results/gpu_encode.log" | grep -v "^done"
    ;;
  e2e)
    work=${WORK:-/tmp/vecpress-e2e}
    args="--rows ${ROWS:-1000000} --dim 768 --files 16 --codec PQ96 --metric l2 --shard-rows 65536 --workdir $work"
    $py benchmarks/pipeline_throughput.py $args --device auto --results "$results/pipeline_throughput_gpu.json" \
      2>&1 | tee "$results/pipeline_throughput_gpu.log" | tail -20
    $py benchmarks/pipeline_throughput.py $args --device cpu --results "$results/pipeline_throughput_cpu.json" \
      2>&1 | tee "$results/pipeline_throughput_cpu.log" | tail -18
    ;;
  scaling)
    $py benchmarks/scaling.py --rows 480000 --dim 384 --files 16 --shard-rows 16384 --device cpu \
      --results "$results/scaling.json" 2>&1 | tee "$results/scaling.log" | tail -8
    $py benchmarks/memory.py --sizes 20000,200000 --dim 768 --results "$results/memory.json" 2>&1 \
      | tee "$results/memory.log" | tail -6
    ;;
  train)
    $py benchmarks/train.py --dims 384,768 --specs "PQ48;PQ64;PQ96" --results "$results/train.json" 2>&1 \
      | tee "$results/train.log" | grep -v "^WARNING"
    ;;
  additive)
    for run in "RQ16x8 300000 768 50000 vecpress,vecpress-gpu,faiss-gpu" \
               "RQ64x8 100000 768 20000 vecpress,vecpress-gpu" "LSQ8x8 20000 384 5000 vecpress,vecpress-gpu"; do
      set -- $run
      $py benchmarks/rq_train.py --codec $1 --rows $2 --dim $3 --base-rows $4 --variants $5 --timeout ${TIMEOUT:-150} \
        --results "$results/train_$1_gpu.json" 2>&1 | tee "$results/train_$1_gpu.log" | grep -v "^WARNING"
    done
    ;;
  served)
    $py benchmarks/served.py --rows ${ROWS:-1000000} --dim 768 --partitions 1024 --sub-vectors 96 --files 16 \
      --accelerator cuda --workers 1,2,4,8,16 --results "$results/served_gpu.json" 2>&1 \
      | tee "$results/served_gpu.log" | grep "^|"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
