"""Stages 0 and 1: the bidirectional base and, from it, the autoregressive diffusion teacher.

    python teacher.py --stage=base                       # stage 0: flow matching, full attention
    python teacher.py --stage=ar --frames_per_block=1    # stage 1: teacher forcing, frame-wise
    python teacher.py --stage=ar --frames_per_block=3    # stage 1: chunk-wise
    python teacher.py --stage=base --actions=true        # the world model: one action per frame (DESIGN §3)
    torchrun --nproc_per_node=2 teacher.py --stage=base  # the same on N processes (DDP)
    torchrun --nproc_per_node=2 teacher.py --stage=base --parallel=fsdp  # FSDP2: every rank holds a shard
    torchrun --nproc_per_node=8 teacher.py --stage=ar --model=wan2.1-1.3b --data=DATA \
        --init=Wan2.1-T2V-1.3B-Diffusers/transformer --parallel=fsdp --checkpointing=true  # Wan scale (README)

Stage 0 learns v = eps - x0 on whole clips (one t per clip, shifted sampling, ~10% empty prompts so
that guidance works). Stage 1 starts from the base and sees [clean GT | noisy]: every noisy block
attends to itself and to the clean frames of earlier blocks, gets its own t, and the loss is weighted
by the bell w(t) (DESIGN §2). A run resumes from OUT/ckpt when it exists; `--export=STEM` ships the
EMA weights as STEM.safetensors + STEM.json at the end. With --data (a latent data set from `python wan.py
encode`) the clips are Wan VAE latents and the text is their umT5 context; --init may then be a Wan folder.
"""
import os
import sys
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

import data
import eval as E
import model as M
import trainer as T
import wan

DEFAULTS = dict(
    stage="base",  # base | ar
    frames_per_block=1,  # ar only: 1 = frame-wise, 3 = chunk-wise
    model="toy",
    data="",  # a latent data set (`python wan.py encode`): train --model (e.g. wan2.1-1.3b) on Wan latents
    actions=False,  # train on the action world: the model gets one action per frame (num_actions > 0)
    init="",  # the checkpoint (or Wan folder) to start from; ar: default checkpoints/base; base: default scratch
    out="",  # run folder (default runs/<stage>[_fw|_b<frames_per_block>][_world|_latents])
    export="",  # ship the EMA weights to this stem (e.g. checkpoints/base) when done
    steps=3000,
    batch_size=16,
    lr=1e-3,
    warmup=100,
    decay=0,  # steps of linear learning-rate cool-down to zero at the end of the run (0 = none)
    weight_decay=0.0,
    grad_clip=1.0,
    ema=0.999,
    prompt_dropout=0.1,
    weighting="",  # uniform | bell (default: uniform for base, bell for ar)
    shift=0.0,  # timestep shift of the samplers; 0 = the model preset's
    train_shift=0.0,  # timestep shift of the training t distribution; 0 = the same as --shift
    seed=0,
    bf16=T.bf16_is_native(),  # autocast; off where the CPU would emulate bf16 (~10x slower)
    ckpt_every=250,
    eval_every=0,  # sample 54 videos from the EMA weights and log their toy-VBench scores (0 = never)
    log_every=10,
    device="",
    parallel="ddp",  # ddp | fsdp (FSDP2: parameters, gradients, EMA and optimizer state sharded over the ranks)
    checkpointing=False,  # recompute each block's activations in the backward (memory for compute)
)


