#!/usr/bin/env bash
# One-shot GPU check for issue 2: real NVML inventory, and a head whose in-process worker reports
# the real GPU (and its memory use while a PyTorch process holds 20 GiB).
set -x
nvidia-smi -L
nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,pci.bus_id,driver_version --format=csv
${BIN:-./devbin}/tessera-worker inventory
${BIN:-./devbin}/tessera-worker inventory -o json | tee $OUT/inventory.json
mkdir -p /tmp/h
${BIN:-./devbin}/tessera-head --listen 127.0.0.1:0 --data-dir /tmp/h --node-name gpu-head > $OUT/head.log 2>&1 &
HEADPID=$!
for i in $(seq 50); do [ -s /tmp/h/head.addr ] && break; sleep 0.1; done
H=http://$(cat /tmp/h/head.addr)
sleep 1
${BIN:-./devbin}/tessera --head $H nodes
${BIN:-./devbin}/tessera --head $H status
python3 -c "import torch,time; x=torch.empty(int(20*2**30),dtype=torch.uint8,device='cuda'); print('allocated 20GiB', flush=True); time.sleep(12)" &
PY=$!
sleep 10
nvidia-smi --query-gpu=memory.used --format=csv
${BIN:-./devbin}/tessera --head $H nodes -o json | tee $OUT/nodes.json
wait $PY
kill -TERM $HEADPID; wait $HEADPID; echo "head exit $?"
tail -5 $OUT/head.log
