"""Benchmark agent attention: the paper's formulation written out vs attnzoo's ``AgentAttention``.

For the agent layers of Agent-DeiT-T, Agent-PVT-T and Agent-Swin-T (their widths, heads and agent counts, on the map
each stage sees at the given input size), times one layer's forward (eval, no autograd) and forward + backward
(train mode) for:

* ``formula``: Han et al.'s equations as written (``A = pool(Q)``, ``V_A = softmax(A K^T s + B1) V``,
  ``O = softmax(Q A^T s + B2) V_A + DWC(V)``), heads split with reshape/permute, both position biases rebuilt from
  the tables on every call (interpolation to the map, broadcast sums) — written here from the paper;
* ``sdpa``: the same, both softmaxes through ``F.scaled_dot_product_attention`` with the biases as float masks
  (attnzoo's formulation before the CPU tuning);
* ``attnzoo``: :class:`attnzoo.layers.AgentAttention` (explicit products on token-major views, biases cached per map
  size when autograd is off).

All three share one module's weights and agree to float rounding (checked before timing).

    python benchmarks/bench_agent.py --sizes 224 512 --threads 1 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from attnzoo.layers import AgentAttention

# name: (dim, heads, agents, stride, prefix tokens)
LAYERS = {
    "deit_t": (192, 3, 49, 16, 1),
    "pvt_t.1": (64, 1, 9, 4, 0),
    "pvt_t.2": (128, 2, 16, 8, 0),
    "pvt_t.3": (320, 5, 49, 16, 0),
    "pvt_t.4": (512, 8, 49, 32, 0),
    "swin_t.1": (96, 3, 9, 4, 0),
    "swin_t.2": (192, 6, 16, 8, 0),
    "swin_t.3": (384, 12, 49, 16, 0),
}
IMPLS = ("formula", "sdpa", "attnzoo")


def paper_formula(m: AgentAttention, x: torch.Tensor, H: int, W: int, sdpa: bool = False) -> torch.Tensor:
    """Agent attention of tokens ``x`` ``(B, P + H*W, C)`` from the equations, with ``m``'s weights."""
    B, N, C = x.shape
    P, h, n = m.num_prefix_tokens, m.num_heads, m.agent_num
    d = C // h
    q, k, v = m.qkv(x).chunk(3, dim=-1)  # (B, N, C) each
    agents = F.adaptive_avg_pool2d(q[:, P:].transpose(1, 2).reshape(B, C, H, W), math.isqrt(n))
    agents = agents.flatten(2).transpose(1, 2)  # (B, n, C)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, t.shape[1], h, d).permute(0, 2, 1, 3)

    q, k, v, agents = split_heads(q), split_heads(k), split_heads(v), split_heads(agents)
    grid = F.interpolate(m.an_bias, size=(H, W), mode="bilinear", align_corners=False)
    rows = F.interpolate(m.ah_bias, size=(H, 1), mode="bilinear", align_corners=False)
    cols = F.interpolate(m.aw_bias, size=(1, W), mode="bilinear", align_corners=False)
    b1 = (grid + rows + cols).reshape(h, n, H * W)
    grid = F.interpolate(m.na_bias, size=(H, W), mode="bilinear", align_corners=False)
    rows = F.interpolate(m.ha_bias, size=(H, 1), mode="bilinear", align_corners=False)
    cols = F.interpolate(m.wa_bias, size=(1, W), mode="bilinear", align_corners=False)
    b2 = (grid + rows + cols).reshape(h, n, H * W).transpose(1, 2)
    if P:
        b1 = torch.cat([m.ac_bias, b1], dim=-1)
        b2 = torch.cat([m.ca_bias.transpose(1, 2), b2], dim=-2)
    if sdpa:
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=b1)
        out = F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=b2)
    else:
        scale = d**-0.5
        agent_v = torch.softmax((agents * scale) @ k.transpose(-1, -2) + b1, dim=-1) @ v
        out = torch.softmax((q * scale) @ agents.transpose(-1, -2) + b2, dim=-1) @ agent_v
    out = out.transpose(1, 2).reshape(B, N, C)
    local = m.dwc(v[:, :, P:].transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2))
    local = local.flatten(2).transpose(1, 2)
    out = torch.cat([out[:, :P], out[:, P:] + local], dim=1)
    return m.proj(out)


def _call(impl: str, m: AgentAttention, x: torch.Tensor, side: int) -> torch.Tensor:
    if impl == "attnzoo":
        return m(x, [side, side])
    return paper_formula(m, x, side, side, sdpa=impl == "sdpa")


def time_once(impl: str, m: AgentAttention, x: torch.Tensor, side: int, backward: bool) -> float:
    """ms of one call: forward under ``no_grad``, or forward + backward."""
    start = time.perf_counter()
    if backward:
        _call(impl, m, x, side).sum().backward()
    else:
        with torch.no_grad():
            _call(impl, m, x, side)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="input sides (px)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batch", type=int, default=1, help="batch of the forward pass")
    parser.add_argument("--train-batch", type=int, default=8, help="batch of the forward + backward pass")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for size in args.sizes:
        for name in args.layers:
            dim, heads, agents, stride, prefix = LAYERS[name]
            side, grid = size // stride, 224 // stride
            torch.manual_seed(0)
            module = AgentAttention(dim, heads, agents, grid_size=grid, num_prefix_tokens=prefix)
            for backward in (False, True):
                module.train(backward)
                batch = args.train_batch if backward else args.batch
                x = torch.randn(batch, prefix + side * side, dim)
                with torch.no_grad():
                    ref = paper_formula(module, x, side, side)
                    for impl in IMPLS[1:]:
                        torch.testing.assert_close(_call(impl, module, x, side), ref, atol=1e-4, rtol=1e-4)
                for impl in IMPLS:  # warm-up (fills attnzoo's bias cache in eval)
                    time_once(impl, module, x, side, backward)
                # interleave the implementations, one repetition at a time, so machine load hits all alike
                times = {impl: [] for impl in IMPLS}
                for _ in range(args.repeats):
                    for impl in IMPLS:
                        times[impl].append(time_once(impl, module, x, side, backward))
                result = {impl: statistics.median(t) for impl, t in times.items()}
                mode = "fwd+bwd" if backward else "fwd"
                rows.append((size, name, side, mode, batch, result))
                cells = "  ".join(f"{i}: {t:8.2f} ms" for i, t in result.items())
                print(f"{size:>5}px {name:<9} map {side}x{side} {mode:<7} batch {batch}  {cells}", flush=True)

    if args.markdown:
        print(
            f"\n{datetime.date.today()} | {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads | torch {torch.__version__} | fp32, median of {args.repeats}\n"
        )
        head = " | ".join(f"{i} ms" for i in IMPLS)
        print(f"| input | layer | map | pass | batch | {head} | formula / attnzoo | sdpa / attnzoo |")
        print("|" + "---|" * (5 + len(IMPLS) + 2))
        for size, name, side, mode, batch, r in rows:
            cells = " | ".join(f"{r[i]:.2f}" for i in IMPLS)
            speed = f"{r['formula'] / r['attnzoo']:.2f}x | {r['sdpa'] / r['attnzoo']:.2f}x"
            print(f"| {size} | {name} | {side}x{side} | {mode} | {batch} | {cells} | {speed} |")


if __name__ == "__main__":
    main()
