#!/usr/bin/env bash
# Here, between device calls of scripts/gpu-dit-call.sh: join the checkpoint parts a call returned ($OUT/q/q.tgz.*,
# under the run's files_at) into .data/q.tgz for the next cells call to carry (carry [".whl", ".data/q.tgz"]),
# keeping only the named quantization jobs (default: all). A call's working tree travels in 64 MiB: with the stash
# out and .whl, about four W4 checkpoints of the bundled UNet fit; the script says the size.
#   bash scripts/gpu-q-carry.sh FILES_AT/q [JOB ...]     e.g. ... /work/.device/3/q gac_w4a8_steps100 tfmq_w4a8_steps100
# or from checkpoints kept here, in a spec's work folder (its q/JOB folders; e.g. ones a call returned in an earlier
# session, unpacked there):  bash scripts/gpu-q-carry.sh runs/experiments/NAME JOB ...
# A JOB may also be JOB.recon-ckpt: the resume points of a quantization a call's deadline stopped (taken by default
# where the job has no checkpoint); the call that carries them goes on from its last finished unit.
set -eu
[ $# -ge 1 ] || { echo "usage: gpu-q-carry.sh PARTS_FOLDER|WORK_FOLDER [JOB ...]"; exit 2; }
PARTS=$1; shift
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT  # only the joined parts are removed, never a work folder
if ls "$PARTS"/q.tgz.* > /dev/null 2>&1; then
  cat "$PARTS"/q.tgz.* | tar xzf - -C "$TMP"; SRC=$TMP
elif ls "$PARTS"/q/*/quant_config.json > /dev/null 2>&1; then
  SRC=$PARTS  # a work folder: its checkpoints as they are
else
  echo "gpu-q-carry: no q.tgz.* parts (a call's \$OUT/q) and no q/JOB/quant_config.json (a work folder) in $PARTS"; exit 1
fi
# checkpoints, and the resume points (JOB.recon-ckpt with unit files) of quantizations without a checkpoint yet
usable() { [ -f "$SRC/q/$1/quant_config.json" ] || { [[ $1 == *.recon-ckpt ]] \
  && [ ! -f "$SRC/q/${1%.recon-ckpt}/quant_config.json" ] && ls "$SRC/q/$1"/*unit_*.safetensors > /dev/null 2>&1; }; }
HAVE=$(cd "$SRC/q" && for d in *; do if [ -d "$d" ] && usable "$d"; then echo "$d"; fi; done)
for job in "$@"; do
  usable "$job" || { echo "gpu-q-carry: no checkpoint $job in $PARTS (it holds: $(echo $HAVE))"; exit 1; }
done
JOBS=${*:-$HAVE}
mkdir -p .data
tar czf .data/q.tgz.tmp --exclude='.*.tmp' -C "$SRC" $(for j in $JOBS; do echo "q/$j"; done) && mv .data/q.tgz.tmp .data/q.tgz
echo "gpu-q-carry: .data/q.tgz holds $(echo $JOBS) ($(du -h .data/q.tgz | cut -f1)); carry [\".whl\", \".data/q.tgz\"]"
