#!/usr/bin/env bash
# Run a long job in the background on the device machine and poll it from successive calls.
# The job survives between calls while the machine stays warm (a new call within 30 s), so
# one job can outlast the 10-minute call limit.
# The 30 s run from the end of the previous call to the start of the next one, and include reading its reply:
# session 13 lost a running DiT job (and the machine) by reading a long reply before polling. Poll at once with a
# command fixed in advance; read the returned files when the job is done. Each call waits up to WAIT seconds (or until
# the job ends), then copies the job's output folder to $OUT.
# NOPACK=1: copy nothing to $OUT while the job runs (only once it has finished). Sessions 13 and 15 found a fresh
# machine after every long call that returned files, even when the poll was sent at once (session 15: the lease's held
# time still shows about 30 s between that reply and the next call); calls returning nothing kept it, and a 251 s call
# with NOPACK=1 followed by an immediate poll kept it too (session 15).
# Usage (device): source scripts/gpu-setup.sh; WAIT=560 bash scripts/gpu-bg.sh $OUT NAME -- command args...
#   later calls: WAIT=560 bash scripts/gpu-bg.sh $OUT NAME      (poll only)
# The command gets its output folder as $JOBOUT (runs/bg/NAME/out).
set -u
OUT=$1; NAME=$2; shift 2
D=runs/bg/$NAME; mkdir -p $D/out
export JOBOUT=$PWD/$D/out
# a new job starts only when no pid file is there (a finished job keeps its pid, so polls never restart it;
# remove runs/bg/NAME/pid to run another job under the same name); its stale rc file goes with it
if [ "${1:-}" = "--" ] && [ ! -f $D/pid ]; then
  shift
  rm -f $D/rc
  setsid nohup bash -c "$*; echo \$? > $D/rc" > $D/out/job.log 2>&1 < /dev/null &
  echo $! > $D/pid
  echo "started $NAME: $*"
fi
WAIT=${WAIT:-560}
for ((i = 0; i < WAIT; i += 5)); do
  [ -f $D/rc ] && break
  sleep 5
done
[ -f $D/rc ] && echo "$NAME finished, rc $(cat $D/rc)" || echo "$NAME still running"
if [ -f $D/rc ] || [ -z "${NOPACK:-}" ]; then cp -r $D/out/. $OUT/ 2>/dev/null; else echo "(NOPACK: nothing copied to \$OUT)"; fi
tail -5 $D/out/job.log
