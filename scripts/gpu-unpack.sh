#!/usr/bin/env bash
# Here, after a device call of scripts/gpu-dit-call.sh (and `gpu-dit-stash.sh in`): unpack the call's call.tgz into
# the spec's results folder and render its report (and results/README.md, the report of every experiment) again.
#   [SPEC=SPEC.toml] bash scripts/gpu-unpack.sh CALL_TGZ RESULTS_FOLDER RUN_NAME [TITLE]
#   e.g. bash scripts/gpu-unpack.sh /work/.device/3/call.tgz results/experiments/cifar10-call-sized 2026-12-03-s20-call1
# The call's result files (cells/, grids/, diagnostics/) join RESULTS_FOLDER without replacing any file already there
# (a finished cell is never overwritten; a GAC profile of a job quantized again replaces the old one, which moves to
# diagnostics/superseded/); its logs (the runner's, each cell's, the GPU monitor, the quant configs and
# GAC's weights) go to RESULTS_FOLDER/runs/RUN_NAME-logs/; the part statistics beside it (p/parts.tgz.*) to .data/parts
# (here, the working directory), for the next call to carry. TITLE defaults to the folder's current report heading.
set -eu
[ $# -ge 3 ] || { echo "usage: gpu-unpack.sh CALL_TGZ RESULTS_FOLDER RUN_NAME [TITLE]"; exit 2; }
TGZ=$1; RES=$2; NAME=$3
[ -f "$TGZ" ] || { echo "gpu-unpack: no such file $TGZ (the call's \$OUT/call.tgz, under the run's files_at)"; exit 1; }
LOGS="$RES/runs/$NAME-logs"
[ -e "$LOGS" ] && { echo "gpu-unpack: $LOGS exists: choose another RUN_NAME (each call unpacks once)"; exit 1; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
tar xzf "$TGZ" -C "$T"
mkdir -p "$RES/runs"
NEW=0
# a GAC profile's weights-file sha (empty when not recorded), and the superseded name's tag (gacq.experiment's rule)
_gac_sha() { python -c 'import json, sys; print(json.load(open(sys.argv[1])).get("gac_weights_sha256") or "")' "$1"; }
_gac_tag() { python -c 'import json, sys; d = json.load(open(sys.argv[1]))
print((d.get("gac_weights_sha256") or "")[:12] or str(d.get("commit") or "unknown")[:12])' "$1"; }
if [ -d "$T/results" ]; then
  rm -f "$T/results"/README*  # the device's report: rendered again below
  while IFS= read -r -d '' f; do
    rel=${f#"$T/results/"}
    if [ ! -e "$RES/$rel" ]; then
      mkdir -p "$(dirname "$RES/$rel")" && mv "$f" "$RES/$rel"
      case $rel in cells/*.json) NEW=$((NEW + 1));; esac
    elif [[ $rel == diagnostics/*.json && $rel != */*/* ]] && [ "$(_gac_sha "$f")" != "$(_gac_sha "$RES/$rel")" ]; then
      # a GAC weight profile of a job quantized again (another weights file): the new one replaces it and the old
      # moves to diagnostics/superseded/ (as gacq.experiment.write_gac_diagnostics does on the device)
      old="$RES/diagnostics/superseded/$(basename "$rel" .json)-$(_gac_tag "$RES/$rel").json"
      mkdir -p "$(dirname "$old")" && mv "$RES/$rel" "$old" && mv "$f" "$RES/$rel"
      echo "gpu-unpack: $RES/$rel is a profile of another quantization run: moved it to $old, took the call's"
    elif ! cmp -s "$f" "$RES/$rel"; then  # never replaced, never dropped: kept beside the logs
      mkdir -p "$(dirname "$T/not-merged/$rel")" && mv "$f" "$T/not-merged/$rel"
      echo "gpu-unpack: $RES/$rel exists and differs: kept it; the call's copy is in $LOGS/not-merged/$rel"
    fi
  done < <(find "$T/results" -type f -print0)
  rm -rf "$T/results"
fi
mkdir -p "$LOGS" && cp -r "$T/." "$LOGS/"
# part statistics of cells sampled in parts ($OUT/p/parts.tgz.* beside call.tgz) join .data/parts for the next call
# to carry; the parts of cells now finished leave it
P=$(dirname "$TGZ")/p
if ls "$P"/parts.tgz.* > /dev/null 2>&1; then
  mkdir -p .data && cat "$P"/parts.tgz.* | tar xzf - -C .data
  echo "gpu-unpack: part statistics in .data/parts: $(find .data/parts -name 'stats_*.npz' | wc -l) ($(for d in \
    .data/parts/*/; do echo "$(basename "$d") $(ls "$d" | grep -c '^stats_')"; done | paste -sd, -))"
  python - <<'PY'  # which parts each cell has (1-based, as --parts takes them): the next call's PARTS are the others
from pathlib import Path
from gacq.experiment import _ranges
for d in sorted(Path(".data/parts").iterdir()):
    have = sorted(int(f.stem.split("_")[1]) + 1 for f in d.glob("stats_*.npz"))
    print(f"gpu-unpack:   {d.name}: parts {_ranges(have) or 'none'}")
PY
fi
# SPEC=<the spec> (optional): cells whose every part's statistics are now in .data/parts are merged and evaluated
# here (`gacq experiment run --parts none` samples nothing; on the CPU a cell takes seconds), also when the calls
# that sampled their parts carried none of them (PARTS=...): their quantization checkpoints must be in the spec's
# work folder, or in .data/q.tgz (scripts/gpu-q-carry.sh), which is unpacked there first; a cell without one waits
if [ -n "${SPEC:-}" ] && [ -d .data/parts ]; then
  WORK=$(python -c 'import sys; from gacq.experiment import load_spec; print(load_spec(sys.argv[1]).work)' "$SPEC")
  mkdir -p "$WORK/parts" && cp -rn .data/parts/. "$WORK/parts/"
  [ -f .data/q.tgz ] && tar xzf .data/q.tgz -C "$WORK" --skip-old-files
  READY=$(python - "$SPEC" "$RES" <<'PY'
import sys
from gacq.experiment import _done, cell_parts, load_spec, quant_job_of
spec = load_spec(sys.argv[1], results=sys.argv[2])
ready = []
for c in spec.cells:
    have = cell_parts(spec, c)
    if _done(spec, c) or have is None or have[0] < have[1]:
        continue
    job = quant_job_of(spec, c)[0]
    if job is not None and not (spec.work / "q" / job / "quant_config.json").exists():
        print(f"gpu-unpack: {c.id} has all {have[1]} parts but no checkpoint {job} here: not merged", file=sys.stderr)
        continue
    ready.append(c.id)
print(",".join(ready))
PY
)
  if [ -n "$READY" ]; then
    echo "gpu-unpack: merging the parts of $READY"
    python -m gacq experiment run "$SPEC" --results "$RES" --cells "$READY" --parts none --quiet \
      || echo "gpu-unpack: merging failed (exit $?): rerun the command above to see why"
  fi
fi
if [ -d .data/parts ]; then
  for d in .data/parts/*/; do
    [ -d "$d" ] && [ -f "$RES/cells/$(basename "$d").json" ] && rm -rf "$d" \
      && echo "gpu-unpack: $(basename "$d") is finished: dropped its part statistics from .data/parts"
  done
fi
echo "gpu-unpack: $NEW new cell result(s); logs in $LOGS"
if [ -n "${SPEC:-}" ] && [ -d .data/parts ]; then  # the next call's CELLS and PARTS (NEXT_PARTS of them, 13)
  PLAN=$(python -m gacq experiment plan "$SPEC" --results "$RES" -n "${NEXT_PARTS:-13}" 2>&1 || true)
  case $PLAN in
    *"no parts to plan"*) ;;  # a spec whose cells sample in one run: nothing to plan
    *) echo "gpu-unpack: the next call (gacq experiment plan -n ${NEXT_PARTS:-13}):"; echo "$PLAN" | sed 's/^/gpu-unpack:   /' ;;
  esac
fi
TITLE=${4:-$(sed -n '1s/^# //p' "$RES/README.md" 2>/dev/null || true)}  # none before the folder's first report
if ls "$RES"/cells/*.json > /dev/null 2>&1; then
  python -m gacq report "$RES" ${TITLE:+--title "$TITLE"}
else
  echo "gpu-unpack: no cell results in $RES yet: no report"
fi
# the report over every experiment (`gacq report results`), where this checkout has one: tests/test_committed_reports.py
# fails on a stale one
if [ -f results/README.md ] && sed -n 3p results/README.md | grep -q '^Rendered by `gacq report results/\? --out results/README.md`'; then
  python -m gacq report results --out results/README.md --title "$(sed -n '1s/^# //p' results/README.md)"
fi
