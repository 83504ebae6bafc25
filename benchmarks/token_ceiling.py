"""FG-ARI of token-sized masks on a config's evaluation scenes: what SLATE's masks can reach.

SLATE's slot masks are token-sized (attention over the dVAE's token grid, upsampled by
repetition). Two segmentations made of whole tokens, scored with the evaluation's own FG-ARI
(`fixed_slots.models.segmentation`) against the true instance masks, no model involved:
  majority  each token to whatever covers most of its pixels, background included: what trained
            slots approach, as they give a token that mixes object and background to the
            background slot
  ceiling   each token to the object covering most of its foreground pixels: the best token
            masks can do, FG-ARI ignoring background pixels (the evaluation reports it as
            `fg_ari_token_ceiling`)
The scenes are the config's validation split as `fixed_slots.eval.evaluator` reads it (the first
eval.batch_size x eval.num_batches images, unless --num_scenes). Seconds on a CPU.

  python benchmarks/token_ceiling.py --config=configs/default.py
  python benchmarks/token_ceiling.py --config=configs/default.py --set=data.image_size=32
  python benchmarks/token_ceiling.py --config=configs/study_synthetic.py
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fixed_slots import configlib

from fixed_slots.train import trainer
from fixed_slots.data.pipeline import make_loader
from fixed_slots.models.segmentation import adjusted_rand_index, token_resolution_ceiling


def majority_tokens(true_mask: jax.Array, factor: int, num_mask_ids: int) -> jax.Array:
    """[B, H, W] ids -> the same size map where each factor x factor token holds the id covering
    most of its pixels (background included; ties to the lower id)."""
    true = true_mask.astype(jnp.int32)
    b, h, w = true.shape
    counts = jax.nn.one_hot(true, num_mask_ids, dtype=jnp.float32).reshape(
        b, h // factor, factor, w // factor, factor, num_mask_ids).sum(axis=(2, 4))
    majority = jnp.argmax(counts, axis=-1)
    return jnp.repeat(jnp.repeat(majority, factor, axis=1), factor, axis=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set=data.image_size=32 (repeatable)")
    p.add_argument("--num_scenes", type=int, default=None,
                   help="default: eval.batch_size x eval.num_batches, as the evaluation")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    config = configlib.from_file(a.config, a.set)
    trainer.check_config(config)
    if config.model.name != "slate":
        raise SystemExit(f"token masks are SLATE's; {a.config} builds {config.model.name!r}")
    batch_size = config.eval.batch_size
    num_scenes = a.num_scenes or batch_size * (config.eval.num_batches or 1)
    factor, num_mask_ids = 4, config.data.max_objects + 1  # the dVAE's 4x4-pixel tokens

    @jax.jit
    def scores(true_mask):
        fg = lambda pred: adjusted_rand_index(  # noqa: E731
            true_mask.astype(jnp.int32), pred, num_mask_ids, num_mask_ids,
            ignore_background=True)
        return {"majority": fg(majority_tokens(true_mask, factor, num_mask_ids)),
                "ceiling": token_resolution_ceiling(true_mask, factor, num_mask_ids)}

    loader = make_loader(config, "validation", global_batch_size=min(batch_size, num_scenes),
                         seed=config.seed, num_epochs=1, shuffle=False)
    values = {"majority": [], "ceiling": []}
    seen = 0
    for batch in loader:
        if seen >= num_scenes:
            break
        for name, v in jax.device_get(scores(jnp.asarray(batch["mask"]))).items():
            values[name].append(np.asarray(v))
        seen += len(batch["mask"])
    means = {k: float(np.mean(np.concatenate(v)[:num_scenes])) for k, v in values.items()}
    d = config.data
    print(f"# token_ceiling, {time.strftime('%Y-%m-%d')}: {a.config}"
          f"{''.join(' --set=' + x for x in a.set)}: {d.name} ({d.get('synthetic_style', '')}) "
          f"{d.image_size}x{d.image_size}, {d.min_objects}-{d.max_objects} objects, "
          f"{min(seen, num_scenes)} validation scenes, tokens of {factor}x{factor} pixels")
    print("| image size | tokens | FG-ARI, each token to what covers most of it | "
          "FG-ARI, perfect token masks (fg_ari_token_ceiling) |\n|---|---|---|---|")
    print(f"| {d.image_size} | {(d.image_size // factor) ** 2} | {means['majority']:.3f} | "
          f"{means['ceiling']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "set": a.set, "num_scenes": min(seen, num_scenes),
                       **means}, f, indent=1)


if __name__ == "__main__":
    main()
