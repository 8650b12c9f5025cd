#!/usr/bin/env python3
"""Plots the head's CPU and RSS against the node count from tessera-sim's JSON files.

    python3 bench/plot.py bench/sim-100.json bench/sim-1000.json bench/sim-5000.json bench/sim-10000.json
writes bench/head-scale.png (needs matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def number(s):
    return float(str(s).split()[0].rstrip(","))


rows = []
for path in sys.argv[1:]:
    with open(path) as f:
        d = json.load(f)
    r = d["results"]
    rows.append((d["nodes"], number(r["steady state: head CPU (cores)"]), number(r["steady state: head RSS (MiB)"])))
rows.sort()
nodes = [r[0] for r in rows]
fig, ax1 = plt.subplots(figsize=(7, 4))
ax1.plot(nodes, [r[1] for r in rows], "o-", color="tab:blue", label="head CPU (cores)")
ax1.axhline(0.5, color="tab:blue", linestyle=":", linewidth=1)
ax1.set_xlabel("simulated nodes (8 fake GPUs each, heartbeat every 500 ms)")
ax1.set_ylabel("head CPU, cores (goal < 0.5)", color="tab:blue")
ax2 = ax1.twinx()
ax2.plot(nodes, [r[2] for r in rows], "s-", color="tab:red", label="head RSS (MiB)")
ax2.axhline(300, color="tab:red", linestyle=":", linewidth=1)
ax2.set_ylabel("head RSS, MiB (goal < 300)", color="tab:red")
ax1.set_xscale("log")
plt.title("tessera-head in steady state vs cluster size (2-core machine)")
fig.tight_layout()
out = "bench/head-scale.png"
plt.savefig(out, dpi=110)
print(f"wrote {out}")
