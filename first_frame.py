"""Stage 3b (not in the paper): frame 0's own DMD, after the video DMD of a frame-wise student.

    python first_frame.py --init=runs/dmd/cfpp_framewise_2step --export=checkpoints/cfpp_framewise_2step
    python first_frame.py --init=runs/soup/world_framewise --real=checkpoints/world_ar_teacher_framewise \
                          --guidance=1.0 --export=checkpoints/world_framewise
(the init: the student as dmd.py, or soup.py, made it). Both shipped frame-wise 2-step students went
through it: Total 0.882 -> 0.906 and 0.843 -> 0.877 over noise seeds 0-2 (README, "Frame 0's own stage");
the world student three times more (--seed=1, then --seed=2 on that, the two averaged by soup.py, then
--seed=3 on that soup, averaged with it), the text student twice more with frame 0 on [1000, 833.3, 625, 250]
(--first_timesteps: its last x0 then comes from t = 250, not 625; 0.883 -> 0.895 over 20 fresh noise seeds),
then twice on [1000, 625, 250] (frame 0 in 3 forwards: latency ratio 0.460; +0.0046 over 60 fresh noise seeds).

Frame 0 is the frame-wise student's weak frame: it has no history, and its 4 steps must draw the object
from noise, which the AR teacher does in 48 (README, stage 3: a teacher-drawn frame 0 lifts the same
student's videos from 0.88 to 0.91, the world model's from 0.84 to 0.90). 50 generator updates inside the
video DMD run are too few to make a 4-step image generator, and more updates on frame 0 alone moved the
weights the later frames share (they slowed down). So this stage trains frame 0 alone, cheaply (a batch
of one-frame rollouts), for many updates, and holds the rest of the student where it was:
  - frame 0's DMD term: G rolls out frame 0 on its 4-step list (a random exit step carries gradient);
    the real score is the frame-wise AR teacher on one frame (an image: nothing to force), guided, and the
    fake score a critic started from it, trained by flow matching on fresh frame-0 rollouts;
  - a keep term: on ground-truth clips, teacher-forced at the block list's timesteps, G's x0 of frames
    1.. stays where the frozen init put it (mean squared difference, weight `keep_weight`).
One process (toy scale); resumes from OUT/ckpt; the shipped JSON is the init's with this stage added.
"""
import copy
import os
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

import data
import dmd
import model as M
import trainer as T

DEFAULTS = dict(
    init="checkpoints/cfpp_framewise_2step",  # a frame-wise DMD student whose frame 0 has its own step list
    real="checkpoints/ar_teacher_framewise",  # the frame-wise AR teacher: frame 0's real score and the critic's start
    guidance=0.5,  # the real score's guidance in the DMD form (0.5 = weight 1.5, the teacher's sampler)
    first_timesteps="",  # frame 0's list instead of the init's, e.g. 1000,833.3,625,250 (shipped in the JSON)
    keep_weight=10.0,  # the keep term's weight beside frame 0's DMD term
    out="",  # run folder (default runs/first_frame_<export name>)
    export="",
    steps=1000,  # iterations = critic updates; the generator steps on every critic_updates-th
    critic_updates=5,
    batch_size=32,  # one-frame rollouts per update
    keep_batch=8,  # ground-truth clips per keep term
    lr=1e-4,
    critic_lr=2e-5,
    weight_decay=0.01,
    grad_clip=10.0,
    ema=0.99,
    seed=0,
    bf16=T.bf16_is_native(),
    ckpt_every=100,
    log_every=25,
    device="",
)


def networks(cfg, device):
    """-> G, the frozen init (what the keep term holds), the frozen real score, its trainable critic, G's JSON."""
    gen, meta = framewise_student(cfg["init"], device)
    real = dmd.load(cfg["real"], ("ar_teacher",), device)[0]
    geometry = lambda m: (m.in_dim, m.frames, m.height, m.width, m.patch_size, m.num_actions > 0)
    if geometry(real.cfg) != geometry(gen.cfg):
        T.die(f"--real {cfg['real']} draws other frames than --init {cfg['init']} (size, channels or actions)")
    critic = copy.deepcopy(real)  # trainable; the real score itself is frozen below
    return gen, copy.deepcopy(gen).requires_grad_(False), real.requires_grad_(False), critic, meta


