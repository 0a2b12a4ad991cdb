#!/usr/bin/env python3
"""Plain-PyTorch Inf-DiT denoiser, written from the spec (docs: /work/shared/spec/infdit-spec.md §3, §9.2).

It exists to time one denoiser call D(x; sigma) of the same network as infdit, on the whole image at once
(the official "full" mode), with torch.nn.functional.scaled_dot_product_attention, and to check it against
the parity golden vectors. CLIP is not part of it: the conditioning vector is an input (zeros by default).

Weights: a safetensors file in the official key layout (e.g. ../shared/parity/tiny.safetensors, or one
written by `infdit random-model`). Config: infdit's own JSON ({"dit": {...}, "clip": ...}) or the parity
JSON (official flag names under "official_cli_flags").

Examples:
  python bench/pytorch_baseline.py --weights W --config C --size 384x384 --sigma 1.0 --dtype f32 --threads 2 --repeat 3
  python bench/pytorch_baseline.py --weights ../shared/parity/tiny.safetensors --config ../shared/parity/config.json \
      --check-against ../shared/parity/case_a.safetensors
  python bench/pytorch_baseline.py --weights W --config C --inputs IN.safetensors --sigma S --dump OUT.safetensors

GPU (bench/gpu.sh): --device cuda --dtype bf16 [--chunk auto]; the peak is torch.cuda.max_memory_allocated over the
timed calls (after the warm-up), which counts the weights.

Timing output (one line): `pytorch_denoise best_s=<s> median_s=<s> per_block_s=<s> blocks=<n> size=HxW dtype=<d>
device=<d> chunk=<n> oom_whole=<0|1> peak_gpu_mib=<MiB|na> peak_gpu_reserved_mib=<MiB|na> threads=<n> repeat=<r>`.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SIGMA_DATA = 0.5


# --------------------------------------------------------------------------------------------- config
def load_config(path):
    with open(path) as f:
        j = json.load(f)
    if "dit" in j:
        d = dict(j["dit"])
    elif "official_cli_flags" in j:
        fl = j["official_cli_flags"]
        hidden = int(fl["--hidden-size"])
        d = {
            "hidden": hidden,
            "depth": int(fl["--num-layers"]),
            "heads": int(fl["--num-attention-heads"]),
            "mlp_hidden": 4 * hidden,
            "patch": int(fl["--patch-size"]),
            "in_channels": int(fl["--in-channels"]),
            "out_channels": int(fl["--out-channels"]),
            "block_px": int(fl.get("--image-block-size", 128)),
            "vector_dim": int(fl["--vector-dim"]),
            "time_channels": 192,
            "image_size": int(fl["--image-size"]),
            "sr_scale": int(fl.get("--sr-scale", 4)),
            "lr_patch": 2,
            "ln_eps": float(fl.get("--layernorm-epsilon", 1e-6)),
        }
    else:
        raise SystemExit(f"{path}: neither an infdit config (key 'dit') nor a parity config (official_cli_flags)")
    return d


# --------------------------------------------------------------------------------------------- model
class InfDiTTorch:
    """The network F and the EDM denoiser D, full-image mode, batch 1. Hidden states are block-major
    (blocks, T, D) with T = block_tokens^2; every per-token op is layout independent."""

    def __init__(self, cfg, sd, dtype, device="cpu", chunk=0):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk = chunk  # blocks per chunk of the per-block work (0: all blocks at once)
        self.D = cfg["hidden"]
        self.H = cfg["heads"]
        self.hd = self.D // self.H
        self.L = cfg["depth"]
        self.p = cfg["patch"]
        self.eps = cfg["ln_eps"]
        self.bt = cfg["block_px"] // self.p  # block side in tokens (32)
        self.lr_block = self.bt * self.p // cfg["sr_scale"] // cfg["lr_patch"]  # 16
        self.lr_win = 3 * self.lr_block  # 48
        self.rope_side = 8 * cfg["image_size"] // self.p  # 1024 (table side and position modulo)
        self.w = {k: v.to(device=self.device, dtype=dtype).contiguous()
                  for k, v in sd.items() if not k.startswith("image_encoder.")}
        # 2-D RoPE frequencies (fp32): per axis hd/2 channels, hd/4 frequencies, each repeated twice.
        axis = self.hd // 2
        self.theta = 1.0 / (10000.0 ** (torch.arange(0, axis, 2, dtype=torch.float32) / axis))
        half = cfg["time_channels"] // 2
        self.time_freqs = ((1.0 / 10000.0) ** (torch.arange(half, dtype=torch.float32) / half)).to(self.device)
        self._rope_cache = {}

    def W(self, k):
        return self.w[k]

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def ln(self, x, weight=None, bias=None):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    # RoPE cos/sin for all tokens in block-major order: (nb, 1, T, hd)
    def rope(self, R, C):
        key = (R, C)
        if key in self._rope_cache:
            return self._rope_cache[key]
        bt = self.bt
        rows = torch.arange(R * bt).view(R, bt)  # (R, bt)
        cols = torch.arange(C * bt).view(C, bt)
        # token (a, b, i, j): row = a*bt+i, col = b*bt+j
        r = rows[:, None, :, None].expand(R, C, bt, bt).reshape(R * C, bt * bt) % self.rope_side
        c = cols[None, :, None, :].expand(R, C, bt, bt).reshape(R * C, bt * bt) % self.rope_side
        fr = self.theta.repeat_interleave(2)  # (hd/2,)
        ang = torch.cat([r[..., None].float() * fr, c[..., None].float() * fr], dim=-1)  # (nb, T, hd)
        cos = torch.cos(ang)[:, None].to(device=self.device, dtype=self.dtype)
        sin = torch.sin(ang)[:, None].to(device=self.device, dtype=self.dtype)
        self._rope_cache[key] = (cos, sin)
        return cos, sin

    @staticmethod
    def apply_rope(t, cos, sin):
        # pairs (2k, 2k+1): t'[2k] = t[2k] cos - t[2k+1] sin; t'[2k+1] = t[2k+1] cos + t[2k] sin
        t2 = t.unflatten(-1, (-1, 2))
        rot = torch.stack([-t2[..., 1], t2[..., 0]], dim=-1).flatten(-2)
        return t * cos + rot * sin

    def neighbour_index(self, R, C):
        """Indices of the [self, top-left, left, top] blocks of every block, edges replicated."""
        idx = []
        for a in range(R):
            for b in range(C):
                am, bm = max(a - 1, 0), max(b - 1, 0)
                idx.append([a * C + b, am * C + bm, a * C + bm, am * C + b])
        return torch.tensor(idx, dtype=torch.long, device=self.device)  # (nb, 4)

    def lr_map(self, lr):
        """LR conv (k2 s2), zero padding and K/V projection: the padded map (h'+2p, w'+2p, 2D)."""
        pre = "mixins.adaln_layer."
        f = F.conv2d(lr.to(self.dtype), self.W(pre + "proj_lr.weight"), self.W(pre + "proj_lr.bias"),
                     stride=self.cfg["lr_patch"])  # (1, D, h', w')
        pad = self.lr_block
        f = F.pad(f, (pad, pad, pad, pad))[0].permute(1, 2, 0)  # (h'+2p, w'+2p, D), zeros outside
        return self.lin(f, pre + "cross_attention.key_value")  # (hp, wp, 2D)

    def lr_windows(self, kv, C, i, j):
        """Key LN + position embedding of the 48x48 windows (stride 16) of blocks i..j (raster
        order, C blocks per row) of the map kv: returns k, v each (j-i, H, 2304, hd)."""
        pre = "mixins.adaln_layer."
        r0, r1 = i // C, (j - 1) // C + 1
        win = kv.unfold(0, self.lr_win, self.lr_block).unfold(1, self.lr_win, self.lr_block)[r0:r1]
        win = win.permute(0, 1, 3, 4, 2).reshape((r1 - r0) * C, self.lr_win * self.lr_win, 2 * self.D)
        win = win[i - r0 * C: j - r0 * C]
        k, v = win[..., : self.D], win[..., self.D:]
        nb, n = k.shape[0], k.shape[1]
        k = k.reshape(nb, n, self.H, self.hd)
        v = v.reshape(nb, n, self.H, self.hd)
        k = self.ln(k, self.W(pre + "cross_k_ln.weight"), self.W(pre + "cross_k_ln.bias"))
        k = k + self.W(pre + "lr_key_position_embedding")[0]
        return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

    def cond(self, sigma, clip):
        c_noise = 0.25 * math.log(sigma)
        args = c_noise * self.time_freqs
        e = torch.cat([torch.cos(args), torch.sin(args)])[None].to(self.dtype)
        t = self.lin(F.silu(self.lin(e, "time_embed.mlp.0")), "time_embed.mlp.2")
        u = self.lin(F.silu(self.lin(clip.to(self.dtype), "cond_embed.map_vector.0")), "cond_embed.map_vector.2")
        return F.silu(t + u)  # (1, D)

    def qkv(self, h, l, shift_a, scale_a, cos, sin):
        """Q, K, V (n, H, T, hd) of blocks h (n, T, D) at layer l (QK-norm and RoPE applied)."""
        D, H, hd = self.D, self.H, self.hd
        pre = "mixins.adaln_layer."
        n, T = h.shape[0], h.shape[1]
        a = self.ln(h) * (1 + scale_a) + shift_a
        qkv = self.lin(a, f"transformer.layers.{l}.attention.query_key_value")
        q, k, v = qkv.split(D, dim=-1)
        q = q.reshape(n, T, H, hd).transpose(1, 2)  # (n, H, T, hd)
        k = k.reshape(n, T, H, hd).transpose(1, 2)
        v = v.reshape(n, T, H, hd).transpose(1, 2)
        qw, qb = self.W(f"{pre}q_layer_norm.{l}.weight"), self.W(f"{pre}q_layer_norm.{l}.bias")
        q = self.apply_rope(self.ln(q, qw, qb), cos, sin)
        k = self.apply_rope(self.ln(k, qw, qb), cos, sin)  # q_layer_norm on K too (official bug)
        return q, k, v

    def rest(self, h, l, q, k, v, nbr, lr_k, lr_v, shift_m, scale_m):
        """The rest of layer l for blocks h (n, T, D) with queries q (n, H, T, hd): UniBA attention
        over the [self, top-left, left, top] keys of all blocks k, v (nb, H, T, hd) picked by nbr
        (n, 4), the layer-0 LR cross-attention (windows lr_k, lr_v of these blocks) and the MLP."""
        D, H, hd = self.D, self.H, self.hd
        pre = "mixins.adaln_layer."
        n, T = h.shape[0], h.shape[1]
        # [self, top-left, left, top] keys, + re_pos_embed on K only
        P = self.W(f"{pre}re_pos_embed")[l]  # (4, H, hd)
        kb = k[nbr]  # (n, 4, H, T, hd)
        kb = kb + P[None, :, :, None, :]
        kb = kb.permute(0, 2, 1, 3, 4).reshape(n, H, 4 * T, hd)
        vb = v[nbr].permute(0, 2, 1, 3, 4).reshape(n, H, 4 * T, hd)
        ctx = F.scaled_dot_product_attention(q, kb, vb)  # (n, H, T, hd)
        ctx = ctx.transpose(1, 2).reshape(n, T, D)
        h = h + self.lin(ctx, f"transformer.layers.{l}.attention.dense")
        if l == 0:
            cq = self.lin(self.ln(h), pre + "cross_attention.query").reshape(n, T, H, hd)
            cq = self.ln(cq, self.W(pre + "cross_q_ln.weight"), self.W(pre + "cross_q_ln.bias"))
            cq = (cq + self.W(pre + "lr_query_position_embedding")[0]).transpose(1, 2)
            cctx = F.scaled_dot_product_attention(cq, lr_k, lr_v).transpose(1, 2).reshape(n, T, D)
            h = h + self.lin(cctx, pre + "cross_attention.dense")
            m = self.ln(h, self.W(pre + "post_cross_attention_layernorm.weight"),
                        self.W(pre + "post_cross_attention_layernorm.bias"))
        else:
            m = self.ln(h)
        m = m * (1 + scale_m) + shift_m
        up = F.gelu(self.lin(m, f"transformer.layers.{l}.mlp.dense_h_to_4h"), approximate="tanh")
        return h + self.lin(up, f"transformer.layers.{l}.mlp.dense_4h_to_h")

    def network(self, x_in, lr, c):
        """F(x_in; c, LR): x_in (1, 6, H, W) already scaled by c_in. Returns (1, 3, H, W)."""
        D, H, hd, bt = self.D, self.H, self.hd, self.bt
        pre = "mixins.adaln_layer."
        tok = F.conv2d(x_in.to(self.dtype), self.W("mixins.patch_embed.proj.weight"),
                       self.W("mixins.patch_embed.proj.bias"), stride=self.p)  # (1, D, Ht, Wt)
        Ht, Wt = tok.shape[2], tok.shape[3]
        R, C = Ht // bt, Wt // bt
        nb, T = R * C, bt * bt
        # to block-major (nb, T, D)
        h = tok[0].reshape(D, R, bt, C, bt).permute(1, 3, 2, 4, 0).reshape(nb, T, D)
        cos, sin = self.rope(R, C)
        nbr = self.neighbour_index(R, C)
        sc = F.silu(c)
        lr_kv = self.lr_map(lr)
        for l in range(self.L):
            mods = self.lin(sc, f"{pre}adaLN_modulations.{l}.1")  # (1, 4D)
            shift_a, scale_a, shift_m, scale_m = [m[:, None, :] for m in mods.chunk(4, dim=-1)]
            if self.chunk <= 0 or self.chunk >= nb:
                q, k, v = self.qkv(h, l, shift_a, scale_a, cos, sin)
                lr_k, lr_v = self.lr_windows(lr_kv, C, 0, nb) if l == 0 else (None, None)
                h = self.rest(h, l, q, k, v, nbr, lr_k, lr_v, shift_m, scale_m)
                continue
            # Chunks of blocks: Q, K, V of every block first (a block's keys come from its
            # neighbours' layer input), then attention and MLP chunk by chunk, in place.
            q = torch.empty_like(h).reshape(nb, T, H, hd).transpose(1, 2)
            k = torch.empty_like(q)
            v = torch.empty_like(q)
            for i in range(0, nb, self.chunk):
                j = min(nb, i + self.chunk)
                q[i:j], k[i:j], v[i:j] = self.qkv(h[i:j], l, shift_a, scale_a, cos[i:j], sin[i:j])
            for i in range(0, nb, self.chunk):
                j = min(nb, i + self.chunk)
                lr_k, lr_v = self.lr_windows(lr_kv, C, i, j) if l == 0 else (None, None)
                h[i:j] = self.rest(h[i:j], l, q[i:j], k, v, nbr[i:j], lr_k, lr_v, shift_m, scale_m)
        fm = self.lin(sc, "mixins.final_layer.adaLN_modulation.1")
        shift, scale = [m[:, None, :] for m in fm.chunk(2, dim=-1)]
        z = self.ln(self.ln(h)) * (1 + scale) + shift
        o = self.lin(z, "mixins.final_layer.linear")  # (nb, T, p*p*co), ordered (py, px, c)
        p, co = self.p, self.cfg["out_channels"]
        img = o.float().reshape(R, C, bt, bt, p, p, co).permute(6, 0, 2, 4, 1, 3, 5)
        return img.reshape(1, co, Ht * p, Wt * p)

    def denoise(self, x, sigma, concat_lr, lr, clip):
        """D(x; sigma) = c_skip x + c_out F(c_in [x || concat_lr]). x, concat_lr (1,3,H,W) f32."""
        s2 = sigma * sigma + SIGMA_DATA ** 2
        c_skip = SIGMA_DATA ** 2 / s2
        c_out = sigma * SIGMA_DATA / math.sqrt(s2)
        c_in = 1.0 / math.sqrt(s2)
        c = self.cond(sigma, clip)
        x_in = torch.cat([x, concat_lr], dim=1) * c_in
        f = self.network(x_in, lr, c)
        return c_out * f + c_skip * x


# --------------------------------------------------------------------------------------------- main
def parse_size(s):
    h, w = s.lower().split("x")
    return int(h), int(w)


def random_inputs(args, cfg, size, dev):
    """x, concat_lr, lr, clip for an output of size (H, W): a uniform random LR in [-1, 1], its nearest
    upsample, x = concat_lr + sigma * N(0, 1), the --clip vector or zeros; on dev."""
    H, W = size
    s = cfg["sr_scale"]
    g = torch.Generator().manual_seed(args.seed)
    lr = torch.rand(1, 3, H // s, W // s, generator=g) * 2 - 1
    concat_lr = F.interpolate(lr, scale_factor=s, mode="nearest")
    x = concat_lr + args.sigma * torch.randn(1, 3, H, W, generator=g)
    if args.clip:
        clip = load_file(args.clip)["clip_vector"].float().reshape(1, -1)
    else:
        clip = torch.zeros(1, cfg["vector_dim"])
    return x.to(dev), concat_lr.to(dev), lr.to(dev), clip.to(dev)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--size", default="384x384", help="output (HR) size HxW, multiples of block_px")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--chunk", default="0",
                    help="blocks per chunk of the per-block work, layer by layer (0: all blocks at once; "
                         "auto: all at once, then chunks of 64 after a CUDA out-of-memory error)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup-size", help="HxW of the warm-up call (default: --size)")
    ap.add_argument("--clip", help="safetensors file with the conditioning vector (key clip_vector); default zeros")
    ap.add_argument("--check-against", metavar="FILE",
                    help="parity case file (lr, concat_lr, eps, sigmas, clip_vector, denoised_K): compare D")
    ap.add_argument("--step", type=int, default=10, help="sigma index for --check-against (default 10)")
    ap.add_argument("--tol", type=float, default=5e-6)
    ap.add_argument("--inputs", help="safetensors with x, concat_lr, lr, clip_vector for --dump")
    ap.add_argument("--dump", metavar="OUT", help="write D (key 'denoised') for --inputs (or the random inputs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    auto = args.chunk == "auto"
    cfg = load_config(args.config)
    model = InfDiTTorch(cfg, load_file(args.weights), dtype, dev, 0 if auto else int(args.chunk))

    with torch.inference_mode():
        if args.check_against:
            t = {k: v.to(dev) for k, v in load_file(args.check_against).items()}
            sig = t["sigmas"].float()[args.step]
            x = t["concat_lr"].float() + t["eps"].float() * sig
            d = model.denoise(x, float(sig), t["concat_lr"].float(), t["lr"].float(),
                              t["clip_vector"].float().reshape(1, -1))
            ref = t[f"denoised_{args.step}"].float()
            diff = (d.float() - ref).abs().max().item()
            ok = diff <= args.tol
            print(f"check denoised_{args.step}: max_abs_diff={diff:.3e} tol={args.tol:.0e} "
                  f"sigma={float(sig):.6g} dtype={args.dtype} {'OK' if ok else 'FAIL'}")
            if not ok:
                sys.exit(1)
            return

        if args.inputs:
            t = {k: v.to(dev) for k, v in load_file(args.inputs).items()}
            x, concat_lr, lr = t["x"].float(), t["concat_lr"].float(), t["lr"].float()
            clip = t["clip_vector"].float().reshape(1, -1) if "clip_vector" in t else \
                torch.zeros(1, cfg["vector_dim"], device=dev)
        else:
            x, concat_lr, lr, clip = random_inputs(args, cfg, parse_size(args.size), dev)

        if args.dump:
            d = model.denoise(x, args.sigma, concat_lr, lr, clip)
            save_file({"denoised": d.float().contiguous()}, args.dump)
            print(f"wrote {args.dump} shape={tuple(d.shape)}")
            return

        warm = random_inputs(args, cfg, parse_size(args.warmup_size), dev) if args.warmup_size else \
            (x, concat_lr, lr, clip)

        def timed():
            model.denoise(warm[0], args.sigma, warm[1], warm[2], warm[3])  # warm-up
            times = []
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                model.denoise(x, args.sigma, concat_lr, lr, clip)
                if cuda:
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
            return times

        oom = 0
        try:
            times = timed()
        except torch.cuda.OutOfMemoryError:
            if not auto:
                raise
            # The whole image does not fit: the per-block work in chunks, layer by layer.
            oom = 1
            model.chunk = 64
            torch.cuda.empty_cache()
            times = timed()
        H, W = x.shape[2], x.shape[3]
        blocks = (H // cfg["block_px"]) * (W // cfg["block_px"])
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**20:.1f}" if cuda else "na"
        reserved = f"{torch.cuda.max_memory_reserved(dev) / 2**20:.1f}" if cuda else "na"
        print(f"pytorch_denoise best_s={min(times):.6f} median_s={statistics.median(times):.6f} "
              f"per_block_s={min(times) / blocks:.6f} blocks={blocks} "
              f"size={H}x{W} dtype={args.dtype} device={dev} chunk={model.chunk} oom_whole={oom} "
              f"peak_gpu_mib={peak} peak_gpu_reserved_mib={reserved} "
              f"threads={torch.get_num_threads()} repeat={len(times)}")


if __name__ == "__main__":
    main()
