#!/usr/bin/env bash
# pack-out.sh SRC NAME: tar SRC into $OUT/NAME.tar.part-* pieces of 15 MB (device returns <=16 MiB a file).
# Unpack here with: cat NAME.tar.part-* | tar x
set -e
tar -C "$(dirname "$1")" -cf - "$(basename "$1")" | split -b 15M - "$OUT/$2.tar.part-"
