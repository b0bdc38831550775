#!/usr/bin/env bash
# Here, between device calls of scripts/gpu-dit-call.sh: join the checkpoint parts a call returned ($OUT/q/q.tgz.*,
# under the run's files_at) into .data/q.tgz for the next cells call to carry (carry [".whl", ".data/q.tgz"]),
# keeping only the named quantization jobs (default: all). A call's working tree travels in 64 MiB: with the stash
# out and .whl, about four W4 checkpoints of the bundled UNet fit; the script says the size.
#   bash scripts/gpu-q-carry.sh FILES_AT/q [JOB ...]     e.g. ... /work/.device/3/q gac_w4a8_steps100 tfmq_w4a8_steps100
set -eu
[ $# -ge 1 ] || { echo "usage: gpu-q-carry.sh PARTS_FOLDER [JOB ...]"; exit 2; }
PARTS=$1; shift
ls "$PARTS"/q.tgz.* > /dev/null 2>&1 || { echo "gpu-q-carry: no q.tgz.* parts in $PARTS (a call's \$OUT/q)"; exit 1; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
cat "$PARTS"/q.tgz.* | tar xzf - -C "$T"
HAVE=$(ls "$T/q")
for job in "$@"; do
  [ -f "$T/q/$job/quant_config.json" ] || { echo "gpu-q-carry: no checkpoint $job in the parts (they hold: $(echo $HAVE))"; exit 1; }
done
JOBS=${*:-$HAVE}
mkdir -p .data
tar czf .data/q.tgz.tmp -C "$T" $(for j in $JOBS; do echo "q/$j"; done) && mv .data/q.tgz.tmp .data/q.tgz
echo "gpu-q-carry: .data/q.tgz holds $(echo $JOBS) ($(du -h .data/q.tgz | cut -f1)); carry [\".whl\", \".data/q.tgz\"]"
