"""Saves the model in SRC again into DST as several safetensors shards (about one decoder layer a
file, with model.safetensors.index.json), the same weights, with SRC's tokenizer and configs: the
checkpoint that stage-aware weight staging splits between pipeline stages.
Usage: VENV/bin/python shard_model.py SRC DST
"""
import os, shutil, sys
import torch
from transformers import LlamaForCausalLM

src, dst = sys.argv[1], sys.argv[2]
tmp = dst + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
model = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
model.save_pretrained(tmp, safe_serialization=True, max_shard_size="300KB")
for f in os.listdir(src):
    if not f.endswith(".safetensors") and not f.endswith(".json.index") and not os.path.exists(os.path.join(tmp, f)):
        shutil.copy(os.path.join(src, f), os.path.join(tmp, f))
shutil.rmtree(dst, ignore_errors=True)
os.rename(tmp, dst)
print(sorted(os.listdir(dst)))
