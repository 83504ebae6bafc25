"""Train-step timing of the OFFICIAL PyTorch SLATE (singhgautam/slate), vanilla or implicit.

The side-by-side baseline for `benchmarks/train_step.py`. This file contains none
of the official code: it imports `slate.py` (and, through it, `slot_attn.py`, `dvae.py`,
`transformer.py`, `utils.py`) from `--slate_dir`, a checkout of https://github.com/singhgautam/slate
that you obtain yourself and keep OUTSIDE this repository (never commit it). torch is not a
dependency of fixed_slots: install it yourself (any 2.x; a CUDA build on the GPU machine).

It builds `SLATE(args)` from an argparse.Namespace with the official train.py defaults, feeds a
fixed batch of random images, uses the official optimiser (Adam, dVAE group lr 3e-4, the rest
1e-4) and clipping (`clip_grad_norm_(params, 1.0, 'inf')`), and times
`zero_grad -> forward -> loss = mse + cross_entropy -> backward -> clip -> step`
(median of --steps after --warmup steps, with CUDA synchronisation), then prints markdown rows.

--grad picks slot attention's backward pass (the official files are never edited; the module
instance is switched to a subclass defined here, with identical parameters):
  unroll          the official module unchanged: backprop through all T iterations (vanilla).
  implicit        the implicit paper's change (Chang et al. 2022, Algorithm 1): the T iterations
                  run under torch.no_grad(), then `slots = slots.detach()` and ONE more step with
                  gradient (T + 1 slot updates in the forward, a one-step backward).
  implicit_detach the same change written literally as one line (no torch.no_grad(): the loop
                  records an autograd graph that is then dropped); identical gradients.

  # the paper's CLEVR-Mirror setting (96x96, batch 50, 7 slots, T=7) on a GPU:
  python benchmarks/official_slate.py --slate_dir=/path/to/slate --grad=unroll
  python benchmarks/official_slate.py --slate_dir=/path/to/slate --grad=implicit \\
      [--amp=bf16] [--compile]
  python benchmarks/official_slate.py --slate_dir=/path/to/slate --decode
  # seconds on a CPU (tiny shapes):
  python benchmarks/official_slate.py --slate_dir=/path/to/slate --device=cpu --image_size=32 \\
      --batch_size=4 --vocab_size=64 --d_model=32 --slot_size=32 --mlp_hidden_size=32 \\
      --steps=2 --check
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time

GRADS = ("unroll", "implicit", "implicit_detach")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slate_dir", required=True,
                   help="checkout of github.com/singhgautam/slate (outside this repo)")
    # benchmark settings
    p.add_argument("--grad", default="unroll", choices=GRADS)
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="bf16: torch.autocast around forward + loss")
    p.add_argument("--compile", action="store_true", help="torch.compile(model) (forward+backward)")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="default: cuda if available, else cpu")
    p.add_argument("--steps", type=int, default=20, help="timed train steps (median reported)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (compilation, autotune)")
    p.add_argument("--decode", action="store_true",
                   help="time reconstruct_autoregressive on one batch instead of the train step")
    p.add_argument("--decode_repeats", type=int, default=1)
    p.add_argument("--check", action="store_true",
                   help="first verify the implicit slot-attention code against the official module")
    p.add_argument("--json", default=None, help="also write the figures here as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=1.0,
                   help="Gumbel temperature (step 0 of the anneal)")
    p.add_argument("--hard", action="store_true")
    # data / optimiser (official train.py names; image size, slots and T are the implicit paper's)
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--img_channels", type=int, default=3)
    p.add_argument("--lr_dvae", type=float, default=3e-4)
    p.add_argument("--lr_main", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=1.0)
    # model (official train.py defaults)
    p.add_argument("--num_dec_blocks", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--d_model", type=int, default=192)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--num_iterations", type=int, default=7)
    p.add_argument("--num_slots", type=int, default=7)
    p.add_argument("--num_slot_heads", type=int, default=1)
    p.add_argument("--slot_size", type=int, default=192)
    p.add_argument("--mlp_hidden_size", type=int, default=192)
    p.add_argument("--pos_channels", type=int, default=4)
    return p.parse_args(argv)


def import_official(slate_dir: str):
    """The official `SLATE` class and the `slot_attn` module, imported from `slate_dir`."""
    slate_dir = os.path.abspath(os.path.expanduser(slate_dir))
    if not os.path.isfile(os.path.join(slate_dir, "slate.py")):
        raise SystemExit(
            f"--slate_dir={slate_dir} does not contain slate.py.\n"
            "This harness needs a checkout of the official SLATE code, "
            "https://github.com/singhgautam/slate (files slate.py, slot_attn.py, dvae.py, "
            "transformer.py, utils.py).\nObtain it yourself, outside this repository (it is not "
            "part of fixed_slots and must never be committed here), and pass its folder as "
            "--slate_dir. See benchmarks/README.md.")
    # Their modules import each other by bare name (`from utils import *`).
    sys.path.insert(0, slate_dir)
    import slate as official_slate  # noqa: E402
    import slot_attn as official_slot_attn  # noqa: E402
    return official_slate.SLATE, official_slot_attn


def official_digest(slate_dir: str) -> str:
    """sha256 (12 hex) of the official model files, to tell which version was timed."""
    import hashlib

    h = hashlib.sha256()
    for name in ("slate.py", "slot_attn.py", "dvae.py", "transformer.py", "utils.py"):
        path = os.path.join(slate_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# The implicit paper's change, applied without editing the official files. Our own code, using the
# attributes of their `SlotAttention` (norm_inputs, project_k/v/q, norm_slots, gru, norm_mlp, mlp,
# num_heads, slot_size, num_slots, num_iterations, epsilon). `--check` proves that `_step` repeated
# T times reproduces their forward exactly.
# ---------------------------------------------------------------------------------------------

def _keys_values(sa, inputs):
    batch, num_inputs, _ = inputs.shape
    inputs = sa.norm_inputs(inputs)
    k = sa.project_k(inputs).view(batch, num_inputs, sa.num_heads, -1).transpose(1, 2)
    v = sa.project_v(inputs).view(batch, num_inputs, sa.num_heads, -1).transpose(1, 2)
    return ((sa.slot_size // sa.num_heads) ** -0.5) * k, v  # [B, heads, N, slot_size // heads]


def _step(sa, slots, k, v):
    """One slot-attention update: slots [B, S, D] -> (slots, attention over heads [B, N, S])."""
    import torch

    batch, num_slots, size = slots.shape
    heads, num_inputs = k.shape[1], k.shape[2]
    q = sa.project_q(sa.norm_slots(slots)).view(batch, num_slots, heads, -1).transpose(1, 2)
    logits = torch.matmul(k, q.transpose(-1, -2))  # [B, heads, N, S]
    attn = torch.softmax(logits.transpose(1, 2).reshape(batch, num_inputs, heads * num_slots), -1)
    # softmax over slots (x heads), as theirs
    attn = attn.view(batch, num_inputs, heads, num_slots).transpose(1, 2)
    attn_vis = attn.sum(1)
    attn = attn + sa.epsilon
    attn = attn / attn.sum(dim=-2, keepdim=True)  # weighted mean over inputs
    updates = torch.matmul(attn.transpose(-1, -2), v)  # [B, heads, S, D // heads]
    updates = updates.transpose(1, 2).reshape(batch, num_slots, size)
    new = sa.gru(updates.reshape(-1, size), slots.reshape(-1, size)).view(batch, num_slots, size)
    return new + sa.mlp(sa.norm_mlp(new)), attn_vis


def make_implicit_class(slot_attention_cls, no_grad: bool):
    """Subclass of the official SlotAttention whose forward is the implicit paper's Algorithm 1."""
    import torch

    class ImplicitSlotAttention(slot_attention_cls):
        def forward(self, inputs, slots):
            k, v = _keys_values(self, inputs)
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                for _ in range(self.num_iterations):
                    slots, _ = _step(self, slots, k, v)
            slots = slots.detach()  # the paper's one-line change: gradient through one step only
            return _step(self, slots, k, v)

    ImplicitSlotAttention.__name__ = "ImplicitSlotAttention" + ("" if no_grad else "Detach")
    return ImplicitSlotAttention


