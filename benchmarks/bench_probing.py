"""Benchmark frozen-backbone probes: linear vs efficient probing (EP) vs SimPool vs attentive probing, on real digits.

Every probe is the recipe's own command, ``attnzoo fit --config recipes/configs/probe/demo_digits.yaml --model.probe
<probe>`` (the backbone frozen, its features cached once, only the head trained: AdamW lr 1e-3, no weight decay,
batch 64, ``--epochs`` epochs on the 4,000 training digits of ``embedded/mnist_5k``), followed by ``test`` on the
1,000 held-out digits, for two frozen backbones:

* ``demo``: the 4-block gated ViT that ``attnzoo demo`` trained (its exported weights, ``--demo-weights``), 28 px;
* ``deit_s_random``: timm's ``deit_small_patch16_224`` with **random weights** (timm's init, seed 0, no training), the
  digits resized to ``--deit-size`` px.

Reported per probe: held-out top-1, trainable parameters, head MFLOPs (multiply-accumulates of the head for one
image, :func:`attnzoo.kernels.flops.count_macs`, the papers' convention; 1 MFLOP = 0.001 GFLOPs) and the wall time of
``fit`` (feature caching + training + the per-epoch validation) and of ``test`` (the backbone on the held-out images).

    python benchmarks/bench_probing.py --demo-weights runs/demo/export/model.safetensors --threads 1 \
        --markdown benchmarks/results/probing-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch

import attnzoo
from attnzoo.kernels.flops import count_macs
from attnzoo.recipes.cli import CONFIG_DIR, run_cli
from attnzoo.recipes.probe import PROBES

CONFIG = CONFIG_DIR / "probe" / "demo_digits.yaml"


def backbone_overrides(backbone: str, args: argparse.Namespace) -> list[str]:
    if backbone == "demo":
        return ["--model.pretrained", str(args.demo_weights)]
    size = args.deit_size
    return [
        "--model.model_name=deit_small_patch16_224",
        f"--model.model_kwargs={{img_size: {size}}}",
        "--model.pretrained=false",
        f"--data.input_size=[3, {size}, {size}]",
        "--data.eval_batch_size=100",
    ]


def run_probe(backbone: str, probe: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Fit and test one probe through the recipe's CLI; returns the table row."""
    root = workdir / backbone / probe
    cli_args = [
        "--config",
        str(CONFIG),
        f"--model.probe={probe}",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--checkpoint.dirpath={root}/checkpoints",
        f"--export.dirpath={root}/export",
        *backbone_overrides(backbone, args),
    ]
    torch.manual_seed(0)
    cli = run_cli(cli_args, run=False, prog="bench_probing")
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    test_seconds = time.perf_counter() - start
    model = module.model.eval()
    image = torch.zeros(1, *data.data_config()["input_size"])
    with torch.no_grad():
        head_input = model.extract(image)
    head_macs, _ = count_macs(model.head, head_input)
    backbone_macs, _ = count_macs(model.backbone, image)
    return {
        "backbone": backbone,
        "probe": probe,
        "top1": float(results["test/top1"]),
        "images": int(results["test/images"]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "head_mflops": head_macs / 1e6,
        "backbone_gflops": backbone_macs / 1e9,
        "tokens": head_input.shape[1] if head_input.ndim == 3 else 1,
        "fit_s": fit_seconds,
        "test_s": test_seconds,
    }


def markdown(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    lines = [
        "| backbone | probe | held-out top-1 | trainable params | head MFLOPs | head input | fit s | test s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        head_input = f"{r['tokens']} tokens" if r["probe"] != "linear" else "pooled"
        lines.append(
            f"| {r['backbone']} | {r['probe']} | {r['top1']:.2%} | {r['trainable']:,} | {r['head_mflops']:.3f} | "
            f"{head_input} | {r['fit_s']:.0f} | {r['test_s']:.0f} |"
        )
    backbones = {r["backbone"]: r["backbone_gflops"] for r in rows}
    cpu = platform.processor() or platform.machine()
    notes = [
        "",
        f"- Backbone GFLOPs per image: {', '.join(f'{k} {v:.4f}' for k, v in backbones.items())}",
        f"- {rows[0]['images']} held-out digits; {args.epochs} epochs; {args.threads} torch thread(s)",
        f"- Machine: {cpu}, {os.cpu_count()} cores shared with other jobs "
        f"(load average {load[0]:.1f} -> {load[1]:.1f})",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"attnzoo {attnzoo.__version__}; {datetime.date.today().isoformat()}",
    ]
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-weights", type=Path, default=Path("runs/demo/export/model.safetensors"))
    parser.add_argument("--backbones", nargs="+", default=["demo", "deit_s_random"], choices=["demo", "deit_s_random"])
    parser.add_argument("--probes", nargs="+", default=list(PROBES), choices=PROBES)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--deit-size", type=int, default=64, help="input side of the DeiT-S backbone (px)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path, help="write the table to this file")
    args = parser.parse_args()
    if "demo" in args.backbones and not args.demo_weights.is_file():
        parser.error(f"--demo-weights {args.demo_weights} not found: run `attnzoo demo` first")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for backbone in args.backbones:
            for probe in args.probes:
                rows.append(run_probe(backbone, probe, args, Path(workdir)))
                r = rows[-1]
                print(
                    f"{backbone} {probe}: top-1 {r['top1']:.2%}, {r['trainable']:,} trainable, "
                    f"head {r['head_mflops']:.3f} MFLOPs, fit {r['fit_s']:.0f} s, test {r['test_s']:.0f} s",
                    flush=True,
                )
    table = markdown(rows, args, (load_start, os.getloadavg()[0]))
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
