"""Stage 3: DMD finetuning with self-forcing rollouts; it makes the few-step students that sample.py streams.

    python dmd.py --init=checkpoints/causal_cd_framewise --timesteps=1000,250 --first_real=checkpoints/ar_teacher_framewise \
                  --export=checkpoints/cfpp_framewise_2step
    python dmd.py --init=checkpoints/causal_cd_framewise --steps_per_block=1 --first_real=checkpoints/ar_teacher_framewise \
                  --export=checkpoints/cfpp_framewise_1step
    python dmd.py --init=checkpoints/causal_ode_chunkwise --frames_per_block=3 --steps_per_block=4 \
                  --export=checkpoints/cf_chunkwise_4step
    python dmd.py --init=checkpoints/bidir_ode_chunkwise --frames_per_block=3 --steps_per_block=4 \
                  --export=checkpoints/sf_chunkwise_4step
    torchrun --nproc_per_node=2 dmd.py ...                  # the same on N processes (DDP)
    torchrun --nproc_per_node=8 dmd.py --init=checkpoints/wan_causal_cd --real=Wan2.1-T2V-1.3B-Diffusers/transformer \
        --data=DATA --parallel=fsdp --checkpointing=true     # Wan scale: umT5 contexts from the latent data set

Three networks. The generator G (the student, from a stage-2 init) rolls out whole videos exactly as
sample.py does (rollout.stream: block by block with the KV cache, a few consistency steps per block), so
it learns on its own history: self forcing. Every block stops at one random exit step, and only that
step's forward carries gradient. Then the video x is noised to one t and denoised by two scores: the
real score (the frozen bidirectional base, guided; or an AR teacher, which scores the video teacher-forced)
and the fake score (a critic that starts as a copy of the real score and is trained by flow matching on G's
rollouts). Their difference moves x towards what the
base would draw: g = (x0_fake - x0_real) / mean|x - x0_real|, applied through the loss
1/2 |x - sg(x - g)|^2, whose gradient with respect to x is g. The critic steps every iteration, the
generator every `critic_updates`-th, so the fake score keeps up with G. The shipped weights are G's EMA.
With --first_real (an AR teacher; frame-wise students), frame 0 of each rollout is also scored alone by
that teacher against a critic of its own, a second DMD term: frame 0 has no history and is the weak frame.
Data-free: only prompts (and, for an action world model, random sticky action sequences that G, the
real score and the critic all see). With --data (a latent data set from `python wan.py encode`) the prompts
are its umT5 contexts, drawn at random; its latents are not used. A run resumes from OUT/ckpt (G, critic,
both optimizers and the EMA).
"""
import os
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

import data
import model as M
import rollout
import trainer as T
import wan