def framewise_student(stem, device):
    """(G, its JSON) for a stage that starts from a frame-wise student whose frame 0 has its own step list."""
    gen, meta = dmd.load(stem, ("student",), device)
    if meta.get("frames_per_block") != 1 or not meta.get("first_block_steps"):
        T.die(f"--init {stem} must be a frame-wise student whose frame 0 has its own step list "
              "(frames_per_block 1, first_block_steps set)")
    return gen, meta


def keep_loss(gen, frozen, cfg, step, block_steps):
    """Frames 1.. of G's teacher-forced x0 on ground-truth clips, against the frozen init's, each frame
    noised to one of the student's block timesteps (frame 0 is what this stage changes)."""
    c = gen.cfg
    clips, tokens, actions = data.ground_truth(step, cfg["keep_batch"], cfg["seed"], c.frames, c.num_actions > 0)
    g = T.step_generator(cfg["seed"], step, 3)
    t = torch.tensor(block_steps)[torch.randint(len(block_steps), (len(clips), c.frames), generator=g)]
    noise = torch.randn(clips.shape, generator=g)
    device = next(gen.parameters()).device
    clips, tokens, t, noise = clips.to(device), tokens.to(device), t.to(device), noise.to(device)
    actions = None if actions is None else actions.to(device)
    x_t = M.add_noise(clips, noise, t)
    forced = dict(frames_per_block=1, clean_x=clips, actions=actions)
    with torch.no_grad():
        held = M.x0_from_v(x_t, frozen(x_t, t, frozen.encode_text(tokens), **forced), t)
    x0 = M.x0_from_v(x_t, gen(x_t, t, gen.encode_text(tokens), **forced), t)
    return F.mse_loss(x0[:, :, 1:], held[:, :, 1:])


