"""Stage 3c (not in the paper): the frames the toy world determines, regressed on real clips.

    python next_frame.py --init=runs/soup4/world_framewise --export=checkpoints/world_framewise

In both toy worlds most frames are a function of the frames before them: in the action world frame t is
frame t-1 moved by action t; in the text world the object keeps the velocity that frames 0 and 1 show, and
bounces off the walls elastically. There a teacher-forced x0 can be regressed on the real frame without the
blur regression gives where the future is uncertain (the conditional mean is the one right frame). The
distilled student draws those frames worse than the data: teacher-forced on real clips, its one-step x0 at
t = 1000 misses the real centroid by 0.2 px (action world) and 0.7 px (text world) (README, "The next frame,
regressed on real clips"). So:
  - the regression term: G's x0 of the determined frames (1.. in the action world, 2.. in the text world),
    teacher-forced on ground-truth clips, each frame noised to one of the student's block timesteps, against
    the real frames (mean squared error);
  - the keep term (`keep_weight`): the frames the world leaves free stay where the frozen init put them.
    Frame 0 is held on the inputs its own 4-step rollout meets (the init's rollout, each step's x_t), the
    text world's frame 1 teacher-forced like the regressed frames.
One process (toy scale); resumes from OUT/ckpt; the shipped JSON is the init's with this stage added.
The shipped world student is its last stage (--steps=2000: +0.0026 +- 0.0012 Total on 60 fresh noise seeds, past
the README's two-standard-error rule); on the text student 2,000 steps gave +0.0019 +- 0.0013, not shipped.
"""
import copy
import os
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

import data
import first_frame
import model as M
import trainer as T

DEFAULTS = dict(
    init="checkpoints/world_framewise",  # a frame-wise student whose frame 0 has its own step list
    keep_weight=10.0,  # the keep term's weight beside the regression term
    out="",  # run folder (default runs/next_frame_<export name>)
    export="",
    steps=2000,  # the shipped world run (1,000 first, then resumed: same run, README stage 3c)
    batch_size=8,  # ground-truth clips per update (and frame-0 rollouts for the keep term)
    lr=4e-5,
    weight_decay=0.01,
    grad_clip=10.0,
    ema=0.99,
    seed=0,
    bf16=T.bf16_is_native(),
    ckpt_every=100,
    log_every=25,
    device="",
)


def free_frames(cfg):
    """How many leading frames the world leaves free: frame 0 always; in the text world frame 1 too (its
    direction and speed are drawn), in the action world frame 1 is frame 0 moved by action 1."""
    return 1 if cfg.num_actions else 2


def losses(gen, frozen, cfg, step, block_steps, first_steps):
    """(regression, keep) for one update; everything random comes from (seed, step)."""
    c, device = gen.cfg, next(gen.parameters()).device
    clips, tokens, actions = data.ground_truth(step, cfg["batch_size"], cfg["seed"], c.frames, c.num_actions > 0)
    g = T.step_generator(cfg["seed"], step, 3)
    t = torch.tensor(block_steps)[torch.randint(len(block_steps), (len(clips), c.frames), generator=g)]
    noise = torch.randn(clips.shape, generator=g)
    first_noise = torch.randn(clips[:, :, :1].shape, generator=g)
    fresh = [torch.randn(first_noise.shape, generator=g) for _ in first_steps[1:]]
    clips, tokens, t, noise = clips.to(device), tokens.to(device), t.to(device), noise.to(device)
    actions = None if actions is None else actions.to(device)
    x_t = M.add_noise(clips, noise, t)
    forced = dict(frames_per_block=1, clean_x=clips, actions=actions)
    ctx = gen.encode_text(tokens)
    with torch.no_grad():
        frozen_ctx = frozen.encode_text(tokens)
    x0 = M.x0_from_v(x_t, gen(x_t, t, ctx, **forced), t)
    free = free_frames(c)
    regression = F.mse_loss(x0[:, :, free:], clips[:, :, free:])
    keep = []
    if free > 1:  # frames 1..free-1, teacher-forced like the regressed ones
        with torch.no_grad():
            held = M.x0_from_v(x_t, frozen(x_t, t, frozen_ctx, **forced), t)
        keep.append(F.mse_loss(x0[:, :, 1:free], held[:, :, 1:free]))
    # Frame 0 on the inputs its own rollout meets: the frozen init's 4-step rollout, each step's x_t.
    first_actions = None if actions is None else actions[:, :1]
    x, inputs, targets = first_noise.to(device), [], []
    with torch.no_grad():
        for i, step_t in enumerate(first_steps):
            t0 = torch.full((len(x), 1), step_t, device=device)
            target = M.x0_from_v(x, frozen(x, t0, frozen_ctx, actions=first_actions), t0)
            inputs.append((x, t0))
            targets.append(target)
            if i + 1 < len(first_steps):
                x = M.add_noise(target, fresh[i].to(device), torch.full_like(t0, first_steps[i + 1]))
    keep.append(sum(F.mse_loss(M.x0_from_v(x, gen(x, t0, ctx, actions=first_actions), t0), target)
                    for (x, t0), target in zip(inputs, targets)) / len(inputs))
    return regression, sum(keep)


