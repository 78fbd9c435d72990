"""The machinery every training stage shares, written once: `--key=value` config overrides, the
distributed set-up (DDP or FSDP2; gloo on CPU, nccl on GPU), EMA, atomic safetensors + JSON checkpoints with
resume, shipping a trained model, the JSONL log, tqdm progress and the NaN guard.

Checkpoints are two files, NAME.safetensors (tensors only) and NAME.json (config, step, optimizer
hyper-parameters, kind): nothing is ever unpickled. Randomness is drawn per step from a generator seeded
by (seed, step) over the *global* batch and sliced per rank, so a resumed run, and a run on N processes,
take exactly the steps an uninterrupted single-process run takes.
"""
import functools
import json
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import model as M


def die(msg):
    """Bad input: one clear line on stderr and exit code 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_overrides(defaults, argv):
    """nanoGPT-style `--key=value` overrides, typed by the default's type."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            die(f"arguments look like --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in cfg:
            die(f"unknown option --{key}; options: {', '.join('--' + k for k in cfg)}")
        kind = type(cfg[key])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = value.lower() in ("true", "1")
            elif cfg[key] is None:
                cfg[key] = value
            else:
                cfg[key] = kind(value)
        except ValueError:
            die(f"--{key} expects a {kind.__name__}, got {value!r}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# distributed


def setup_distributed(device=""):
    """(rank, world_size, device). Under torchrun: one process per device, DDP over gloo or nccl. `device`
    (a stage's --device) overrides the choice, and exits 2 with one line where it cannot be used."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():  # first, so that an override "cuda" means this rank's GPU
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, usable_device(device) if device else torch.device("cuda", local)
    return rank, world, usable_device(device or "cpu")


def teardown_distributed():
    """Leave together: a rank that closes its gloo connections while rank 0 still writes the shipped files
    can make the other abort (seen once as a SIGABRT in CI), so every rank waits at a barrier first."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def usable_device(name):
    """torch.device(name), or exit 2 with one line when this machine cannot use it."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        die(f"--device {name} is not usable here ({str(e).splitlines()[0]})")
    return device


def wrap_ddp(module, device):
    if dist.is_initialized() and dist.get_world_size() > 1:
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def wrap_fsdp(module):
    """FSDP2: every block, then the rest, is sharded across the ranks (parameters become DTensors; a forward
    gathers one block at a time). Make the EMA and the optimizer after this, so they hold shards too.
    Parameters, their gathers and the gradient reduction stay fp32; bf16 compute is --bf16's autocast, as under
    DDP. A bf16 parameter policy would also cast the root's inputs, the timesteps among them (937.5 -> 936)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return module
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in module.blocks:
        fully_shard(block)
    fully_shard(module)
    register_fsdp_forward_method(module, "encode_text")  # the toy's text embedding is used outside forward
    return module


def checkpoint_blocks(module):
    """Activation checkpointing: each block's activations are recomputed in the backward instead of stored.
    A forward without grad is never recomputed. A KV-cached forward with grad must attend to a fixed view
    of the cache that it never writes (rollout.Frozen): a recompute runs after later frames were written."""
    from torch.utils.checkpoint import checkpoint
    for block in module.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return module


def parallelize(net, parallel, device, checkpointing=False):
    """A trainable network under --checkpointing and --parallel (ddp | fsdp) -> (net, forward): `net` is what
    the EMA, the optimizer and the checkpoint hold (FSDP2 shards it in place), `forward` what the training
    forward calls (its DDP wrapper, or net itself). Call it before the EMA and the optimizer are made."""
    if parallel not in ("ddp", "fsdp"):
        die(f"--parallel must be ddp or fsdp, got {parallel!r}")
    if checkpointing:
        checkpoint_blocks(net)
    if parallel == "fsdp":
        net = wrap_fsdp(net)
        return net, net
    return net, wrap_ddp(net, device)


def full(tensor):
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor, ref):
    """A whole tensor from a checkpoint, sharded the way `ref` is (FSDP2), or as it is."""
    if isinstance(ref, DTensor) and tensor.shape == ref.shape:
        return distribute_tensor(tensor.to(ref.device), ref.device_mesh, ref.placements)
    return tensor