def main(argv):
    cfg = T.parse_overrides(DEFAULTS, argv)
    for key in ("steps", "critic_updates", "batch_size", "keep_batch", "ckpt_every", "log_every"):
        if cfg[key] <= 0:
            T.die(f"--{key} must be positive, got {cfg[key]}")
    for key in ("guidance", "keep_weight"):
        if cfg[key] < 0:
            T.die(f"--{key} must be >= 0, got {cfg[key]}")
    rank, world, device = T.setup_distributed(cfg["device"])
    if world > 1:
        T.die("first_frame.py trains on one process (a toy-scale stage); run it without torchrun")
    gen, frozen, real, critic, meta = networks(cfg, device)
    c = gen.cfg
    first = first_list(cfg["first_timesteps"], meta, c.shift)
    block_steps = block_list(meta, c.shift)
    sched = dict(frames_per_block=1, steps=first, first=first)  # a one-frame rollout: frame 0 on its list
    name = os.path.basename(cfg["export"]) or os.path.basename(cfg["init"])
    out = cfg["out"] or os.path.join("runs", "first_frame_" + name)
    ema = T.EMA(gen, cfg["ema"])
    adamw = lambda net, lr: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.0, 0.999),
                                              weight_decay=cfg["weight_decay"])
    opt_g, opt_c = adamw(gen, cfg["lr"]), adamw(critic, cfg["critic_lr"])
    run = T.Run(out, cfg["steps"], {"kind": "train_first_frame", "config": asdict(c), "train": cfg},
                modules={"generator": gen, "critic": critic}, emas={"generator": ema},
                optimizers={"generator": opt_g, "critic": opt_c}, log_every=cfg["log_every"])
    shape = (c.in_dim, 1, c.height, c.width)

    def batch(step, stream):
        b = dmd.make_batch(cfg, step, stream, shape, sched, c.shift, c.num_actions > 0)
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}

    for step in range(run.start, cfg["steps"]):
        logged = {}  # the generator's numbers only on its own steps: a resumed log equals an uninterrupted one
        if step % cfg["critic_updates"] == 0:  # the generator: frame 0's DMD term + the keep term
            b = batch(step, 0)
            with T.autocast(device, cfg["bf16"]):
                x = dmd.self_forcing(gen, b, sched)
                first_loss, _ = dmd.dmd_loss(x, real, critic, b["tokens"], b["t"], b["eps"], cfg["guidance"],
                                             b.get("actions"))
                keep = keep_loss(gen, frozen, cfg, step, block_steps)
            loss = first_loss + cfg["keep_weight"] * keep
            logged = dict(dmd_loss=run.check(first_loss, step), keep_loss=run.check(keep, step),
                          gen_grad_norm=T.optimizer_step(opt_g, loss, cfg["lr"], cfg["grad_clip"]))
            n = step // cfg["critic_updates"]
            ema.update(gen, min(cfg["ema"], (1 + n) / (10 + n)))
        b = batch(step, 1)  # the critic: flow matching on fresh frame-0 rollouts of G
        with T.autocast(device, cfg["bf16"]):
            with torch.no_grad():
                x = dmd.self_forcing(gen, b, sched)
            loss = dmd.critic_loss(critic, x, b["tokens"], b["t"], b["eps"], b.get("actions"))
        value = run.check(loss, step)
        run.log(step + 1, critic_loss=value, critic_grad_norm=T.optimizer_step(opt_c, loss, cfg["critic_lr"],
                                                                             cfg["grad_clip"]), **logged)
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["steps"]:
            run.save(step + 1)
    run.close()
    # The init's JSON (its sampler, how its video DMD ran) with this stage added; this stage's log ships as
    # NAME.first_frame.log.jsonl, beside the video DMD's NAME.log.jsonl. An init that went through this stage
    # already keeps that pass's record (nested under "earlier", with its log and time; for a soup.py average
    # of such students, the soup's list of them), and the n-th pass's log is NAME.first_frame<n>.log.jsonl,
    # so shipping into the init's folder overwrites no log.
    stage = {"init": os.path.basename(cfg["init"]), "real": os.path.basename(cfg["real"]), "first_timesteps": first,
             **{k: cfg[k] for k in ("guidance", "keep_weight", "steps", "batch_size", "seed")}}
    shipped = {k: v for k, v in meta.items() if k not in ("config", "log", "wall_s")}
    if "first_frame" in meta:
        stage["earlier"] = {**meta["first_frame"], "log": meta.get("log"), "wall_s": meta.get("wall_s")}
    elif soup_passes(meta.get("soup", [])):  # a soup of students that went through this stage
        stage["earlier"] = {"soup": shipped.pop("soup")}
    else:
        shipped.update(dmd_log=meta.get("log"), dmd_wall_s=meta.get("wall_s"))
    shipped["first_frame"] = stage
    if cfg["first_timesteps"]:  # sample.py reads frame 0's list from here (an init's own list is already in meta)
        shipped.update(first_block_steps=len(first), first_timesteps=first)
    n = passes(stage)
    run.ship(cfg["export"], ema, c, shipped, log_name=f"{name}.first_frame{n if n > 1 else ''}.log.jsonl")


def block_list(meta, shift):
    """The student's block list: the JSON's explicit timesteps, else the warped steps_per_block list."""
    return meta.get("timesteps") or M.timesteps(meta["steps_per_block"], shift).tolist()


def first_list(given, meta, shift):
    """Frame 0's step list: `given` (--first_timesteps), else the init's own list, else the warped first_block_steps."""
    if not given:
        return meta.get("first_timesteps") or M.timesteps(meta["first_block_steps"], shift).tolist()
    try:
        return M.timestep_list(given)
    except ValueError as e:
        T.die(f"--first_timesteps {e}, got {given!r}")


def passes(record):
    """How many passes of this stage a first_frame record holds: its own and its earlier ones; through a
    soup, those of its deepest source."""
    if "soup" in record:
        return soup_passes(record["soup"])
    return 1 + (passes(record["earlier"]) if "earlier" in record else 0)


def soup_passes(sources):
    """The deepest chain of passes among a soup.py list of sources (0 for a soup of video DMD runs); a source's
    own passes sit on top of its own soup when it is one."""
    return max([0] + [(passes(s["first_frame"]) if s.get("first_frame") else 0) + soup_passes(s.get("soup") or [])
                      for s in sources])


if __name__ == "__main__":
    main(sys.argv[1:])
