#!/usr/bin/env bash
# Data-parallel step times at 1, 2 and 3 ranks on this machine, over TCP on loopback, for a
# flat 32M-element arena and GPT-2 small's layout (AdamW, f32), replicated and ZeRO-1. Beside
# the analytic bytes each rank sends per step, it reports what the loopback interface counted
# (all ranks' TCP payload and headers, divided by ranks and steps), so the two can be compared.
#
#   scripts/distributed_bench.sh [steps]      (needs Open MPI; see README "Data parallel")
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-10}"
cargo build --release --features mpi --example distributed_bench
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
lo_tx() { awk '/^ *lo:/ { print $10 }' /proc/net/dev; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
for layout in flat gpt2; do
  for n in 1 2 3; do
    before=$(lo_tx)
    out=$(mpirun -np "$n" --oversubscribe --mca btl self,tcp --mca btl_tcp_if_include lo \
      target/release/examples/distributed_bench -- "$layout" "$steps")
    after=$(lo_tx)
    echo "$out"
    # Two modes, steps + 2 warm-up steps each, every rank sending.
    echo "layout=$layout ranks=$n loopback_tx_bytes_per_rank_per_step=$(( (after - before) / (n * 2 * (steps + 2)) ))"
  done
done
