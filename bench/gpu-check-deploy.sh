#!/usr/bin/env bash
# GPU check for issue 4: a real engine process on a real GPU, placed, supervised, restarted and
# deleted by Tessera (command engine; vLLM is not installed on the device machine).
# Usage: BIN=dir-with-release-binaries bash bench/gpu-check-deploy.sh   (writes to $OUT if set)
set -x
B=${BIN:-./devbin}
OUT=${OUT:-/tmp}; mkdir -p $OUT
rm -rf /tmp/h; mkdir -p /tmp/h
$B/tessera-head --listen 127.0.0.1:0 --data-dir /tmp/h --node-name gpu-head --allow-command --orphan-timeout 5s > $OUT/head.log 2>&1 &
HEADPID=$!
for i in $(seq 50); do [ -s /tmp/h/head.addr ] && break; sleep 0.1; done
H=http://$(cat /tmp/h/head.addr); T="$B/tessera --head $H"
sleep 1
$T nodes
M=examples/model-configs/Llama-3.1-8B-Instruct.json
$T plan --model $M --tp 1 --pp 1
time $T deploy gpu --model $M --engine command --tp 1 --pp 1 --max-restarts 3 --wait --command "python3 $PWD/bench/gpu-rank.py"
$T get gpu
wait_holding() {  # until the rank has its GPU memory (CUDA start-up takes seconds)
  for i in $(seq 180); do $T logs gpu --rank 0 --tail 20 | grep -q holding && return 0; sleep 0.5; done; return 1
}
SECONDS=0; wait_holding; echo "rank 0 holds its GPU memory ${SECONDS}s after running"
$T logs gpu --rank 0 --tail 5
sleep 6
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
$T nodes -o json | tee $OUT/nodes-running.json | grep memory_used
P=$($T get gpu -o json | python3 -c "import json,sys;print(json.load(sys.stdin)['ranks'][0]['pid'])")
kill -9 $P
SECONDS=0
for i in $(seq 120); do
  S=$($T get gpu -o json | python3 -c "import json,sys;d=json.load(sys.stdin);print(d['state'],d['generation'])")
  [ "$S" = "running 2" ] && break; sleep 0.5
done
echo "kill -9 -> $S after ${SECONDS}s"
wait_holding; echo "generation 2 holds its GPU memory ${SECONDS}s after the kill"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
$T get gpu
$T logs gpu --rank 0 --tail 5
$T events | tail -8
time $T delete gpu
sleep 1
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
echo "gpu-rank processes left: $(pgrep -fc gpu-rank.py)"
kill -TERM $HEADPID; wait $HEADPID; echo "head exit $?"