def main(argv):
    cfg = T.parse_overrides(DEFAULTS, argv)
    for key in ("steps", "batch_size", "ckpt_every", "log_every"):
        if cfg[key] <= 0:
            T.die(f"--{key} must be positive, got {cfg[key]}")
    if cfg["keep_weight"] < 0:
        T.die(f"--keep_weight must be >= 0, got {cfg['keep_weight']}")
    rank, world, device = T.setup_distributed(cfg["device"])
    if world > 1:
        T.die("next_frame.py trains on one process (a toy-scale stage); run it without torchrun")
    gen, meta = first_frame.framewise_student(cfg["init"], device)
    if gen.cfg.vocab_size == 0:
        T.die(f"--init {cfg['init']} is not a toy-world model: this stage regresses on Bouncing Shapes clips")
    frozen = copy.deepcopy(gen).requires_grad_(False)
    c = gen.cfg
    first = first_frame.first_list("", meta, c.shift)
    block_steps = first_frame.block_list(meta, c.shift)
    name = os.path.basename(cfg["export"]) or os.path.basename(cfg["init"])
    out = cfg["out"] or os.path.join("runs", "next_frame_" + name)
    ema = T.EMA(gen, cfg["ema"])
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg["lr"], betas=(0.0, 0.999), weight_decay=cfg["weight_decay"])
    run = T.Run(out, cfg["steps"], {"kind": "train_next_frame", "config": asdict(c), "train": cfg},
                modules={"generator": gen}, emas={"generator": ema}, optimizers={"generator": opt},
                log_every=cfg["log_every"])
    for step in range(run.start, cfg["steps"]):
        with T.autocast(device, cfg["bf16"]):
            regression, keep = losses(gen, frozen, cfg, step, block_steps, first)
        loss = regression + cfg["keep_weight"] * keep
        run.log(step + 1, regression_loss=run.check(regression, step), keep_loss=run.check(keep, step),
                grad_norm=T.optimizer_step(opt, loss, cfg["lr"], cfg["grad_clip"]))
        ema.update(gen, min(cfg["ema"], (1 + step) / (10 + step)))
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["steps"]:
            run.save(step + 1)
    run.close()
    # The init's JSON (its sampler and earlier stages) with this stage added; its log ships beside the others.
    shipped = {k: v for k, v in meta.items() if k not in ("config", "log", "wall_s")}
    shipped["next_frame"] = {"init": os.path.basename(cfg["init"]), "init_log": meta.get("log"),
                             "regressed_from_frame": free_frames(c),
                             **{k: cfg[k] for k in ("keep_weight", "steps", "batch_size", "lr", "seed")}}
    run.ship(cfg["export"], ema, c, shipped, log_name=f"{name}.next_frame.log.jsonl")


if __name__ == "__main__":
    main(sys.argv[1:])