def unwrap(module):
    return module.module if hasattr(module, "module") else module


def bf16_is_native():
    """Whether bf16 matrix products run in hardware here: on CUDA, and on CPUs with AVX-512-BF16 or AMX. The
    stage scripts' --bf16 defaults to this, because an AVX2-only CPU emulates bf16: a toy teacher step took
    25 s under autocast against 2.7 s in fp32 on one (an AMD EPYC), while an AVX-512-BF16 CPU gains ~1.6x."""
    return torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device, enabled):
    """bf16 autocast (--bf16): the usual choice on GPUs and on CPUs with native bf16 (bf16_is_native)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def step_generator(seed, step, stream=0):
    """The step's randomness, the same on every rank and after a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + stream) % 2 ** 63)


def local_slice(n, rank, world):
    if n % world:
        die(f"batch_size {n} is not divisible by the {world} processes")
    per = n // world
    return slice(rank * per, (rank + 1) * per)


# ----------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """An fp32 shadow of a module's parameters."""

    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module, decay=None):
        d = self.decay if decay is None else decay
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def copy_to(self, module):
        own = module.state_dict()  # once: causal CD copies every step, and an FSDP2 state_dict runs hooks
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})


# ----------------------------------------------------------------------------------------------------
# checkpoints


def atomic_write(path, write):
    """write(tmp) then rename over `path`: readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def shard_metadata(path):
    """The metadata of a safetensors shard that a resumable job wrote (ODE trajectories, Wan latents); a
    damaged shard exits 2 with one line."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on a damaged file
        die(f"{path} is a damaged shard ({type(e).__name__}); delete it and it is made again")


