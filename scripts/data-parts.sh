#!/usr/bin/env bash
# Here (not on the device): split the CIFAR-10 training zip into parts that fit device calls beside the checkout
# (a call's working tree is limited to 64 MiB; the checkout takes about 50 MiB and `.whl` 6 MiB). The first part
# (8 MiB) travels with `.whl` and `.data/parts/manifest`; the others (14 MiB each) one per later call. Ignored
# files already on the warm machine stay there, and scripts/gpu-train.sh joins the parts (checking the manifest's
# sha256) once all have arrived.
#   bash scripts/data-parts.sh [ZIP]     # default ../shared/data/cifar10-mosaic/train.zip
set -e
ZIP=$(realpath "${1:-../shared/data/cifar10-mosaic/train.zip}")
mkdir -p .data/parts
rm -f .data/parts/train.zip.part* .data/parts/manifest
head -c 8M "$ZIP" > .data/parts/train.zip.part00
tail -c +$((8 * 1024 * 1024 + 1)) "$ZIP" | split -b 14M -d -a 2 --numeric-suffixes=1 - .data/parts/train.zip.part
n=$(ls .data/parts/train.zip.part* | wc -l)
{ echo "$n"; sha256sum < "$ZIP" | cut -d' ' -f1; } > .data/parts/manifest
ls -l .data/parts