def apply_grad_mode(model, slot_attn_module, grad: str) -> None:
    sa = model.slot_attn.slot_attention
    assert type(sa) is slot_attn_module.SlotAttention, type(sa)
    if grad != "unroll":
        sa.__class__ = make_implicit_class(slot_attn_module.SlotAttention, grad == "implicit")


def check_implicit(model, slot_attn_module, device) -> str:
    """Our step == their forward; implicit forward == their T+1 iterations; both implicit variants
    give the same gradients; unroll's gradients differ from implicit's."""
    import copy

    import torch

    sa = model.slot_attn.slot_attention
    assert type(sa) is slot_attn_module.SlotAttention
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = torch.randn(2, 16, sa.input_size, generator=g).to(device)
    slots0 = torch.randn(2, sa.num_slots, sa.slot_size, generator=g).to(device)
    t = sa.num_iterations
    with torch.no_grad():
        ref, ref_attn = sa(inputs, slots0)
        k, v = _keys_values(sa, inputs)
        ours = slots0
        for _ in range(t):
            ours, ours_attn = _step(sa, ours, k, v)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_attn, ref_attn, rtol=1e-5, atol=1e-5)
        sa.num_iterations = t + 1
        ref_plus_one, _ = sa(inputs, slots0)
        sa.num_iterations = t

    grads = {}
    for grad in GRADS:
        m = copy.deepcopy(sa)
        if grad != "unroll":
            m.__class__ = make_implicit_class(slot_attn_module.SlotAttention, grad == "implicit")
        out, _ = m(inputs, slots0)
        if grad != "unroll":
            torch.testing.assert_close(out, ref_plus_one, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        grads[grad] = torch.cat([p.grad.flatten() for p in m.parameters()])
    torch.testing.assert_close(grads["implicit"], grads["implicit_detach"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grads["implicit"], grads["unroll"], rtol=1e-3, atol=1e-6)
    return (f"check passed: our step x T == official forward; implicit forward == official with "
            f"T+1={t + 1} iterations; implicit and implicit_detach gradients equal; unroll differs")


# ---------------------------------------------------------------------------------------------

def official_args(a: argparse.Namespace) -> argparse.Namespace:
    """The Namespace their SLATE(args) reads (names as in their train.py)."""
    keys = ("image_size", "img_channels", "vocab_size", "d_model", "num_heads", "dropout",
            "num_dec_blocks", "num_iterations", "num_slots", "num_slot_heads", "slot_size",
            "mlp_hidden_size", "pos_channels", "batch_size", "lr_dvae", "lr_main", "clip", "hard")
    return argparse.Namespace(**{k: getattr(a, k) for k in keys})


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    a = parse_args(argv)
    SLATE, slot_attn_module = import_official(a.slate_dir)
    import torch
    from torch.nn.utils import clip_grad_norm_

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(a.seed)
    model = SLATE(official_args(a)).to(device)
    model.train()
    notes = []
    if a.check:
        notes.append(check_implicit(model, slot_attn_module, device))
    apply_grad_mode(model, slot_attn_module, a.grad)

    # As their train.py: two parameter groups split on the name 'dvae'.
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in model.named_parameters() if "dvae" in n], "lr": a.lr_dvae},
        {"params": [p for n, p in model.named_parameters() if "dvae" not in n], "lr": a.lr_main},
    ])
    images = torch.rand(a.batch_size, a.img_channels, a.image_size, a.image_size,
                        generator=torch.Generator().manual_seed(a.seed)).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if a.amp == "bf16" \
        else contextlib.nullcontext
    forward = torch.compile(model, mode=a.compile_mode) if a.compile else model

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = (f"CPU {platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads")
    digest = official_digest(a.slate_dir)
    print(f"# {dev_name}; torch {torch.__version__}; official SLATE from {a.slate_dir} "
          f"(files sha256 {digest}); {time.strftime('%Y-%m-%d')}")
    for note in notes:
        print(f"# {note}")
    shape = f"{a.image_size}x{a.image_size}, batch {a.batch_size}, {a.num_slots} slots"
    record = {"device": dev_name, "torch": torch.__version__, "digest": digest,
              "date": time.strftime("%Y-%m-%d"), "grad": a.grad, "amp": a.amp,
              "compile": a.compile, "num_iterations": a.num_iterations,
              "batch_size": a.batch_size, "image_size": a.image_size}

    def write_json(**figures) -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(record, **figures), f, indent=1)

    if a.decode:
        model.eval()
        with torch.no_grad(), autocast():
            model.reconstruct_autoregressive(images)  # warm-up
            times = timed(lambda: model.reconstruct_autoregressive(images), device,
                          a.decode_repeats)
        sec = statistics.median(times)
        tokens = (a.image_size // 4) ** 2
        print(f"# official reconstruct_autoregressive: {tokens} tokens/image, full recompute per "
              f"token, {shape}, T={a.num_iterations}, amp {a.amp}")
        print("| variant | s/batch | images/s |\n|---|---|---|")
        print(f"| official autoregressive reconstruction, {a.batch_size} images ({tokens} tokens "
              f"each, full recompute per token) | {sec:.2f} | {a.batch_size / sec:.1f} |")
        write_json(decode_images_per_s=a.batch_size / sec, decode_s_per_batch=sec, tokens=tokens)
        return

    def train_step():
        optimizer.zero_grad()
        with autocast():
            _, cross_entropy, mse, _ = forward(images, a.tau, a.hard)
            loss = mse + cross_entropy
        loss.backward()
        clip_grad_norm_(model.parameters(), a.clip, "inf")
        optimizer.step()
        return loss

    for _ in range(a.warmup):
        loss = train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak of the steady-state steps (params,
        # Adam state and gradients stay allocated, so they are included)
    times = timed(train_step, device, a.steps)
    loss = float(train_step().detach())
    if loss != loss:
        raise SystemExit("loss is NaN")
    ms = 1e3 * statistics.median(times)
    ips = a.batch_size / (ms / 1e3)
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
            if device.type == "cuda" else "n/a")
    flags = [(x, tag) for x, tag, on in (("bf16 autocast", "bf16", a.amp == "bf16"),
                                          ("torch.compile", "compile", a.compile)) if on]
    extras = [x for x, _ in flags]
    label = {"unroll": "vanilla", "implicit": "implicit (paper's one-line change)",
             "implicit_detach": "implicit (literal .detach(), no no_grad)"}[a.grad]
    variant = ", ".join([f"official {label}", f"T={a.num_iterations}"] + extras)
    updates = (f"{a.num_iterations} slot updates" if a.grad == "unroll" else
               f"{a.num_iterations} slot updates without gradient + 1 with")
    print(f"# {shape}, vocab {a.vocab_size}, d_model {a.d_model}, {a.num_dec_blocks} decoder "
          f"blocks; {updates}; median of {a.steps} steps after {a.warmup} warm-up; min "
          f"{1e3 * min(times):.1f} ms; final loss {loss:.1f}")
    print("| variant | ms/step | images/s | peak memory |\n|---|---|---|---|")
    print(f"| {variant} | {ms:.1f} | {ips:.0f} | {peak} |")
    # The same figures in train_step.py's columns, to paste under our rows.
    mib = peak.removesuffix(" MiB")
    print(f"| official-{a.grad}{''.join('+' + tag for _, tag in flags)} | "
          f"{a.num_iterations} | {ms:.1f} | {ips:.0f} | n/a | {mib} | n/a | n/a |")
    write_json(variant=variant, ms=ms, min_ms=1e3 * min(times), images_per_s=ips, loss=loss,
               peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20
                         if device.type == "cuda" else None),
               max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
