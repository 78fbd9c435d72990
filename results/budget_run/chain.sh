#!/bin/bash
# The measured budget run: stage 0 (bell weight from step 0) + both AR teachers, one after the other, alone on the CPU.
set -e
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
date -u +"start %FT%TZ"
python teacher.py --stage=base --weighting=bell --steps=3000 --decay=600 --eval_every=1000 --out=runs/budget/base_run --export=runs/budget/base
date -u +"base done %FT%TZ"
python teacher.py --stage=ar --frames_per_block=1 --init=runs/budget/base --steps=800 --decay=200 --eval_every=400 --out=runs/budget/ar_fw_run --export=runs/budget/ar_fw
date -u +"ar fw done %FT%TZ"
python teacher.py --stage=ar --frames_per_block=3 --init=runs/budget/base --steps=500 --decay=100 --eval_every=250 --out=runs/budget/ar_cw_run --export=runs/budget/ar_cw
date -u +"ar cw done %FT%TZ"