def checkpoint_stem(path):
    """NAME, NAME.safetensors or NAME.json -> NAME: a checkpoint is the pair of files."""
    for ext in (".safetensors", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def save_checkpoint(stem, tensors, meta):
    """Write STEM.safetensors, then STEM.json, each atomically. Both carry one fresh `pair` tag, so a save
    killed between the two renames (new weights beside the old JSON) is caught on load, not trained on."""
    stem = checkpoint_stem(stem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, "pair": uuid.uuid4().hex}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        atomic_write(stem + ".safetensors", lambda p: save_file(tensors, p, metadata={"pair": meta["pair"]}))
        atomic_write(stem + ".json", lambda p: open(p, "w").write(json.dumps(meta, indent=1) + "\n"))
    except OSError as e:  # a read-only or full disk: one line, not a traceback
        die(f"cannot write checkpoint {stem} ({e})")


def load_checkpoint(stem):
    """(tensors, meta); a missing or corrupt pair is reported in one line (exit 2)."""
    stem = checkpoint_stem(stem)
    for ext in (".safetensors", ".json"):
        if not os.path.exists(stem + ext):
            die(f"checkpoint {stem + ext} not found")
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        with safe_open(stem + ".safetensors", "pt") as f:
            pair = (f.metadata() or {}).get("pair")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors and json raise several types on a damaged file
        die(f"checkpoint {stem} is corrupt or not ours ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(meta, dict) or "config" not in meta or "kind" not in meta:
        die(f"checkpoint {stem}.json has no model config/kind: not a checkpoint of this project")
    if pair and meta.get("pair") and pair != meta["pair"]:  # files from before the tag, or by hand, carry none
        die(f"checkpoint {stem}: its .safetensors and .json come from different saves (a save was killed "
            f"between the two); restore the pair or start the run afresh")
    return tensors, meta


def split_prefix(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_model(stem, device="cpu", dtype=torch.float32, prefix="model."):
    """A model from a checkpoint pair (shipped or training): (model, meta)."""
    tensors, meta = load_checkpoint(stem)
    try:
        cfg = M.config_from_dict(meta["config"])
        model = M.build(cfg)
        M.load_wan_weights(model, split_prefix(tensors, prefix))
    except (TypeError, ValueError) as e:
        die(f"checkpoint {stem} does not fit this code's model: {str(e)[:300]}")
    return model.to(device=device, dtype=dtype).eval(), meta


def export(stem, module_or_state, meta, dtype=torch.float16):
    """Ship a trained model: weights only (fp16 storage), config and kind in the JSON."""
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    save_checkpoint(stem, {"model." + k: v.to(dtype) for k, v in state.items()}, meta)


# ----------------------------------------------------------------------------------------------------
# the loop's bookkeeping


def logged_step(line):
    """The step of a log.jsonl line; inf for a blank or torn one (a run killed mid-append), so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return math.inf


def has_checkpoint(out):
    return os.path.exists(os.path.join(out, "ckpt.json"))


RESUMABLE = {"steps", "out", "export", "device", "ckpt_every", "log_every", "eval_every", "cost_json", "parallel",
             "checkpointing"}  # settings a resume may change


class Run:
    """One training run on disk: OUT/ckpt.{safetensors,json} holds the named modules, EMAs and optimizer
    states (AdamW moments as tensors, hyper-parameters in the JSON), the step and the wall clock;
    OUT/log.jsonl is its log. Constructed after the modules exist; resumes them when OUT/ckpt exists."""

    def __init__(self, out, total_steps, meta, modules=(), emas=(), optimizers=(), rank=0, world=1, log_every=10):
        self.ckpt = os.path.join(out, "ckpt")
        self.log_path = os.path.join(out, "log.jsonl")
        self.meta, self.rank, self.world = meta, rank, world
        self.total, self.log_every = total_steps, log_every
        self.modules, self.emas, self.optimizers = dict(modules), dict(emas), dict(optimizers)
        self.start, self.wall_before, self.last_good = 0, 0.0, None
        if has_checkpoint(out):
            self._load()
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            if os.path.exists(self.log_path):  # drop what a killed run logged after its last checkpoint
                with open(self.log_path) as f:
                    kept = [line for line in f if logged_step(line) <= self.start]
                atomic_write(self.log_path, lambda p: open(p, "w").writelines(kept))
        self.t0 = time.time()
        self.bar = tqdm(total=total_steps, initial=self.start, disable=rank != 0, dynamic_ncols=True)

    def _load(self):
        tensors, meta = load_checkpoint(self.ckpt)
        self.check_same_run(meta)
        for name, module in self.modules.items():  # every rank reads the whole file and keeps its shards
            own = module.state_dict()
            module.load_state_dict({k: shard_like(v, own[k]) for k, v in split_prefix(tensors, name + ".").items()})
        for name, ema in self.emas.items():
            ema.shadow = {k: shard_like(v.float(), ema.shadow[k]) for k, v in split_prefix(tensors, f"ema_{name}.").items()}
        for name, opt in self.optimizers.items():
            params = [p for group in opt.param_groups for p in group["params"]]  # the state's indices
            state = {}
            for key, value in split_prefix(tensors, f"optim_{name}.").items():
                idx, field = key.split(".", 1)
                state.setdefault(int(idx), {})[field] = shard_like(value, params[int(idx)])
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
        self.start, self.wall_before, self.last_good = meta["step"], meta["wall_s"], self.ckpt

    def check_same_run(self, saved):
        """A folder resumes only the run that made it: the same model, kind and settings, except those that
        may change on a resume (e.g. more --steps). Otherwise a second run with the same default folder (say,
        a second pass of a stage with another --seed) would silently continue, and ship, the first."""
        flat = lambda m: {"kind": m.get("kind"), **{f"config.{k}": v for k, v in (m.get("config") or {}).items()},
                          **m.get("train", {})}
        now, was = flat(json.loads(json.dumps(self.meta))), flat(saved)  # through JSON: tuples read as lists
        differ = sorted(k for k in now.keys() | was.keys() if k not in RESUMABLE and now.get(k) != was.get(k))
        if differ:
            k = differ[0]
            die(f"{os.path.dirname(self.ckpt)} holds another run ({k} was {was.get(k)!r}, now {now.get(k)!r}"
                f"{f' and {len(differ) - 1} more' if len(differ) > 1 else ''}): pass another --out, or delete it")

    def elapsed(self):
        return self.wall_before + time.time() - self.t0

    def gathered(self, items):
        """{key: whole tensor on the CPU} on rank 0, {} elsewhere; under FSDP2 every rank takes part in
        gathering each shard, one tensor at a time (no rank ever holds the whole state on its device)."""
        out = {}
        for key, value in items:
            value = full(value)
            if self.rank == 0:
                out[key] = value.detach().cpu()
        return out

    def save(self, step):
        """Every rank calls this (FSDP2 gathers are collective); rank 0 writes."""
        tensors = {}
        for name, module in self.modules.items():
            tensors.update(self.gathered((f"{name}.{k}", v) for k, v in module.state_dict().items()))
        for name, ema in self.emas.items():
            tensors.update(self.gathered((f"ema_{name}.{k}", v) for k, v in ema.shadow.items()))
        groups = {}
        for name, opt in self.optimizers.items():
            sd = opt.state_dict()
            groups[name] = sd["param_groups"]
            tensors.update(self.gathered((f"optim_{name}.{idx}.{k}", torch.as_tensor(v))
                                         for idx, state in sd["state"].items() for k, v in state.items()))
        if self.rank != 0:
            return
        meta = {**self.meta, "step": step, "wall_s": round(self.elapsed(), 1), "param_groups": groups}
        save_checkpoint(self.ckpt, tensors, meta)
        self.last_good = self.ckpt

    def check(self, loss, step):
        """The loss as a float, averaged over ranks; the NaN guard stops every rank with a clear message
        and leaves the last good checkpoint as it was."""
        value = loss.detach().float().reshape(1)
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        value = value.item()
        if not math.isfinite(value):
            where = f"{self.last_good}.safetensors" if self.last_good else "none written yet"
            print(f"error: loss is {value} at step {step}; stopping. Last good checkpoint: {where}", file=sys.stderr)
            sys.exit(1)
        return value

    def log(self, step, **values):
        """Called every step; writes every `log_every` steps and at the last."""
        self.bar.update(1)
        if self.rank != 0 or (step % self.log_every and step != self.total):
            return
        values = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, "wall_s": round(self.elapsed(), 1), **values}) + "\n")
        self.bar.set_postfix({k: v for k, v in values.items() if isinstance(v, float)})

    def record(self, step, scores):
        """An evaluation record in the log ({"step", "wall_s", "eval": {...}}): the quality-vs-time curve."""
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, "wall_s": round(self.elapsed(), 1), "eval": scores}) + "\n")

    def ship(self, stem, ema, cfg, meta, log_name=None):
        """Export the EMA weights as a shipped checkpoint (gathered on every rank, written by rank 0), its
        JSONL log beside it (as NAME.log.jsonl unless named)."""
        if not stem:
            return
        weights = self.gathered(ema.shadow.items())
        if self.rank != 0:
            return
        log_name = log_name or os.path.basename(stem) + ".log.jsonl"
        export(stem, weights, {**meta, "config": asdict(cfg), "wall_s": round(self.elapsed(), 1), "log": log_name})
        if os.path.exists(self.log_path):  # the training curve ships beside the weights
            shutil.copy(self.log_path, os.path.join(os.path.dirname(os.path.abspath(stem)), log_name))

    def close(self):
        self.bar.close()


def optimizer_step(opt, loss, lr, clip):
    """Backward, clip, step at learning rate `lr`; returns the gradient norm before clipping."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
    opt.step()
    return norm


def lr_at(step, lr, warmup, total=0, decay=0):
    """Warm-up, constant, then (decay > 0) a linear cool-down to zero over the last `decay` of `total` steps:
    the constant phase can be resumed and extended, and the cool-down sharpens the weights at the end."""
    cool = min(1.0, (total - step) / decay) if decay else 1.0
    return lr * min(1.0, (step + 1) / max(1, warmup), cool)
