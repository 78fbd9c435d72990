#!/bin/bash
# The shipped CF++ 2-step DMD command with real-score guidance 0, for a weight average (soup.py) with the
# shipped student (real-score guidance 1).
set -e
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
date -u +"start %FT%TZ"
python dmd.py --init=checkpoints/causal_cd_framewise --timesteps=1000,250 --first_real=checkpoints/ar_teacher_framewise \
    --first_weight=0.25 --real_guidance=0 --out=runs/dmd_rg0/run --export=runs/dmd_rg0/cfpp_framewise_2step
date -u +"dmd done %FT%TZ"
