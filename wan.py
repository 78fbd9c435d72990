"""The Wan scale: umT5 text, the Wan VAE and a Wan2.1-size causal DiT, streamed frame by frame.

    python wan.py convert framewise-2step.pt checkpoints/wan_cfpp_2step.safetensors --ema   # once per release
    python wan.py encode --wan-dir Wan2.1-T2V-1.3B-Diffusers --videos clips/ --out data/wan  # training latents
    python sample.py --model wan2.1-1.3b --wan-dir Wan2.1-T2V-1.3B-Diffusers \\
        --ckpt checkpoints/wan_cfpp_2step.safetensors --prompt "a corgi runs on a beach"

--wan-dir is the diffusers layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers: `tokenizer/` and `text_encoder/`
(transformers UMT5EncoderModel), `vae/` (diffusers AutoencoderKLWan); its `transformer/` is the
bidirectional base, which model.from_pretrained reads. The DiT is model.py's; this file only adds what
lies around it. transformers and diffusers are imported inside the loaders, so the toy path never needs them.

Released generators (Causal Forcing, CF++, Self-Forcing) are torch.save dicts {"generator": ...,
"generator_ema": ...} with `model.`-prefixed keys. `convert` reads them with weights_only=True — plain
tensors, never code — and writes the project's checkpoint pair (NAME.safetensors + NAME.json) once, so
sampling never unpickles anything.
"""
import argparse
import html
import json
import math
import os
import pickle
import re
import sys
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import model as M
import rollout
import trainer as T

FPS = 16  # Wan's sample_fps
TEXT_LEN = 512  # umT5 tokens per prompt, zero-padded past the prompt's own


# ----------------------------------------------------------------------------------------------------
# umT5


def clean_prompt(text):
    """Wan's prompt cleaning, less ftfy's mojibake repair: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class TextEncoder:
    """umT5-XXL: prompts -> context [B, 512, 4096]. Wan encodes 512 padded tokens, keeps the prompt's own
    (its tokens and </s>) and zero-pads back to 512; zeroing the padded rows is the same thing."""

    def __init__(self, tokenizer, encoder, max_length=TEXT_LEN):
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder, max_length

    def __call__(self, prompts):
        return self.encode(prompts)[0]

    @torch.no_grad()
    def encode(self, prompts):
        """-> (context [B, 512, D] float32, lengths [B]: each prompt's real rows, the rest being zeros)."""
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
                               truncation=True, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return (h * mask[..., None]).float(), batch.attention_mask.sum(1)


def check_wan_dir(folder):
    for sub in ("tokenizer", "text_encoder", "vae"):
        if not os.path.isdir(os.path.join(folder, sub)):
            T.die(f"--wan-dir {folder} has no {sub}/ (the diffusers layout of Wan2.1-T2V-1.3B-Diffusers)")


def load_text_encoder(folder, device="cpu"):
    """umT5 in bf16 on CUDA (Wan's own choice; 11 GB for XXL), else fp32."""
    from transformers import AutoTokenizer, UMT5EncoderModel
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype)
    return TextEncoder(tokenizer, encoder.to(device).eval())


# ----------------------------------------------------------------------------------------------------
# Wan VAE


