#!/usr/bin/env bash
# Benchmark: uvirtio's split and packed rings (driver thread <-> device
# thread) against DPDK testpmd's virtio-user -> vhost-user pair and the bare
# SPSC ring, at one batch (burst) size, ROUNDS times. Each round is one
# `uvirtio-bench rings` run, so its ratios compare figures of the same run;
# the summary is the median of the per-round ratios (the two vCPUs here move
# between placements whose cache-line round trip differs ~5x, so figures of
# different rounds are not comparable, ratios are).
#   bash apps/rings-bench.sh [BIN_DIR] [ROUNDS] [BATCH]
# Goal (issue 4, batch 32): >= 2x DPDK's packets/s and >= 0.5x the bare ring.
set -euo pipefail
bin=${1:-build/bin}
rounds=${2:-5}
batch=${3:-32}
[ -x "$bin/uvirtio-bench" ] || { echo "no $bin/uvirtio-bench: build first" >&2; exit 2; }
command -v dpdk-testpmd >/dev/null || { echo "dpdk-testpmd not installed (Debian package dpdk-dev)" >&2; exit 77; }
rows=()
for ((r = 1; r <= rounds; r++)); do
  out=$("$bin/uvirtio-bench" rings --batch "$batch" --seconds 1 --dpdk-seconds 5)
  # cache RT, bare, split, packed, dpdk (M/s)
  row=$(awk -v b="$batch" '
    /^cache-line round trip/ { rt = $4; bare = $(NF-2) }
    /^split ring/ { sec = "split" } /^packed ring/ { sec = "packed" } /^DPDK testpmd/ { sec = "dpdk" }
    $1 == b && sec != "" { v[sec] = $2 }
    END { printf "%s %s %s %s %s", rt, bare, v["split"], v["packed"], v["dpdk"] }' <<<"$out")
  read -r rt bare split packed dpdk <<<"$row"
  echo "round $r: cache RT ${rt} ns | bare ${bare} | split ${split} | packed ${packed} | DPDK ${dpdk} (M/s)" \
    "| split/DPDK $(awk -v a="$split" -v b="$dpdk" 'BEGIN{printf "%.2f", a/b}')" \
    "packed/DPDK $(awk -v a="$packed" -v b="$dpdk" 'BEGIN{printf "%.2f", a/b}')" \
    "split/bare $(awk -v a="$split" -v b="$bare" 'BEGIN{printf "%.2f", a/b}')" \
    "packed/bare $(awk -v a="$packed" -v b="$bare" 'BEGIN{printf "%.2f", a/b}')"
  rows+=("$rt $bare $split $packed $dpdk")
done
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR + 1) / 2)]}'; }
col() { printf '%s\n' "${rows[@]}" | awk "{printf \"%.3f\\n\", $1}" | median; }
sd=$(col '$3/$5') pd=$(col '$4/$5') sb=$(col '$3/$2') pb=$(col '$4/$2')
echo "median of $rounds rounds, batch $batch: split/DPDK $sd, packed/DPDK $pd (goal >= 2);" \
  "split/bare $sb, packed/bare $pb (goal >= 0.5)"
echo "{\"batch\": $batch, \"rounds\": $rounds, \"split_vs_dpdk\": $sd, \"packed_vs_dpdk\": $pd, \"split_vs_bare\": $sb, \"packed_vs_bare\": $pb}"
