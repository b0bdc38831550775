#!/usr/bin/env bash
# Here (not on the device): split the CIFAR-10 training zip into parts that fit device calls beside the checkout.
# A call's working tree is limited to 64 MiB and the tracked files take most of it (50 MiB in session 10), so the
# part sizes are computed from the checkout as it is now, with 1 MiB to spare: the first part travels with `.whl`
# and `.data/parts/manifest`, the others one per later call. Ignored files already on the warm machine stay there,
# and scripts/gpu-train.sh joins the parts (checking the manifest's sha256) once all have arrived.
#   bash scripts/data-parts.sh [ZIP]     # default ../shared/data/cifar10-mosaic/train.zip
set -e
ZIP=$(realpath "${1:-../shared/data/cifar10-mosaic/train.zip}")
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
whl=$(cat .whl/*.whl 2>/dev/null | wc -c)
free=$(( 64 * 1024 * 1024 - tracked - 1024 * 1024 ))
first=$(( free - whl )); rest=$free
[ "$first" -gt 1048576 ] || { echo "data-parts: only $first bytes free beside the checkout and .whl"; exit 1; }
mkdir -p .data/parts
rm -f .data/parts/train.zip.part* .data/parts/manifest
head -c "$first" "$ZIP" > .data/parts/train.zip.part00
tail -c +$(( first + 1 )) "$ZIP" | split -b "$rest" -d -a 2 --numeric-suffixes=1 - .data/parts/train.zip.part
n=$(ls .data/parts/train.zip.part* | wc -l)
{ echo "$n"; sha256sum < "$ZIP" | cut -d' ' -f1; } > .data/parts/manifest
echo "checkout $tracked bytes, .whl $whl bytes: first part $first bytes, then parts of $rest bytes"
ls -l .data/parts