class VAE:
    """The Wan VAE (fp32, as Wan runs it) on normalised latents z = (mu - mean) / std, the space the DiT is
    trained in. Causal in time: 4n + 1 frames <-> n + 1 latents; latent 0 is frame 0 alone, every later one
    4 frames."""

    def __init__(self, vae):
        self.vae = vae
        self.mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

    @property
    def channels(self):
        return self.vae.config.z_dim

    @torch.no_grad()
    def encode(self, video):
        """[B, 3, 4n+1, H, W] in [-1, 1] -> [B, C, n+1, H/8, W/8]: the posterior mean (Wan ignores its variance)."""
        mu = self.vae.encode(video.float()).latent_dist.mode()
        return (mu - self.mean.to(mu.device)) / self.std.to(mu.device)

    @torch.no_grad()
    def decode(self, z):
        z = z.float() * self.std.to(z.device) + self.mean.to(z.device)
        return self.vae.decode(z).sample

    def stream(self):
        """A decoder fed one latent frame [B, C, 1, h, w] at a time; it returns the pixel frames that latent
        completes (1 for the first, then 4), keeping the causal convolutions' feature cache between calls.
        Together they equal decode() of the whole video (tested). This is diffusers' own per-latent decode
        loop with the cache held by us, so frames come out while the DiT is still generating."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
        cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in self.vae.decoder.modules())
        first = True

        @torch.no_grad()
        def feed(z):
            nonlocal first
            z = z.float() * self.std.to(z.device) + self.mean.to(z.device)
            x = self.vae.decoder(self.vae.post_quant_conv(z), feat_cache=cache, feat_idx=[0], first_chunk=first)
            first = False
            return x.clamp(-1, 1)
        return feed


def load_vae(folder, device="cpu"):
    from diffusers import AutoencoderKLWan
    return VAE(AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32).to(device).eval())


# ----------------------------------------------------------------------------------------------------
# the DiT


def config_from_state(state):
    """The DiT config a state dict with official names implies (every Wan model has 128-wide heads)."""
    dim, in_dim, *patch = state["patch_embedding.weight"].shape
    return M.Config(dim=dim, ffn_dim=state["blocks.0.ffn.0.weight"].shape[0], num_heads=dim // 128,
                    num_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
                    freq_dim=state["time_embedding.0.weight"].shape[1], text_dim=state["text_embedding.0.weight"].shape[1],
                    in_dim=in_dim, out_dim=state["head.head.weight"].shape[0] // math.prod(patch), patch_size=tuple(patch))


def load_dit(source, device="cpu"):
    """(model, meta) from a converted checkpoint (NAME.safetensors + NAME.json) or a Wan folder (official or
    diffusers `transformer/`: the bidirectional base)."""
    if os.path.isdir(source):
        try:
            return M.from_pretrained(source, device=device).eval(), {"kind": "base"}
        except Exception as e:  # no config.json or weights, other shapes, a damaged file (several error types)
            T.die(f"{source} is not a Wan DiT folder ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return T.load_model(T.checkpoint_stem(source), device)


def stream_video(dit, vae, context, noise, p, generator):
    """Yield the video [B, 3, k, H, W] in [-1, 1] as it is decoded. The DiT streams latent blocks through the
    KV cache (rollout.stream, the few-step consistency sampler), and every latent frame goes through the
    causal VAE decoder as soon as it exists: frame 0 after the first latent, then 4 frames per latent.
    On CUDA the DiT runs under bf16 autocast, the VAE outside it in fp32."""
    device = noise.device
    blocks = rollout.stream(dit, context, noise, p["fpb"], p["timesteps"], "consistency", p["first"],
                            window=p["window"], sink=p["sink"], generator=generator)
    decode = vae.stream()
    while True:
        with T.autocast(device, device.type == "cuda"):
            block = next(blocks, None)
        if block is None:
            return
        for i in range(block.shape[2]):
            yield decode(block[:, :, i:i + 1])


def load_generator(a, device):
    """sample.py's Wan path: check the flags, then load the few-step student of the preset's architecture."""
    if not (a.wan_dir and a.ckpt):
        T.die(f"--model {a.model} needs --wan-dir (umT5 + VAE) and --ckpt (a student from `python wan.py convert`)")
    check_wan_dir(a.wan_dir)
    if a.bench or a.first_frame or a.actions:
        T.die("--bench, --compare, --first-frame and --actions are toy-path flags")
    if a.guidance not in (None, 1.0):
        T.die("--guidance: the Wan path has no negative-prompt guidance; its students are guidance-free")
    if not a.out.lower().endswith(".mp4"):
        T.die(f"--out {a.out!r}: the Wan path writes .mp4")
    dit, meta = load_dit(a.ckpt, device)
    if meta.get("kind") != "student":
        T.die(f"{a.ckpt} is a {meta.get('kind')!r} checkpoint; the Wan path samples few-step students")
    want, got = M.get_config(a.model), dit.cfg
    arch = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "patch_size")
    if any(getattr(want, f) != getattr(got, f) for f in arch):
        T.die(f"{a.ckpt} is a {got.dim}-wide {got.num_layers}-layer DiT, not {a.model}")
    return dit, meta


def write_videos(a, dit, prompts, p, device):
    """sample.py's Wan path: encode the prompts, stream each video into its mp4 as it is decoded."""
    import imageio.v2 as imageio
    cfg = dit.cfg
    text = load_text_encoder(a.wan_dir, device)
    context = text(prompts)
    del text  # umT5-XXL is 11 GB in bf16: gone before the DiT runs
    vae = load_vae(a.wan_dir, device)
    if context.shape[-1] != cfg.text_dim or vae.channels != cfg.in_dim:
        T.die(f"--wan-dir's umT5 ({context.shape[-1]}) / VAE ({vae.channels} channels) do not fit the DiT "
              f"(text_dim {cfg.text_dim}, in_dim {cfg.in_dim})")
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn(len(prompts), cfg.in_dim, p["frames"], cfg.height, cfg.width, generator=g).to(device)
    stem = os.path.splitext(a.out)[0]
    paths = [a.out] if len(prompts) == 1 else [f"{stem}_{i}.mp4" for i in range(len(prompts))]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    writers = [imageio.get_writer(path, fps=FPS) for path in paths]
    parts = []
    for frames in stream_video(dit, vae, context, noise, p, g):
        parts.append(data.to_uint8(frames))
        for writer, video in zip(writers, parts[-1]):
            for frame in video:
                writer.append_data(frame)
    for writer in writers:
        writer.close()
    video = np.concatenate(parts, axis=1)
    print(f"wrote {', '.join(paths)}: {video.shape[1]} frames of {video.shape[3]}x{video.shape[2]} at {FPS} fps",
          file=sys.stderr)
    if a.save_npy:
        np.save(a.save_npy, video)
        print(f"wrote {a.save_npy} {tuple(video.shape)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# the latent data set (its format and reader: data.LatentStream)


def read_video(path, frames, height, width):
    """The first `frames` frames of a video, each scaled (antialiased bilinear) to cover height x width and
    centre-cropped: [3, frames, height, width] in [-1, 1]."""
    import imageio.v2 as imageio

    def fit(frame):
        x = torch.from_numpy(np.ascontiguousarray(frame[..., :3])).permute(2, 0, 1)[None].float() / 127.5 - 1
        h, w = x.shape[2:]
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True) if size != (h, w) else x
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        return x[0, :, top:top + height, left:left + width].clamp(-1, 1)

    try:
        with imageio.get_reader(path) as reader:
            clip = [fit(frame) for _, frame in zip(range(frames), reader)]
    except Exception as e:  # imageio and ffmpeg raise several types on a damaged or foreign file
        T.die(f"{path} cannot be read as a video ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    if len(clip) < frames:
        T.die(f"{path} has {len(clip)} frames; --frames {frames} takes the first {frames}")
    return torch.stack(clip, dim=1)


def encode(wan_dir, videos, out, frames, height, width, shard_size, device):
    """FOLDER/NAME.mp4 + NAME.txt -> the latent data set DATA (format: data.LatentStream). Shard i holds the
    clips i*shard_size ... of the videos sorted by name. Each shard is written atomically with its clips' names
    and the sizes in its metadata, so a re-run skips the shards already there (and refuses shards of other
    videos or sizes); index.json, written last, marks the set complete."""
    if frames < 1 or (frames - 1) % 4:
        T.die(f"--frames must be 4n + 1 (the VAE is 4x in time: 4n + 1 frames give n + 1 latents), got {frames}")
    if min(height, width) <= 0 or height % 16 or width % 16:
        T.die(f"--height and --width must be positive multiples of 16 (the VAE's 8x, then the DiT's 2x2 patches), "
              f"got {height}x{width}")
    if shard_size < 1:
        T.die(f"--shard-size must be positive, got {shard_size}")
    check_wan_dir(wan_dir)
    device = T.usable_device(device)
    if not os.path.isdir(videos):
        T.die(f"--videos {videos} is not a folder")
    stems = sorted(name[:-len(".mp4")] for name in os.listdir(videos) if name.endswith(".mp4"))
    if not stems:
        T.die(f"--videos {videos} holds no .mp4 files")
    prompts = {}
    for stem in stems:
        try:
            with open(os.path.join(videos, stem + ".txt"), encoding="utf-8") as f:
                prompts[stem] = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            T.die(f"{os.path.join(videos, stem)}.mp4 needs its prompt in {stem}.txt beside it ({type(e).__name__})")
    shards = [stems[i:i + shard_size] for i in range(0, len(stems), shard_size)]
    path = lambda i: os.path.join(out, data.LATENT_SHARD.format(i))
    sizes = json.dumps({"frames": frames, "height": height, "width": width})
    todo = []
    for i, names in enumerate(shards):
        if not os.path.exists(path(i)):
            todo.append(i)
            continue
        meta = T.shard_metadata(path(i))
        if (meta.get("clips"), meta.get("sizes")) != (json.dumps(names), sizes):
            T.die(f"{path(i)} holds other clips or sizes than this run would write there; delete {out} or pass "
                  "another --out (the same --videos, sizes and --shard-size resume)")
    if todo:
        text, vae = load_text_encoder(wan_dir, device), load_vae(wan_dir, device)
        os.makedirs(out, exist_ok=True)
    bar = tqdm(total=sum(len(shards[i]) for i in todo), desc="encoding", disable=not todo, dynamic_ncols=True)
    for i in todo:
        latents, contexts, lengths = [], [], []
        for stem in shards[i]:
            clip = read_video(os.path.join(videos, stem + ".mp4"), frames, height, width)
            latents.append(vae.encode(clip[None].to(device)).to(torch.bfloat16).cpu())
            context, n = text.encode([prompts[stem]])
            contexts.append(context[0, :n[0]].to(torch.bfloat16).cpu())  # the rest is zeros: re-padded on load
            lengths.append(n[0].cpu())
            bar.update(1)
        tensors = {"latents": torch.cat(latents), "context": torch.cat(contexts), "lengths": torch.stack(lengths)}
        T.atomic_write(path(i), lambda p: save_file(tensors, p, metadata={"clips": json.dumps(shards[i]), "sizes": sizes}))
    bar.close()
    with safe_open(path(0), "pt") as f:
        shape, dim = f.get_slice("latents").get_shape()[1:], f.get_slice("context").get_shape()[1]
    index = {"latent_shape": shape, "text_dim": dim, "text_len": TEXT_LEN, "shards": [len(s) for s in shards],
             "frames": frames, "height": height, "width": width,
             "videos": os.path.abspath(videos), "wan_dir": os.path.abspath(wan_dir)}
    T.atomic_write(os.path.join(out, data.LATENT_INDEX), lambda p: open(p, "w").write(json.dumps(index, indent=1) + "\n"))
    print(f"wrote {out}: {len(stems)} clips in {len(shards)} shards ({len(todo)} new), latents {shape}, "
          f"contexts of {dim}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# released checkpoints


def read_release(src, ema):
    """(state dict with official names, its config) of a released generator .pt; tensors only, never code."""
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        T.die(f"{src} needs code to unpickle ({str(e).splitlines()[0][:160]}); refused: only tensor dicts are read")
    except Exception as e:  # a missing, truncated or non-torch file: torch raises several types
        T.die(f"{src} cannot be read as a torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    key = "generator_ema" if ema else "generator"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        T.die(f"{src} has no {key!r} state dict (keys: {', '.join(map(str, ckpt)) if isinstance(ckpt, dict) else '-'})")
    state = M.to_official_names(ckpt[key])
    try:
        cfg = config_from_state(state)
        M.load_wan_weights(M.build(cfg, device="meta"), state)  # strict: names and shapes, no memory
    except (KeyError, ValueError) as e:
        T.die(f"{src}[{key!r}] is not a Wan DiT state dict ({type(e).__name__}: {str(e)[:300]})")
    return state, cfg


def convert(src, dst, ema, frames_per_block, steps, first_block_steps):
    """A released generator .pt -> dst (.safetensors) + its JSON, the sampler settings in the JSON."""
    state, cfg = read_release(src, ema)
    if cfg.frames % frames_per_block:
        T.die(f"--frames-per-block {frames_per_block} does not divide the model's {cfg.frames} latent frames")
    meta = {"kind": "student", "config": asdict(cfg), "frames_per_block": frames_per_block,
            "steps_per_block": steps, "first_block_steps": first_block_steps or None,
            "source": f"{os.path.basename(src)}[{'generator_ema' if ema else 'generator'}]"}
    stem = T.checkpoint_stem(dst)
    T.save_checkpoint(stem, {"model." + k: v for k, v in state.items()}, meta)
    print(f"wrote {stem}.safetensors and {stem}.json ({len(state)} tensors, "
          f"{sum(v.numel() for v in state.values()):,} parameters)", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: T.die(f"{message} (see --help)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="a released generator .pt -> NAME.safetensors + NAME.json")
    c.error = p.error
    c.add_argument("src", help="IN.pt: a dict with generator / generator_ema (Causal Forcing, CF++, Self-Forcing)")
    c.add_argument("dst", help="OUT.safetensors")
    c.add_argument("--ema", action="store_true", help="take generator_ema (what the releases sample with)")
    c.add_argument("--frames-per-block", type=int, default=1, help="the sampler stored in the JSON: 1 frame-wise, 3 chunk-wise")
    c.add_argument("--steps", type=int, default=2, help="denoising steps per block (CF++ 2 or 1, CF/SF 4)")
    c.add_argument("--first-block-steps", type=int, default=4, help="frame 0's steps (frame-wise CF++: 4; 0: as --steps)")
    e = sub.add_parser("encode", help="FOLDER/*.mp4 + their .txt prompts -> a latent data set (safetensors shards)")
    e.error = p.error
    e.add_argument("--wan-dir", required=True, help="the diffusers Wan2.1 folder: its vae/, tokenizer/ and text_encoder/")
    e.add_argument("--videos", required=True, help="a folder of NAME.mp4, each with its prompt in NAME.txt")
    e.add_argument("--out", required=True, help="the data set folder DATA (an interrupted run resumes there)")
    e.add_argument("--frames", type=int, default=81, help="the first 4n + 1 frames of each video (81 -> 21 latents)")
    e.add_argument("--height", type=int, default=480, help="frames are scaled to cover HxW, then centre-cropped")
    e.add_argument("--width", type=int, default=832)
    e.add_argument("--shard-size", type=int, default=256, help="clips per shard (256: ~1 GB of latents at 81x480x832)")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.command == "encode":
        encode(a.wan_dir, a.videos, a.out, a.frames, a.height, a.width, a.shard_size, a.device)
        return
    if min(a.frames_per_block, a.steps) <= 0 or a.first_block_steps < 0:
        T.die("--frames-per-block and --steps must be positive, --first-block-steps not negative")
    convert(a.src, a.dst, a.ema, a.frames_per_block, a.steps, a.first_block_steps)


if __name__ == "__main__":
    main()
