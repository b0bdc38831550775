#!/usr/bin/env bash
# Here, around a device call of scripts/gpu-dit-call.sh: a call's working tree (tracked and untracked-not-ignored
# files plus what it carries) is limited to 64 MiB, and the checkout alone takes 55 MiB. The DiT calls need neither
# the bundled UNet (17 MiB), nor the test split's feature statistics (8 MiB; the cells are measured against the
# training split's), nor results/ other than the spec's own folder (14 MiB), so `out` moves those into the ignored
# folder .stash/ and `in` moves them back. Run `in` right after the call (git status must then be clean again).
#   [MODELS=keep] [UNET=keep] bash scripts/gpu-dit-stash.sh out|in [KEEP]
#   KEEP: the results folder that stays (results/experiments/dit-s6-cifar10)
set -eu
cd "$(dirname "$0")/.."
KEEP=${2:-results/experiments/dit-s6-cifar10}
S=.stash
grep -qx '/.stash/' .git/info/exclude 2>/dev/null || echo /.stash/ >> .git/info/exclude
# MODELS=keep keeps models/ (the shipped DiT's parts); UNET=keep keeps the bundled UNet (specs on the bundled model)
FILES="gacq/assets/cifar10-features/stats_test.npz"
[ "${UNET:-}" = keep ] || FILES="$FILES gacq/assets/cifar10-small/unet/diffusion_pytorch_model.safetensors"
[ "${MODELS:-}" = keep ] || FILES="$FILES models"
case $1 in
  out)
    [ -e $S ] && { echo "gpu-dit-stash: $S exists: run 'in' first"; exit 1; }
    mkdir -p $S
    # git is told to ignore the moved files' absence (skip-worktree), so that a `git add -A` / `git commit -a` while
    # they are out stages no deletion (session 27 committed the bundled UNet's deletion so, and restored it after)
    git ls-files -z $FILES results | xargs -0 -r git update-index --skip-worktree
    for f in $FILES; do mkdir -p "$S/$(dirname "$f")"; mv "$f" "$S/$f"; done
    echo "$FILES" > $S/files
    mv results $S/results
    if [ -d "$S/$KEEP" ]; then mkdir -p "$(dirname "$KEEP")"; cp -r "$S/$KEEP" "$KEEP"; fi
    echo "stashed; the working tree now holds $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes of tracked files"
    ;;
  in)
    [ -d $S ] || { echo "gpu-dit-stash: nothing stashed"; exit 1; }
    STASHED=$(cat $S/files)
    for f in $STASHED; do mv "$S/$f" "$f"; done
    # what the call's results brought into KEEP since stays (it is newer than the stashed copy)
    if [ -d "$KEEP" ]; then cp -rn "$S/$KEEP/." "$KEEP/" 2>/dev/null || true; rm -rf "$S/$KEEP"; fi
    mkdir -p results && cp -rn $S/results/. results/ && rm -rf $S
    git ls-files -z $STASHED results | xargs -0 -r git update-index --no-skip-worktree  # what `out` marked
    git status --short | head
    ;;
  *) echo "usage: gpu-dit-stash.sh out|in"; exit 2 ;;
esac
