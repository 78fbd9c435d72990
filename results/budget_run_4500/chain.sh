#!/bin/bash
# The second measured budget run: stage 0 with the bell weight from step 0 for 4,500 steps, then both AR teachers,
# one after the other, alone on the CPU. Only the final checkpoint of each stage is scored (mid-run evals cost minutes).
set -e
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
date -u +"start %FT%TZ"
python teacher.py --stage=base --weighting=bell --steps=4500 --decay=900 --eval_every=4500 --out=runs/budget4500/base_run --export=runs/budget4500/base
date -u +"base done %FT%TZ"
python teacher.py --stage=ar --frames_per_block=1 --init=runs/budget4500/base --steps=800 --decay=200 --eval_every=800 --out=runs/budget4500/ar_fw_run --export=runs/budget4500/ar_fw
date -u +"ar fw done %FT%TZ"
python teacher.py --stage=ar --frames_per_block=3 --init=runs/budget4500/base --steps=500 --decay=100 --eval_every=500 --out=runs/budget4500/ar_cw_run --export=runs/budget4500/ar_cw
date -u +"ar cw done %FT%TZ"
