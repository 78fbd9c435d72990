"""Weight averaging (a "model soup", Wortsman et al. 2022): one student from several DMD runs of the same init.

    python soup.py --out=checkpoints/world_framewise runs/g1/world_framewise runs/g0/world_framewise

The runs must be one student: the same init, config, kind and sampler (frames per block, step lists). The
weights are averaged with equal weight in fp32 and stored in the first checkpoint's dtype. The JSON holds what
the runs share; `soup` lists each run's stem, the fields in which the runs differ (e.g. real_guidance) and, for
a run that is a soup itself, its own `soup` list.
Measured (README, "The world model, trained"): the shipped world student starts from the soup of three DMD runs of
one command (real-score guidance 1, 0, and 1 with another training seed), steadier across noise seeds than any
single run and as good as the best one (it beat the other two runs in all 9 paired evaluations), and ends as a
soup of soups: that of its second and third first_frame.py passes (+0.010 Total over 30 fresh noise seeds against
the second alone), averaged with a fourth pass made from it (+0.005 over 30 more). Averaging text-to-video runs
gave a student between its parents, below the shipped one.
"""
import argparse
import os

import trainer as T

SAME = ("config", "kind", "init", "frames_per_block", "steps_per_block", "first_block_steps", "first_timesteps",
        "timesteps", "shift")


def soup(stems):
    """(tensors, meta): the equal-weight average of the checkpoint pairs `stems`."""
    loaded = [T.load_checkpoint(s) for s in stems]
    first, meta = loaded[0]
    shapes = {k: v.shape for k, v in first.items()}
    for stem, (tensors, other) in zip(stems[1:], loaded[1:]):
        for key in SAME:
            if other.get(key) != meta.get(key):
                T.die(f"{stem} differs from {stems[0]} in {key!r}: a soup takes runs of one student")
        if {k: v.shape for k, v in tensors.items()} != shapes:
            T.die(f"{stem} holds other tensors than {stems[0]}")
    tensors = {k: (sum(t[k].float() for t, _ in loaded) / len(loaded)).to(v.dtype) for k, v in first.items()}
    metas = [m for _, m in loaded]
    own = ("soup", "pair")  # what each file says of itself, not of its run: never listed as a difference
    differ = sorted({k for m in metas for k in m if k not in own and any(n.get(k) != m.get(k) for n in metas)})
    sources = [dict(stem=os.path.normpath(s), **{k: m.get(k) for k in differ}) for s, m in zip(stems, metas)]
    for source, m in zip(sources, metas):  # a source that is a soup keeps its own list: a soup of soups names every run
        if "soup" in m:
            source["soup"] = m["soup"]
    return tensors, dict({k: v for k, v in meta.items() if k not in differ and k not in own}, soup=sources)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = lambda message: T.die(f"{message} (see --help)")  # one line, exit 2, like every bad input
    p.add_argument("stems", nargs="*", help="checkpoint stems (NAME or NAME.safetensors), two or more")
    p.add_argument("--out", default="", help="the soup's stem")
    a = p.parse_args(argv)
    if len(a.stems) < 2 or not a.out:
        T.die("usage: python soup.py --out=STEM CHECKPOINT CHECKPOINT [...] (two or more runs of one student)")
    stems, out = [T.checkpoint_stem(s) for s in a.stems], T.checkpoint_stem(a.out)
    tensors, meta = soup(stems)
    T.save_checkpoint(out, tensors, meta)
    print(f"wrote {out}.safetensors + .json: the mean of {len(stems)} checkpoints")


if __name__ == "__main__":
    main()