DEFAULTS = dict(
    init="checkpoints/causal_cd_framewise",  # the stage-2 student G starts from (kind "student")
    real="checkpoints/base",  # the frozen real score and the critic's start: the bidirectional base (or a Wan folder),
    # or an AR teacher, which scores the rollout teacher-forced (a world model whose base ignores the actions)
    critic="",  # the critic's start when it is not the real score (the paper pairs a 14B real score with a 1.3B critic)
    first_real="",  # frame-wise only: an AR teacher that also scores frame 0 alone (an image: it has no history),
    # with its own critic; the frame the video scores judge worst (not in the paper; README, stage 3)
    first_guidance=0.5,  # that score's guidance in the DMD form (0.5 = weight 1.5, the teacher's sampler)
    first_weight=0.25,  # the frame-0 term's weight beside the video's (0.1, 0.5 and 1 measured worse)
    data="",  # a latent data set (`python wan.py encode`): a Wan-scale G draws its prompts' umT5 contexts
    frames_per_block=0,  # 0 = the init's (1 frame-wise, 3 chunk-wise)
    steps_per_block=0,  # 0 = the init's; frame-wise students below 4 steps give frame 0 a 4-step list
    timesteps="",  # G's block list instead of the warped list of steps_per_block, e.g. 1000,250 (shipped in the JSON)
    out="",  # run folder (default runs/dmd_<export name>)
    export="",  # ship the EMA generator to this stem (e.g. checkpoints/cfpp_framewise_2step) when done
    steps=250,  # iterations = critic updates; the generator steps on every critic_updates-th (50 here; 500 was worse)
    critic_updates=5,
    batch_size=8,
    lr=1e-4,  # generator; the paper's 2e-6 is for Wan at batch 64. Toy: x50, like the toy teacher's 1e-3
    critic_lr=2e-5,  # the paper's ratio: 5 critic steps of lr/5 move the critic as far as one G step
    weight_decay=0.01,
    grad_clip=10.0,
    ema=0.99,
    real_guidance=1.0,  # x0_c + g (x0_c - x0_u). The paper's g = 3 (weight 4) pulled every toy student to the
    # base's over-guided look (README, stage 3); g = 1 (weight 2) scored higher in all five students
    seed=0,
    bf16=T.bf16_is_native(),  # autocast; off where the CPU would emulate bf16 (~10x slower)
    ckpt_every=50,
    log_every=5,
    device="",
    parallel="ddp",  # ddp | fsdp (FSDP2: G, the critic, the EMA and both optimizer states sharded over the ranks)
    checkpointing=False,  # the critic's blocks and those of G's exit-step forwards (rollout.Frozen)
)


def schedule(fpb, steps, shift, listed=None):
    """The student's sampler: the warped list of `steps` (or the explicit `listed` one); frame-wise 1/2-step
    students give frame 0 the warped 4-step list, since it has no history to lean on (the CF++ first-frame
    trick). The counts (and an explicit list) go into the shipped JSON."""
    steps = len(listed) if listed else steps
    first = 4 if fpb == 1 and steps < 4 else None
    return dict(frames_per_block=fpb, steps_per_block=steps, first_block_steps=first,
                steps=listed or M.timesteps(steps, shift).tolist(),
                first=M.timesteps(first, shift).tolist() if first else None)


def make_batch(cfg, step, stream, shape, sched, shift, actions=False, latents=None):
    """One update's randomness over the global batch, from (seed, step, stream): prompts (toy ids, or the umT5
    contexts of random clips of `latents`), rollout noise, the exit steps (shared by all blocks; frame 0's own
    on its list), DMD/critic t and noise, and the generator of the rollout's fresh re-noising draws; with
    `actions`, sticky action sequences of the world."""
    g = T.step_generator(cfg["seed"], step, stream)
    B = cfg["batch_size"]
    if latents is None:
        tokens = data.tokenize([data.PROMPTS[i] for i in torch.randint(len(data.PROMPTS), (B,), generator=g)])
    else:
        tokens = latents.contexts(torch.randint(len(latents), (B,), generator=g).tolist())
    noise = torch.randn((B, *shape), generator=g)
    n_first = len(sched["first"]) if sched["first"] else 1  # drawn either way: the draws stay aligned
    exits = (torch.randint(len(sched["steps"]), (), generator=g).item(),
             torch.randint(n_first, (), generator=g).item())
    t = M.sample_t((B,), shift, g).clamp(20, 980)  # one t per video, the same for all its frames
    eps = torch.randn((B, *shape), generator=g)
    b = dict(tokens=tokens, noise=noise, exits=exits, t=t, eps=eps,
             fresh=T.step_generator(cfg["seed"], step, stream + 2))
    if actions:
        b["actions"] = data.action_ids([data.action_path((cfg["seed"], step, stream, i, data.TRAIN), shape[1])[4]
                                        for i in range(B)])
    return b


def self_forcing(gen, b, sched, rows=None):
    """G's rollout, the sampler's loop stopped at the exit steps (with grad there if grad is enabled)."""
    return rollout.generate(gen, b["tokens"], b["noise"], frames_per_block=sched["frames_per_block"],
                            steps=sched["steps"], first_steps=sched["first"], generator=b["fresh"],
                            exit_steps=b["exits"], rows=rows, actions=b.get("actions"))


