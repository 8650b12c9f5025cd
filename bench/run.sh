#!/usr/bin/env bash
# Re-measures every number in BENCHMARKS.md on this machine (release build). Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
B=target/release/tessera-bench
$B failure --runs 10
$B idle-rss
$B plan --runs 20
$B deploy --runs 10
$B head-restart --runs 5
$B head-pause --runs 2
$B bring-up --runs 5
$B metrics-scrape --runs 1000
$B ha failover --runs 5
$B ha store --runs 10
target/release/tessera-sim --nodes 10000 --steady 30 --creates 20 --ha --json bench/sim-10000-ha.json
for n in 100 1000 5000 10000; do
  target/release/tessera-sim --nodes "$n" --steady 10 --creates 100 --json "bench/sim-$n.json"
done
if python3 -c "import matplotlib" 2>/dev/null; then
  python3 bench/plot.py bench/sim-100.json bench/sim-1000.json bench/sim-5000.json bench/sim-10000.json
else
  echo "matplotlib is not installed: pip install matplotlib, then python3 bench/plot.py bench/sim-*.json"
fi
echo "partition timings: cargo test --release -p tessera-tests --test partition -- --nocapture"
