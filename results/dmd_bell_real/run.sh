#!/bin/bash
# The shipped CF++ 2-step DMD command, with today's base (the bell-weighted one, Total 0.938) as the real score
# and critic start instead of the 5,000-step base the shipped students were distilled against; then 3 noise seeds.
set -e
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
date -u +"start %FT%TZ"
python dmd.py --init=checkpoints/causal_cd_framewise --timesteps=1000,250 --first_real=checkpoints/ar_teacher_framewise \
    --first_weight=0.25 --real=checkpoints/base --out=runs/dmd_bell_real/run --export=runs/dmd_bell_real/cfpp_framewise_2step
date -u +"dmd done %FT%TZ"
python -c "import data; print(*data.PROMPTS, sep='\n')" > runs/dmd_bell_real/prompts.txt
for s in 0 1 2; do
  python sample.py --ckpt runs/dmd_bell_real/cfpp_framewise_2step.safetensors --prompts-file runs/dmd_bell_real/prompts.txt \
      --num-samples 3 --seed $s --save-npy runs/dmd_bell_real/seed$s.npy --out runs/dmd_bell_real/seed$s.png
  python eval.py --npy runs/dmd_bell_real/seed$s.npy --fd
  date -u +"seed $s done %FT%TZ"
done
