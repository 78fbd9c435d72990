#!/bin/bash
# The budget run: stage 0 (bell weight from step 0) + both AR teachers, one after the other, alone on the CPU.
# With no arguments it is the measured run of 2026-12-04 (3,000 base steps, evaluations along the way, runs/budget).
#   bash results/budget_run/chain.sh 4500 final runs/budget4500   # the measured run of 2026-12-05 (final evaluations only; logs in results/budget4500)
set -e
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
STEPS=${1:-3000} EVALS=${2:-along} OUT=${3:-runs/budget}
if [ "$EVALS" = final ]; then E_BASE=$STEPS E_FW=800 E_CW=500; else E_BASE=1000 E_FW=400 E_CW=250; fi
date -u +"start %FT%TZ"
python teacher.py --stage=base --weighting=bell --steps=$STEPS --decay=$((STEPS / 5)) --eval_every=$E_BASE --out=$OUT/base_run --export=$OUT/base
date -u +"base done %FT%TZ"
python teacher.py --stage=ar --frames_per_block=1 --init=$OUT/base --steps=800 --decay=200 --eval_every=$E_FW --out=$OUT/ar_fw_run --export=$OUT/ar_fw
date -u +"ar fw done %FT%TZ"
python teacher.py --stage=ar --frames_per_block=3 --init=$OUT/base --steps=500 --decay=100 --eval_every=$E_CW --out=$OUT/ar_cw_run --export=$OUT/ar_cw
date -u +"ar cw done %FT%TZ"