def forcing(x, score_fpb):
    """How a score network sees the noised rollout: a bidirectional base sees it whole ({}); a causal score
    (an AR teacher, score_fpb frames per block) sees it teacher-forced, each block in context of the clean
    rollout's earlier blocks, as in stage 1."""
    return {} if not score_fpb else dict(frames_per_block=score_fpb, clean_x=x.detach())


def real_x0(real, x_t, t, tokens, scale, actions=None, **forced):
    """The real score's x0 with guidance in the DMD form x0_c + s (x0_c - x0_u). x0 is affine in v, so this
    is the standard guidance v_u + (1 + s)(v_c - v_u) turned into x0."""
    v = rollout.velocity(real, x_t, t, rollout.contexts(real, tokens, 1 + scale), 1 + scale, actions=actions,
                         **forced)
    return M.x0_from_v(x_t, v, t)


def dmd_loss(x, real, critic, tokens, t, eps, scale, actions=None, score_fpb=None):
    """-> (loss, g): 1/2 |x - sg(x - g)|^2 (mean), whose gradient with respect to x is g / x.numel()."""
    with torch.no_grad():
        x_t = M.add_noise(x, eps, t)
        forced = forcing(x, score_fpb)
        x0_fake = M.x0_from_v(x_t, critic(x_t, t, critic.encode_text(tokens), actions=actions, **forced), t)
        x0_real = real_x0(real, x_t, t, tokens, scale, actions, **forced)
        g = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # per video
        g = torch.nan_to_num(g)
    return 0.5 * F.mse_loss(x, (x - g).detach()), g


def generator_loss(x, b, cfg, real, critic, score_fpb=None, first=None):
    """G's loss on its rollout x: the video's DMD term; with `first` = (an AR teacher, its critic), plus
    first_weight x the DMD term of frame 0 alone, scored by that pair (one frame: nothing to force)."""
    loss, _ = dmd_loss(x, real, critic, b["tokens"], b["t"], b["eps"], cfg["real_guidance"], b.get("actions"),
                       score_fpb)
    if first:
        x0, eps0, a0 = frame0(b, x)
        first_loss, _ = dmd_loss(x0, *first, b["tokens"], b["t"], eps0, cfg["first_guidance"], a0)
        loss = loss + cfg["first_weight"] * first_loss
    return loss


def frame0(b, x):
    """(x, eps, actions) of frame 0 alone, for the frame-0 score pair (`first_real`)."""
    a = b.get("actions")
    return x[:, :, :1], b["eps"][:, :, :1], None if a is None else a[:, :1]


def critic_loss(critic, x, tokens, t, eps, actions=None, score_fpb=None):
    """Flow matching on G's samples: the critic learns the score of what G draws now."""
    x_t = M.add_noise(x, eps, t)
    v = critic(x_t, t, T.unwrap(critic).encode_text(tokens), actions=actions, **forcing(x, score_fpb))
    return F.mse_loss(v, eps - x)


def load(stem, kinds, device):
    net, meta = wan.load_dit(stem, device)  # a checkpoint pair, or (the real score) a Wan folder
    if meta["kind"] not in kinds:
        T.die(f"{stem} is a {meta['kind']!r} checkpoint; expected {' or '.join(map(repr, kinds))}")
    return net, meta


