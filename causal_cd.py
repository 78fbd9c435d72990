"""Stage 2: a few-step causal student from the AR teacher, by consistency distillation or by ODE regression.

    python causal_cd.py --method=cd                                # causal CD (CF++), frame-wise
    python causal_cd.py --method=ode                               # causal ODE (Causal Forcing), frame-wise
    python causal_cd.py --method=ode --frames_per_block=3          # the same, chunk-wise
    python causal_cd.py --method=bidir_ode --frames_per_block=3    # Self-Forcing-style: ODE pairs of the base
    python causal_cd.py --teacher=checkpoints/world_ar_teacher_framewise  # the world model: actions come along
    torchrun --nproc_per_node=2 causal_cd.py --method=cd           # the same on N processes (DDP)
    torchrun --nproc_per_node=8 causal_cd.py --teacher=checkpoints/wan_ar_teacher --data=DATA \
        --parallel=fsdp --checkpointing=true                       # Wan scale: GT latents and umT5 contexts

Every method trains x̂0 = x_t - σ v of a student initialised from its teacher, with an MSE in x0 space:
  cd         each step: a grid point t_k of the shifted 48-step grid for the whole clip, x_t from GT; the frozen
             AR teacher takes ONE guided Euler step to t_{k+1} on the GT context, and the target is the EMA
             target's x̂0 there. No stored data; the EMA (decay 0.99, every step) is part of the checkpoint.
  ode        first store, per GT clip, the teacher's whole 48-step guided ODE (teacher-forced on GT, the same t
             for all frames): x at grid indices 0/12/24/36 (the warped 4-step list), the ODE end and the GT;
             then regress the ODE end from one of the 4 stored points, teacher-forced on the GT.
  bidir_ode  the same data from the bidirectional base (no GT context, whole clip jointly); the causal
             student regresses the ODE end from a snapshot per block, with a block-causal mask and no GT.
Because the AR teacher's trajectory of frame i depends only on its noise and the GT frames before it, cd and
ode learn a function of what the causal student sees; bidir_ode does not (its targets depend on future noise).
A run resumes from OUT/ckpt (and the trajectories from their shards); `--export=STEM` ships the EMA of the
student as a kind "student" checkpoint for sample.py; `--cost_json` records the Stage-2 cost. With --data (a
latent data set from `python wan.py encode`, for a Wan-scale teacher) cd's GT clips are Wan latents with their
umT5 contexts; the ODE methods store toy token ids with their trajectories and stay on the toy world.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import model as M
import rollout
import trainer as T

DEFAULTS = dict(
    method="cd",  # cd | ode | bidir_ode
    frames_per_block=1,  # 1 = frame-wise, 3 = chunk-wise
    teacher="",  # cd, ode: the stage-1 AR teacher (default checkpoints/ar_teacher_framewise or _chunkwise)
    base="checkpoints/base",  # bidir_ode: the bidirectional base that draws the ODE pairs
    data="",  # cd: a latent data set (`python wan.py encode`) for a Wan-scale teacher; GT latents, umT5 contexts
    out="",  # run folder (default runs/<name>_fw or _b<frames_per_block>)
    export="",  # ship the student (its EMA) to this stem when done
    cost_json="",  # merge this run's Stage-2 cost into this JSON (e.g. checkpoints/stage2_cost.json)
    clips=256,  # ode, bidir_ode: GT clips whose ODE trajectories are stored (~12 passes over them in training)
    guidance=0.0,  # the teacher's guidance; 0 = the paper's (3 for the CD step, 6 for the ODE trajectories)
    steps=400,  # toy: ~25 min of CD on 2 CPU cores (the paper: >= 3K steps at batch 64, Wan scale)
    batch_size=8,
    lr=2e-4,  # toy: a fine-tune of a trained teacher, 5x below its lr (the paper's 2e-6 is for 1.3B weights)
    warmup=20,
    weight_decay=0.0,
    grad_clip=1.0,
    ema=0.99,  # the EMA of the student: the CD target, and the weights every method ships
    seed=0,
    bf16=T.bf16_is_native(),  # autocast; off where the CPU would emulate bf16 (~10x slower)
    ckpt_every=100,
    log_every=10,
    device="",
    parallel="ddp",  # ddp | fsdp (FSDP2: the student, its EMA, target and optimizer state sharded over the ranks)
    checkpointing=False,  # recompute the student's block activations in the backward (memory for compute)
)
NAMES = {"cd": "causal_cd", "ode": "causal_ode", "bidir_ode": "bidir_ode"}
TEACHERS = {1: "checkpoints/ar_teacher_framewise", 3: "checkpoints/ar_teacher_chunkwise"}
GRID = 48  # the ODE / CD grid; with the same shift its indices 0/12/24/36 are the warped 4-step list
SNAPSHOTS = (0, 12, 24, 36)
STUDENT_STEPS = 4  # the shipped students sample on the 4-step list (and frame-wise frame 0 always does)


# ----------------------------------------------------------------------------------------------------
# the three forwards


def guided_velocity(teacher, x, t, ctx, guidance, fpb, gt, actions=None):
    """v_u + w (v_c - v_u) from one batched forward; teacher-forced on the GT frames when `gt` is given,
    else the whole clip jointly (the bidirectional base). `actions` [B, F]: a world model's."""
    if gt is None:
        return rollout.velocity(teacher, x, t, ctx, guidance, actions=actions)
    return rollout.velocity(teacher, x, t, ctx, guidance, frames_per_block=fpb, clean_x=gt, actions=actions)


