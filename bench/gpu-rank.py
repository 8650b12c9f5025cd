"""A real engine process for the GPU check: holds 8 GiB on its GPU and stays up.

Run by `bench/gpu-check-deploy.sh` through Tessera's command engine, which sets RANK and
CUDA_VISIBLE_DEVICES from the placement.
"""
import os
import time

import torch

x = torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print(
    f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} on {torch.cuda.get_device_name(0)}, "
    f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
    f"holding {x.numel() / 2**30:.0f} GiB",
    flush=True,
)
while True:
    time.sleep(1)