def networks(cfg, device):
    """-> G (from the stage-2 init), the frozen real score, the critic (a trainable copy of --critic, by
    default of the real score), G's sampler schedule (the frames per block and steps default to the init's)
    and the scores' frames per block (None: bidirectional; an AR teacher's: teacher-forced)."""
    gen, meta = load(cfg["init"], ("student",), device)
    real, real_meta = load(cfg["real"], ("base", "ar_teacher"), device)
    score_fpb = real_meta.get("frames_per_block") if real_meta["kind"] == "ar_teacher" else None
    c = gen.cfg
    geometry = lambda m: (m.in_dim, m.frames, m.height, m.width, m.patch_size)
    if geometry(real.cfg) != geometry(c):
        T.die(f"--real {cfg['real']} draws other videos than --init {cfg['init']} (channels, frames or size)")
    if real.cfg.num_actions != c.num_actions:
        T.die(f"--real {cfg['real']} and --init {cfg['init']} must both be action world models, or neither")
    fpb = cfg["frames_per_block"] or meta.get("frames_per_block")
    if not fpb or fpb <= 0 or c.frames % fpb:
        T.die(f"--frames_per_block must divide the {c.frames} frames, got {fpb}")
    if meta.get("frames_per_block") not in (None, fpb):
        T.die(f"--frames_per_block {fpb} differs from the init's {meta['frames_per_block']}")
    listed = None
    if cfg["timesteps"]:
        try:
            listed = M.timestep_list(cfg["timesteps"])
        except ValueError as e:
            T.die(f"--timesteps {e}, got {cfg['timesteps']!r}")
        if cfg["steps_per_block"] not in (0, len(listed)):
            T.die(f"--steps_per_block {cfg['steps_per_block']} differs from the {len(listed)} --timesteps")
    steps = cfg["steps_per_block"] or meta.get("steps_per_block")
    if not listed and (not steps or steps <= 0):
        T.die(f"--steps_per_block must be positive, got {steps}")

    def trainable_copy(net, flag):  # a critic's start, checked against G's videos
        if geometry(net.cfg) != geometry(c) or net.cfg.num_actions != c.num_actions:
            T.die(f"--{flag} {cfg[flag]} draws other videos than --init {cfg['init']}")
        copy = M.build(net.cfg).to(device)
        copy.load_state_dict(net.state_dict())
        return copy

    critic = trainable_copy(load(cfg["critic"], (real_meta["kind"],), device)[0] if cfg["critic"] else real, "critic")
    real.requires_grad_(False)
    first = None
    if cfg["first_real"]:
        if fpb != 1:
            T.die("--first_real scores frame 0 alone: it needs a frame-wise student (--frames_per_block 1)")
        first_real = load(cfg["first_real"], ("ar_teacher",), device)[0]
        first = (first_real.requires_grad_(False), trainable_copy(first_real, "first_real"))
    return gen, real, critic, schedule(fpb, steps, c.shift, listed), score_fpb, first