def predict_x0(net, x_t, t, tokens, gt, fpb, actions=None):
    """The student's (or target's) x̂0, conditional only: teacher-forced on the GT frames when `gt` is given,
    else block-causal over its own noisy blocks (the bidir_ode student, which never sees GT)."""
    ctx = T.unwrap(net).encode_text(tokens)
    kw = dict(frames_per_block=fpb) if gt is None else dict(frames_per_block=fpb, clean_x=gt)
    return M.x0_from_v(x_t, net(x_t, t, ctx, actions=actions, **kw), t)


@torch.no_grad()
def cd_target(teacher, target, b, guidance, fpb):
    """One guided Euler step of the teacher from t_k to t_{k+1}, then the EMA target's x̂0 at t_{k+1} on the
    same GT context: adjacent grid points must agree, so the student learns the teacher's flow map."""
    ctx, a = rollout.contexts(teacher, b["tokens"], guidance), b.get("actions")
    x_next = M.euler_step(b["x_t"], guided_velocity(teacher, b["x_t"], b["t"], ctx, guidance, fpb, b["gt"], a),
                          b["t"], b["t_next"])
    return predict_x0(target, x_next, b["t_next"], b["tokens"], b["gt"], fpb, a)


def loss_fn(net, b, cfg, teacher=None, target=None):
    """MSE between the student's x̂0 and its target: the CD target (cd) or the stored ODE end."""
    fpb = cfg["frames_per_block"]
    pred = predict_x0(net, b["x_t"], b["t"], b["tokens"], b.get("gt"), fpb, b.get("actions"))
    goal = cd_target(teacher, target, b, cfg["guidance"], fpb) if cfg["method"] == "cd" else b["target"]
    return F.mse_loss(pred.float(), goal.float())


# ----------------------------------------------------------------------------------------------------
# the ODE data set


@torch.no_grad()
def ode_trajectory(teacher, tokens, noise, guidance, shift, fpb=None, gt=None):
    """48 guided Euler steps from noise, every frame at the same t (teacher-forced on `gt` when given):
    -> [B, 5, C, F, H, W], x at grid indices 0/12/24/36 and the ODE end."""
    grid = torch.cat([M.timesteps(GRID, shift), torch.zeros(1)]).tolist()
    ctx = rollout.contexts(teacher, tokens, guidance)
    x, keep = noise, []
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if i in SNAPSHOTS:
            keep.append(x)
        t_now = torch.full((x.shape[0], x.shape[2]), t, device=x.device)
        x = M.euler_step(x, guided_velocity(teacher, x, t_now, ctx, guidance, fpb, gt), t, t_next)
    return torch.stack(keep + [x], dim=1)