def make_batch(cfg, step, n_frames, latents=None):
    """The global batch of this step: clips and their text (toy prompt ids, or with `latents` Wan latents and
    umT5 contexts), noise, timesteps and dropout, all from (seed, step)."""
    g = T.step_generator(cfg["seed"], step)
    B = cfg["batch_size"]
    x0, text, actions = data.ground_truth(step, B, cfg["seed"], n_frames, cfg["actions"], latents)
    drop = torch.rand(B, generator=g) < cfg["prompt_dropout"]
    text = torch.where(drop.view(B, *[1] * (text.ndim - 1)), 0, text)  # the empty prompt: pad ids, a zero context
    noise = torch.randn(x0.shape, generator=g)
    if cfg["stage"] == "base":
        t = M.sample_t((B,), cfg["train_shift"], g)[:, None].expand(B, n_frames)
    else:  # one t per block, drawn independently
        fpb = cfg["frames_per_block"]
        t = M.sample_t((B, n_frames // fpb), cfg["train_shift"], g).repeat_interleave(fpb, dim=1)
    return x0, text, noise, t, actions  # prompts drop out, actions never do


def loss_fn(net, cfg, x0, tokens, noise, t, actions=None):
    inner = T.unwrap(net)
    x_t = M.add_noise(x0, noise, t)
    ctx = inner.encode_text(tokens)
    if cfg["stage"] == "base":
        v = net(x_t, t, ctx, actions=actions)
    else:
        v = net(x_t, t, ctx, frames_per_block=cfg["frames_per_block"], clean_x=x0, actions=actions)
    per_frame = F.mse_loss(v.float(), noise - x0, reduction="none").mean(dim=(1, 3, 4))  # [B, F]
    if cfg["weighting"] == "bell":
        per_frame = per_frame * M.loss_weight(t, cfg["shift"]).to(per_frame.device)
    return per_frame.mean()


def main(argv):
    cfg = T.parse_overrides(DEFAULTS, argv)
    if cfg["stage"] not in ("base", "ar"):
        T.die(f"--stage must be base or ar, got {cfg['stage']!r}")
    if cfg["model"] not in M.PRESETS:
        T.die(f"unknown --model {cfg['model']!r}; presets: {', '.join(M.PRESETS)}")
    mcfg = M.get_config(cfg["model"], num_actions=len(data.ACTIONS) if cfg["actions"] else 0)
    n_frames = mcfg.frames
    if cfg["stage"] == "ar" and (cfg["frames_per_block"] < 1 or n_frames % cfg["frames_per_block"]):
        T.die(f"--frames_per_block must divide the {n_frames} frames, got {cfg['frames_per_block']}")
    for key in ("steps", "batch_size", "ckpt_every", "log_every"):
        if cfg[key] <= 0:
            T.die(f"--{key} must be positive, got {cfg[key]}")
    if cfg["parallel"] == "fsdp" and cfg["eval_every"]:
        T.die("--eval_every samples on rank 0 from whole weights; under --parallel=fsdp they are sharded")
    if cfg["actions"] and cfg["eval_every"]:
        T.die("--eval_every scores text-to-video models; judge a world model with sample.py --actions and eval.py")
    cfg["shift"] = cfg["shift"] or mcfg.shift
    cfg["train_shift"] = cfg["train_shift"] or cfg["shift"]
    mcfg = replace(mcfg, shift=cfg["shift"])  # the config carries the shift, so every sampler uses the trained one
    cfg["weighting"] = cfg["weighting"] or ("uniform" if cfg["stage"] == "base" else "bell")
    if cfg["weighting"] not in ("uniform", "bell"):
        T.die(f"--weighting must be uniform or bell, got {cfg['weighting']!r}")
    latents = None
    if cfg["data"]:
        if cfg["actions"] or cfg["eval_every"]:
            T.die("--data trains on Wan latents: --actions (the toy world model) and --eval_every (toy-VBench, "
                  "which judges Bouncing Shapes pixels) do not apply")
        latents = data.LatentStream(cfg["data"], cfg["batch_size"], cfg["seed"])
        latents.check(mcfg, f"--model {cfg['model']}")
    suffix = "" if cfg["stage"] == "base" else ("_fw" if cfg["frames_per_block"] == 1 else f"_b{cfg['frames_per_block']}")
    suffix += "_world" if cfg["actions"] else "_latents" if latents else ""
    out = cfg["out"] or os.path.join("runs", cfg["stage"] + suffix)
    ckpt = os.path.join(out, "ckpt")

    rank, world, device = T.setup_distributed(cfg["device"])
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    net = M.build(mcfg).to(device)
    init_from = cfg["init"] or ("checkpoints/base" if cfg["stage"] == "ar" else "")
    if init_from and not T.has_checkpoint(out):
        init, _ = wan.load_dit(init_from)  # on the CPU, and dropped once copied: 5.7 GB at 1.3B
        # A world model may start from a text-to-video model: its action path stays at its zero init,
        # so step 0 computes exactly what the init does (minWM starts its camera path the same way).
        if init.cfg != replace(mcfg, num_actions=init.cfg.num_actions) or init.cfg.num_actions not in (0, mcfg.num_actions):
            T.die(f"--init {init_from} was trained with another model config than --model {cfg['model']}")
        missing, _ = net.load_state_dict(init.state_dict(), strict=False)
        assert all(k.startswith("action_") for k in missing), missing
        del init
    net, ddp = T.parallelize(net, cfg["parallel"], device, cfg["checkpointing"])  # before the EMA and optimizer
    ema = T.EMA(net, cfg["ema"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=cfg["weight_decay"])
    run = T.Run(out, cfg["steps"], {"kind": "train_" + cfg["stage"], "config": asdict(mcfg), "train": cfg},
                modules={"model": net}, emas={"model": ema}, optimizers={"model": opt}, rank=rank, world=world,
                log_every=cfg["log_every"])
    local = T.local_slice(cfg["batch_size"], rank, world)
    kind = "base" if cfg["stage"] == "base" else "ar_teacher"  # what the shipped checkpoint is

    net.train()
    for step in range(run.start, cfg["steps"]):
        batch = make_batch(cfg, step, n_frames, latents)
        x0, tokens, noise, t, actions = (u if u is None else u[local].to(device) for u in batch)
        with T.autocast(device, cfg["bf16"]):
            loss = loss_fn(ddp, cfg, x0, tokens, noise, t, actions)
        value = run.check(loss, step)
        lr = T.lr_at(step, cfg["lr"], cfg["warmup"], cfg["steps"], cfg["decay"])
        grad_norm = T.optimizer_step(opt, loss, lr, cfg["grad_clip"])
        ema.update(net, min(cfg["ema"], (1 + step) / (10 + step)))  # warm-up: early EMA tracks the weights
        run.log(step + 1, loss=value, grad_norm=grad_norm, lr=lr)
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["steps"]:
            run.save(step + 1)
        if rank == 0 and cfg["eval_every"] and ((step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]):
            judge = M.build(mcfg).to(device).eval()
            ema.copy_to(judge)
            scores = E.score_model(judge, kind, cfg["frames_per_block"])
            run.record(step + 1, {k: round(v, 4) for k, v in scores.items()})
    run.close()
    run.ship(cfg["export"], ema, mcfg, {"kind": kind, "frames_per_block": None if kind == "base" else cfg["frames_per_block"],
                                        "shift": cfg["shift"], "steps": cfg["steps"], "batch_size": cfg["batch_size"]})
    T.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