def main(argv):
    cfg = T.parse_overrides(DEFAULTS, argv)
    for key in ("steps", "critic_updates", "batch_size", "ckpt_every", "log_every"):
        if cfg[key] <= 0:
            T.die(f"--{key} must be positive, got {cfg[key]}")
    for key in ("real_guidance", "first_guidance", "first_weight"):  # 0 is meaningful: no guidance, no term
        if cfg[key] < 0:
            T.die(f"--{key} must be >= 0, got {cfg[key]}")
    rank, world, device = T.setup_distributed(cfg["device"])
    gen, real, critic, sched, score_fpb, first = networks(cfg, device)
    mcfg = gen.cfg
    latents = None
    if cfg["data"]:
        latents = data.LatentStream(cfg["data"], cfg["batch_size"], cfg["seed"])
        latents.check(mcfg, f"--init {cfg['init']}")
        latents.check(real.cfg, f"--real {cfg['real']}")
    name = os.path.basename(cfg["export"]) or f"b{sched['frames_per_block']}_s{sched['steps_per_block']}"
    out = cfg["out"] or os.path.join("runs", "dmd_" + name)
    gen, gen_ddp = T.parallelize(gen, cfg["parallel"], device, cfg["checkpointing"])  # before the EMA and optimizers
    critic, critic_ddp = T.parallelize(critic, cfg["parallel"], device, cfg["checkpointing"])
    ema = T.EMA(gen, cfg["ema"])
    adamw = lambda net, lr: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.0, 0.999),
                                              weight_decay=cfg["weight_decay"])
    opt_g, opt_c = adamw(gen, cfg["lr"]), adamw(critic, cfg["critic_lr"])
    modules, optimizers = {"generator": gen, "critic": critic}, {"generator": opt_g, "critic": opt_c}
    if first:  # frame 0's own score pair: the frozen AR teacher and its critic, trained like the video critic
        first_critic, first_critic_ddp = T.parallelize(first[1], cfg["parallel"], device, cfg["checkpointing"])
        first = (first[0], first_critic)
        modules["first_critic"] = first_critic
        optimizers["first_critic"] = opt_f = adamw(first_critic, cfg["critic_lr"])
    run = T.Run(out, cfg["steps"], {"kind": "train_dmd", "config": asdict(mcfg), "train": cfg},
                modules=modules, emas={"generator": ema}, optimizers=optimizers, rank=rank, world=world,
                log_every=cfg["log_every"])
    local = T.local_slice(cfg["batch_size"], rank, world)
    rows = (local, cfg["batch_size"]) if world > 1 else None
    shape = (mcfg.in_dim, mcfg.frames, mcfg.height, mcfg.width)

    def batch(step, stream):  # this process's rows of the update's global batch
        b = make_batch(cfg, step, stream, shape, sched, mcfg.shift, mcfg.num_actions > 0, latents)
        return {k: (v[local].to(device) if torch.is_tensor(v) and v.ndim else v) for k, v in b.items()}

    for step in range(run.start, cfg["steps"]):
        logged = {}  # the generator's numbers only on its own steps: a resumed log equals an uninterrupted one
        if step % cfg["critic_updates"] == 0:  # the generator: DMD through its own rollout
            b = batch(step, 0)
            with T.autocast(device, cfg["bf16"]):
                x = self_forcing(gen_ddp, b, sched, rows)
                loss = generator_loss(x, b, cfg, real, critic, score_fpb, first)
            logged = dict(dmd_loss=run.check(loss, step),  # = mean g^2 / 2 (+ the frame-0 term's, weighted)
                          gen_grad_norm=T.optimizer_step(opt_g, loss, cfg["lr"], cfg["grad_clip"]))
            n = step // cfg["critic_updates"]
            ema.update(gen, min(cfg["ema"], (1 + n) / (10 + n)))  # warm-up: early EMA tracks the weights
        b = batch(step, 1)  # the critic: flow matching on a fresh rollout of G, no grad through G
        with T.autocast(device, cfg["bf16"]):
            with torch.no_grad():
                x = self_forcing(gen, b, sched, rows)
            loss = critic_loss(critic_ddp, x, b["tokens"], b["t"], b["eps"], b.get("actions"), score_fpb)
        value = run.check(loss, step)
        grad_norm = T.optimizer_step(opt_c, loss, cfg["critic_lr"], cfg["grad_clip"])
        if first:
            x0, eps0, a0 = frame0(b, x)
            with T.autocast(device, cfg["bf16"]):
                loss = critic_loss(first_critic_ddp, x0, b["tokens"], b["t"], eps0, a0)
            logged["first_critic_loss"] = run.check(loss, step)
            T.optimizer_step(opt_f, loss, cfg["critic_lr"], cfg["grad_clip"])
        run.log(step + 1, critic_loss=value, critic_grad_norm=grad_norm, **logged)
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["steps"]:
            run.save(step + 1)
    run.close()
    counts = {k: sched[k] for k in ("frames_per_block", "steps_per_block", "first_block_steps")}
    if cfg["timesteps"]:
        counts["timesteps"] = sched["steps"]  # sample.py's default list for this student
    run.ship(cfg["export"], ema, mcfg, {"kind": "student", **counts, "shift": mcfg.shift,
                                        "init": os.path.basename(cfg["init"]), "real": os.path.basename(cfg["real"]),
                                        "real_guidance": cfg["real_guidance"], "steps": cfg["steps"],
                                        "batch_size": cfg["batch_size"],
                                        **({"first_real": os.path.basename(cfg["first_real"]),
                                            "first_guidance": cfg["first_guidance"],
                                            "first_weight": cfg["first_weight"]} if first else {})})
    T.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