class Trajectories:
    """The stored ODE data: FOLDER/NNNNN.safetensors, one shard per batch of GT clips, holding `x`
    [n, 6, C, F, H, W] in fp16 (x at t = grid[0/12/24/36], the ODE end, the GT), `tokens` [n, L] and `t` [4];
    its metadata says how it was made and how long it took. A shard is written atomically, so an interrupted
    generation resumes at the missing ones, and shards made with other settings are refused."""

    def __init__(self, folder, settings):
        self.folder, self.settings = folder, settings
        self.per_shard = settings["batch_size"]
        self.shards = math.ceil(settings["clips"] / self.per_shard)
        self.t = M.timesteps(GRID, settings["shift"])[list(SNAPSHOTS)]
        made = json.dumps(settings, sort_keys=True)
        for i in range(self.shards):
            if os.path.exists(self.path(i)) and T.shard_metadata(self.path(i)).get("settings") != made:
                T.die(f"{folder} holds trajectories made with other settings than {settings}; "
                      "delete it or pass another --out")

    def path(self, i):
        return os.path.join(self.folder, f"{i:05d}.safetensors")

    def missing(self):
        return [i for i in range(self.shards) if not os.path.exists(self.path(i))]

    def write(self, i, x, tokens, seconds):
        os.makedirs(self.folder, exist_ok=True)
        tensors = {"x": x.half().contiguous().cpu(), "tokens": tokens.cpu(), "t": self.t}
        meta = {"settings": json.dumps(self.settings, sort_keys=True), "seconds": f"{seconds:.3f}"}
        T.atomic_write(self.path(i), lambda p: save_file(tensors, p, metadata=meta))

    def open(self):
        """Memory-map every shard: a batch reads only its own rows."""
        self.files = [safe_open(self.path(i), "pt") for i in range(self.shards)]
        self.tokens = torch.cat([f.get_tensor("tokens") for f in self.files])

    def rows(self, idx):
        x = torch.cat([self.files[j // self.per_shard].get_slice("x")[j % self.per_shard:j % self.per_shard + 1]
                       for j in idx.tolist()])
        return x.float(), self.tokens[idx]

    def bytes(self):
        return sum(os.path.getsize(self.path(i)) for i in range(self.shards))

    def seconds(self):
        return sum(float(T.shard_metadata(self.path(i))["seconds"]) for i in range(self.shards))


def generate(store, teacher, cfg, shift, frames, rank, world, device):
    """Fill the missing shards; each process takes every world-th one. Shard i holds the GT clips of stream
    batch i and noise from (seed, i), so it is the same whoever makes it and whenever."""
    B, bidir = cfg["batch_size"], cfg["method"] == "bidir_ode"
    mine = [i for i in store.missing() if i % world == rank]
    for i in tqdm(mine, desc="ODE trajectories", disable=rank != 0, dynamic_ncols=True):
        start = time.time()
        n = min(B, cfg["clips"] - i * B)
        clips = next(data.ClipStream(B, cfg["seed"], frames=frames, start_batch=i))
        gt, tokens = clips["video"][:n], clips["tokens"][:n]
        noise = torch.randn(gt.shape, generator=T.step_generator(cfg["seed"], i, stream=1))
        with T.autocast(device, cfg["bf16"]):
            traj = ode_trajectory(teacher, tokens.to(device), noise.to(device), cfg["guidance"], shift,
                                  cfg["frames_per_block"], None if bidir else gt.to(device))
        store.write(i, torch.cat([traj, gt[:, None].to(device)], dim=1), tokens, time.time() - start)
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# batches, cost, the run


def make_batch(cfg, step, local, frames, grid, store, actions=False, latents=None):
    """This rank's share of the step's global batch, drawn from (seed, step): x_t, t [B, F], tokens (toy ids, or
    umT5 contexts with `latents`), the GT context `gt` (not for bidir_ode) and t_next (cd) or the stored ODE end
    `target`; with `actions` (the world model, cd only) the clips' actions too."""
    g = T.step_generator(cfg["seed"], step)
    B = cfg["batch_size"]
    if cfg["method"] == "cd":  # fresh GT clips; one grid index k < 47 per clip, shared by its frames
        gt, text, acts = data.ground_truth(step, B, cfg["seed"], frames, actions, latents)
        k = torch.randint(0, GRID - 1, (B,), generator=g)[:, None].expand(B, frames)
        x_t = M.add_noise(gt, torch.randn(gt.shape, generator=g), grid[k])
        b = dict(x_t=x_t, t=grid[k], t_next=grid[k + 1], tokens=text, gt=gt)
        if actions:
            b["actions"] = acts
        return {key: value[local] for key, value in b.items()}
    idx = torch.randint(0, cfg["clips"], (B,), generator=g)[local]
    blocks = 1 if cfg["method"] == "ode" else frames // cfg["frames_per_block"]  # ode: one snapshot per clip
    k = torch.randint(0, len(SNAPSHOTS), (B, blocks), generator=g)[local].repeat_interleave(frames // blocks, dim=1)
    traj, tokens = store.rows(idx)
    x_t = traj.gather(1, k[:, None, None, :, None, None].expand(-1, 1, *traj.shape[2:])).squeeze(1)
    b = dict(x_t=x_t, t=store.t[k], tokens=tokens, target=traj[:, 4])
    if cfg["method"] == "ode":
        b["gt"] = traj[:, 5]
    return b


def record_cost(path, name, entry):
    """Merge one run's Stage-2 cost into the JSON; with causal ODE and causal CD at the same block size in
    it, add the ratios ODE / CD."""
    try:
        cost = json.load(open(path)) if os.path.exists(path) else {}
    except ValueError:
        T.die(f"--cost_json {path} is not JSON")
    cost[name] = entry
    ode, cd = cost.get("causal_ode"), cost.get("causal_cd")
    for key in ("teacher_forward_ratio", "wall_clock_ratio"):
        cost.pop(key, None)
    if ode and cd and ode["frames_per_block"] == cd["frames_per_block"]:
        cost["teacher_forward_ratio"] = round(ode["teacher_forwards"] / cd["teacher_forwards"], 3)
        cost["wall_clock_ratio"] = round(ode["wall_clock_s"] / cd["wall_clock_s"], 3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    T.atomic_write(path, lambda p: open(p, "w").write(json.dumps(cost, indent=1) + "\n"))


def load_source(cfg, device):
    """The frozen model the student learns from (and starts as): the AR teacher, or the base for bidir_ode."""
    fpb = cfg["frames_per_block"]
    if cfg["method"] == "bidir_ode":
        stem, kind, how = cfg["base"], "base", "python teacher.py --stage=base"
    else:
        if not cfg["teacher"] and fpb not in TEACHERS:
            T.die(f"no default teacher for --frames_per_block={fpb}; pass --teacher=STEM")
        stem, kind = cfg["teacher"] or TEACHERS[fpb], "ar_teacher"
        how = f"python teacher.py --stage=ar --frames_per_block={fpb}"
    stem = T.checkpoint_stem(stem)
    if not os.path.exists(stem + ".json"):
        T.die(f"{kind} checkpoint {stem}.safetensors not found; train it first: {how} --export={stem}")
    net, meta = T.load_model(stem, device)
    if meta["kind"] != kind:
        T.die(f"{stem} is a {meta['kind']!r} checkpoint; --method={cfg['method']} needs a {kind!r} one")
    if kind == "ar_teacher" and meta["frames_per_block"] != fpb:
        T.die(f"teacher {stem} has {meta['frames_per_block']} frame(s) per block, not --frames_per_block={fpb}")
    if net.cfg.frames % fpb:
        T.die(f"--frames_per_block must divide the {net.cfg.frames} frames, got {fpb}")
    return net.requires_grad_(False), meta, stem


def main(argv):
    cfg = T.parse_overrides(DEFAULTS, argv)
    if cfg["method"] not in NAMES:
        T.die(f"--method must be one of {', '.join(NAMES)}, got {cfg['method']!r}")
    for key in ("frames_per_block", "steps", "batch_size", "clips", "ckpt_every", "log_every"):
        if cfg[key] <= 0:
            T.die(f"--{key} must be positive, got {cfg[key]}")
    if not 0 <= cfg["ema"] < 1:
        T.die(f"--ema must lie in [0, 1), got {cfg['ema']}")
    if not (cfg["guidance"] == 0 or 1 <= cfg["guidance"] < math.inf):  # below 1 would silently mean 1 (no guidance)
        T.die(f"--guidance must be 0 (the paper's) or a finite number >= 1 (1 = no guidance), got {cfg['guidance']}")
    if cfg["data"] and cfg["method"] != "cd":
        T.die("--data is for --method=cd: the ODE methods store toy prompt ids with their trajectories")
    cfg["guidance"] = cfg["guidance"] or (3.0 if cfg["method"] == "cd" else 6.0)
    fpb, name = cfg["frames_per_block"], NAMES[cfg["method"]]
    out = cfg["out"] or os.path.join("runs", name + ("_fw" if fpb == 1 else f"_b{fpb}"))

    rank, world, device = T.setup_distributed(cfg["device"])
    local = T.local_slice(cfg["batch_size"], rank, world)
    source, smeta, stem = load_source(cfg, device)
    mcfg, shift, frames = source.cfg, smeta.get("shift", source.cfg.shift), source.cfg.frames
    actions = mcfg.num_actions > 0  # a world-model teacher: its clips come with their actions
    if actions and cfg["method"] != "cd":
        T.die(f"{stem} is an action world model; it distils by causal CD (--method=cd) only")
    latents = None
    if cfg["data"]:
        latents = data.LatentStream(cfg["data"], cfg["batch_size"], cfg["seed"])
        latents.check(mcfg, f"--teacher {stem}")
    if not cfg["out"]:  # never resume a toy text-to-video run into a world model or a Wan-scale one
        out += "_world" if actions else "_latents" if latents else ""
    store = None
    if cfg["method"] != "cd":
        settings = {k: cfg[k] for k in ("method", "frames_per_block", "guidance", "seed", "batch_size", "clips",
                                        "bf16")}  # bf16: shards drawn in it and in fp32 must not mix
        store = Trajectories(os.path.join(out, "trajectories"), {**settings, "source": stem, "shift": shift})
        generate(store, source, cfg, shift, frames, rank, world, device)
        store.open()

    net = M.build(mcfg).to(device)
    net.load_state_dict(source.state_dict())
    teacher = source if cfg["method"] == "cd" else None  # the ODE methods are done with theirs
    del source
    net, ddp = T.parallelize(net, cfg["parallel"], device, cfg["checkpointing"])  # before the EMA and optimizer
    ema = T.EMA(net, cfg["ema"])  # no warm-up: the target starts as the teacher, which is where the student starts
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=cfg["weight_decay"])
    run = T.Run(out, cfg["steps"], {"kind": "train_" + name, "config": asdict(mcfg), "train": cfg},
                modules={"student": net}, emas={"student": ema}, optimizers={"student": opt}, rank=rank, world=world,
                log_every=cfg["log_every"])
    target = None
    if cfg["method"] == "cd":  # the EMA lives in the checkpoint; the target module is its working copy
        target = M.build(mcfg).to(device).requires_grad_(False).eval()
        if cfg["parallel"] == "fsdp":  # sharded like the student, so that the EMA's shards copy into it
            target = T.wrap_fsdp(target)
        ema.copy_to(target)
    grid = M.timesteps(GRID, shift)

    net.train()
    for step in range(run.start, cfg["steps"]):
        b = {k: v.to(device) for k, v in make_batch(cfg, step, local, frames, grid, store, actions, latents).items()}
        with T.autocast(device, cfg["bf16"]):
            loss = loss_fn(ddp, b, cfg, teacher, target)
        value = run.check(loss, step)
        lr = T.lr_at(step, cfg["lr"], cfg["warmup"])
        grad_norm = T.optimizer_step(opt, loss, lr, cfg["grad_clip"])
        ema.update(net)
        if target is not None:
            ema.copy_to(target)
        run.log(step + 1, loss=value, grad_norm=grad_norm, lr=lr)
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["steps"]:
            run.save(step + 1)
    run.close()

    passes = 2 if cfg["guidance"] > 1 else 1  # a guided teacher evaluation of one clip counts 2
    train_s = run.elapsed() * world  # device-seconds, like the paper's GPU-hours
    cost = {"frames_per_block": fpb, "steps": cfg["steps"], "batch_size": cfg["batch_size"]}
    if store is None:
        cost.update(teacher_forwards=cfg["steps"] * cfg["batch_size"] * passes, stored_bytes=0,
                    wall_clock_s=round(train_s, 1))
    else:
        cost.update(clips=cfg["clips"], teacher_forwards=cfg["clips"] * GRID * passes, stored_bytes=store.bytes(),
                    wall_clock_s=round(store.seconds() + train_s, 1), generation_s=round(store.seconds(), 1))
    if rank == 0 and cfg["cost_json"]:
        record_cost(cfg["cost_json"], name, cost)
    first = STUDENT_STEPS if fpb == 1 else None  # frame-wise: frame 0 keeps its 4 steps whatever --steps says
    run.ship(cfg["export"], ema, replace(mcfg, shift=shift),  # the config carries the shift sample.py must use
             {"kind": "student", "frames_per_block": fpb, "steps_per_block": STUDENT_STEPS, "first_block_steps": first,
              "shift": shift, "init": cfg["method"], "teacher": stem, "steps": cfg["steps"],
              "batch_size": cfg["batch_size"], "stage2_cost": cost})
    T.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
