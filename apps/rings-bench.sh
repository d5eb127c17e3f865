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
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
for ((r = 1; r <= rounds; r++)); do
  out=$("$bin/uvirtio-bench" rings --batch "$batch" --seconds 1 --dpdk-seconds 5)
  # cache RT, bare, split, packed, split in-order, packed in-order, dpdk (M/s)
  row=$(awk -v b="$batch" '
    /^cache-line round trip/ { rt = $4; bare = $(NF-2) }
    /^split ring,/ { sec = "split" } /^packed ring,/ { sec = "packed" }
    /^split ring \(/ { sec = "split_io" } /^packed ring \(/ { sec = "packed_io" } /^DPDK testpmd/ { sec = "dpdk" }
    $1 == b && sec != "" { v[sec] = $2 }
    END { printf "%s %s %s %s %s %s %s", rt, bare, v["split"], v["packed"], v["split_io"], v["packed_io"], v["dpdk"] }' <<<"$out")
  read -r rt bare split packed split_io packed_io dpdk <<<"$row"
  if [ -z "$dpdk" ]; then
    # uvirtio-bench said why on stderr; the round still counts for the bare ring.
    echo "round $r: cache RT ${rt} ns | bare ${bare} | split ${split} | packed ${packed}" \
      "| DPDK failed this round | split/bare $(ratio "$split" "$bare") packed/bare $(ratio "$packed" "$bare")"
    rows+=("$rt $bare $split $packed - $split_io $packed_io")
    continue
  fi
  echo "round $r: cache RT ${rt} ns | bare ${bare} | split ${split} | packed ${packed}" \
    "| in order: split ${split_io} packed ${packed_io} | DPDK ${dpdk} (M/s)" \
    "| split/DPDK $(ratio "$split" "$dpdk") packed/DPDK $(ratio "$packed" "$dpdk")" \
    "split/bare $(ratio "$split" "$bare") packed/bare $(ratio "$packed" "$bare")" \
    "| in order: split/DPDK $(ratio "$split_io" "$dpdk") packed/DPDK $(ratio "$packed_io" "$dpdk")"
  rows+=("$rt $bare $split $packed $dpdk $split_io $packed_io")
done
median() { sort -n | awk '{v[NR]=$1} END {if (NR == 0) print "null"; else print v[int((NR + 1) / 2)]}'; }
# The median of EXPR over the rounds; with "dpdk", over those whose DPDK run
# worked (a failed one has '-' in column 5). "null" when there is none.
col() {
  printf '%s\n' "${rows[@]}" | awk -v need="${2:-}" "need == \"\" || \$5 != \"-\" {printf \"%.3f\\n\", $1}" | median
}
sd=$(col '$3/$5' dpdk) pd=$(col '$4/$5' dpdk) sb=$(col '$3/$2') pb=$(col '$4/$2')
sid=$(col '$6/$5' dpdk) pid=$(col '$7/$5' dpdk)
echo "median of $rounds rounds, batch $batch: split/DPDK $sd, packed/DPDK $pd (goal >= 2);" \
  "split/bare $sb, packed/bare $pb (goal >= 0.5);" \
  "with VIRTIO_F_IN_ORDER (which DPDK's pair negotiates): split/DPDK $sid, packed/DPDK $pid"
echo "{\"batch\": $batch, \"rounds\": $rounds, \"split_vs_dpdk\": $sd, \"packed_vs_dpdk\": $pd, \"split_vs_bare\": $sb, \"packed_vs_bare\": $pb, \"split_in_order_vs_dpdk\": $sid, \"packed_in_order_vs_dpdk\": $pid}"
