set -e
cd /work/main
P=runs/fa-probe; Q=/tmp/q40/q
t() { local name=$1; shift; local s=$(date +%s.%N); python -m gacq sample "$@" --num 64 --steps 100 --batch-size 32 --seed 0 --device cpu --out $P/$name > $P/$name.log 2>&1; echo "$name $(python -c "print(round($(date +%s.%N)-$s,1))")" >> $P/times.txt; }
t fp
t tfmq_w4a8 --model $Q/tfmq_w4a8_steps100
t tfmq_w4a8_float_acts --model $Q/tfmq_w4a8_steps100 --float-acts
t gac_w4a8 --model $Q/gac_w4a8_steps100
t gac_w4a8_float_acts --model $Q/gac_w4a8_steps100 --float-acts
echo done >> $P/times.txt
