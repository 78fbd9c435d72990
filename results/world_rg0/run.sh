#!/bin/bash
# The shipped world DMD command with real-score guidance 0 (the plain conditional score) instead of 1, from the
# world causal-CD student (git show 1c6a866:checkpoints/world_causal_cd_framewise.*), then the README's three
# held-out action scripts on noise seeds 0, 1, 2.
set -e
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
W=runs/world_rg0
date -u +"start %FT%TZ"
python dmd.py --init=$W/world_causal_cd_framewise --real=checkpoints/world_ar_teacher_framewise \
    --steps_per_block=2 --steps=250 --real_guidance=0 --out=$W/run --export=$W/world_framewise
python - <<'PY'
import json
p = "runs/world_rg0/world_framewise.json"; d = json.load(open(p)); d["timesteps"] = [1000.0, 250.0]  # as shipped
json.dump(d, open(p, "w"), indent=1)
PY
date -u +"dmd done %FT%TZ"
python -c "import data; print(*data.PROMPTS, sep='\n')" > $W/prompts.txt
for seed in 0 1 2; do i=0
  for s in "none,right*4,up*4,none*3" "none,left*3,down*5,right*3" "none,up*3,none*2,left*6"; do
    python sample.py --ckpt $W/world_framewise --actions "$s" --prompts-file $W/prompts.txt --num-samples 1 \
        --seed $seed --save-npy $W/s${seed}_w$i.npy --out $W/s${seed}_w$i.png
    python eval.py --npy $W/s${seed}_w$i.npy; i=$((i+1))
  done
done
date -u +"evals done %FT%TZ"
