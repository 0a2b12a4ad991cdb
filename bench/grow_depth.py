#!/usr/bin/env python3
"""Grow a trained infdit model to more layers without changing what it computes (docs/training.md#depth-grown-from-the-trained-model).

    python3 bench/grow_depth.py models/default/model.safetensors models/default/train-config.json 8 OUT

writes OUT/model.safetensors and OUT/train-config.json (and OUT/config.json from the train config's folder's
config.json when there is one) for a network of the given depth: layers 4.. are copies of the last two trained
layers (alternately), with the attention and MLP output projections zeroed, so each new layer adds nothing to
the residual stream at first and the grown network gives the same images, bit for bit. Train it with
`infdit train --init OUT/model.safetensors --config OUT/train-config.json`. Needs numpy and safetensors.
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

LAYER = "transformer.layers.{}."
PER_LAYER = ["mixins.adaln_layer.adaLN_modulations.{}.1.", "mixins.adaln_layer.q_layer_norm.{}."]
ZEROED = ["attention.dense.", "mlp.dense_4h_to_h."]
STACKED = "mixins.adaln_layer.re_pos_embed"  # (depth, 4, 2, head dim): one row per layer


def grow(w, depth, new_depth):
    out = dict(w)
    rows = [w[STACKED][i] for i in range(depth)]
    for i in range(depth, new_depth):
        src = depth - 2 + (i - depth) % 2 if depth >= 2 else depth - 1
        for k, v in w.items():
            for pat in [LAYER] + PER_LAYER:
                pre = pat.format(src)
                if k.startswith(pre):
                    out[pat.format(i) + k[len(pre):]] = v.copy()
        for z in ZEROED:
            for p in ("weight", "bias"):
                k = LAYER.format(i) + z + p
                out[k] = np.zeros_like(out[k])
        rows.append(w[STACKED][src])
    out[STACKED] = np.stack(rows)
    return out


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    weights, config, new_depth, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cfg = json.load(open(config))
    depth = cfg["dit"]["depth"]
    if new_depth <= depth:
        sys.exit(f"{config}: depth {depth}; give a larger one than that")
    os.makedirs(out, exist_ok=True)
    save_file(grow(load_file(weights), depth, new_depth), os.path.join(out, "model.safetensors"))
    cfg["dit"]["depth"] = new_depth
    json.dump(cfg, open(os.path.join(out, "train-config.json"), "w"), indent=2)
    model_cfg = os.path.join(os.path.dirname(config), "config.json")
    if os.path.exists(model_cfg):
        c = json.load(open(model_cfg))
        c["dit"]["depth"] = new_depth
        json.dump(c, open(os.path.join(out, "config.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
