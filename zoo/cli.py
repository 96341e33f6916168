"""The ``attnzoo`` console script.

``fit``, ``validate``, ``test`` and ``predict`` are the LightningCLI of :mod:`attnzoo.recipes.cli` (``detect ...`` and
``segment ...`` those of the detection and segmentation recipes); ``demo`` trains a small model on embedded digits
(:mod:`attnzoo.recipes.demo`; ``demo detection`` / ``demo segmentation`` on digit scenes); ``profile``, ``convert``,
``export`` and ``models`` are plain argparse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

LIGHTNING_COMMANDS = {
    "fit": "train a model (LightningCLI): attnzoo fit --config recipes/configs/imagenet/nat_tiny.yaml",
    "validate": "evaluate on the validation split (LightningCLI)",
    "test": "evaluate on the test split (LightningCLI)",
    "predict": "predict class probabilities (LightningCLI)",
}


def _cmd_profile(args: argparse.Namespace) -> int:
    from .profiling import run_profile

    run_profile(args.models, image=args.image, repeats=args.repeats)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from ._registry import list_models

    for name in list_models(args.pattern):
        print(name)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.model or args.num_classes is not None or args.img_size is not None:
            raise SystemExit("attnzoo convert: --config takes no --model, --num-classes or --img-size")
        from .weights.dense_convert import convert_dense_checkpoint

        out = convert_dense_checkpoint(args.config, args.src, args.out)
        print(f"converted {args.src} for {args.config}: {out} (evaluate with --model.weights {out})")
        return 0
    if not args.model:
        raise SystemExit("attnzoo convert: give --model (a classification model) or --config (a recipe config)")
    from .weights.convert import convert_checkpoint

    weights = convert_checkpoint(args.model, args.src, args.out, num_classes=args.num_classes, img_size=args.img_size)
    print(
        f"converted {args.src} for {args.model}: {weights} "
        f"(load with timm.create_model('local-dir:{args.out}', pretrained=True))"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .weights.convert import load_source
    from .weights.onnx_export import export_onnx, run_onnx

    path = export_onnx(
        args.model, args.onnx, weights=args.weights, dynamic_size=args.dynamic_size, opset=args.opset,
        img_size=args.img_size,
    )  # fmt: skip
    model = load_source(args.model, args.weights) if args.weights else None
    if model is not None:  # the file against PyTorch on the same input
        size = args.img_size or model.pretrained_cfg["input_size"][-1]
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            diff = (run_onnx(path, images) - model(images)).abs().max().item()
        print(f"exported {args.model} to {path}; onnxruntime vs PyTorch max abs difference {diff:.2e}")
    else:
        print(f"exported {args.model} (random weights) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="attnzoo: efficient-attention vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, text in LIGHTNING_COMMANDS.items():  # dispatched before argparse; listed here for --help
        commands.add_parser(name, help=f"{text}; see attnzoo {name} --help", add_help=False)
    commands.add_parser(
        "detect",
        help="COCO detection / instance segmentation (LightningCLI): attnzoo detect fit|validate|test|predict "
        "--config recipes/configs/coco/nat_tiny_mask_rcnn_1x.yaml; see attnzoo detect --help",
        add_help=False,
    )
    commands.add_parser(
        "segment",
        help="ADE20K semantic segmentation, UperNet / Semantic FPN (LightningCLI): attnzoo segment "
        "fit|validate|test|predict --config recipes/configs/ade20k/upernet_nat_tiny_160k.yaml; see attnzoo segment "
        "--help",
        add_help=False,
    )
    commands.add_parser(
        "demo",
        help="train a small gated ViT on 4,000 real MNIST digits (CPU, a few minutes) and report held-out top-1; "
        "'attnzoo demo detection': a Mask R-CNN on scenes of those digits, held-out box and mask AP; "
        "'attnzoo demo segmentation': UperNet on those scenes, held-out mIoU",
        add_help=False,
    )
    profile = commands.add_parser(
        "profile",
        help="build every zoo model, run it on a real photo and print params / GFLOPs / CPU latency",
        description="Build every registered attnzoo model, run it on a real photo shipped with scikit-learn and "
        "print a table of parameters, GFLOPs (multiply-accumulates) and CPU latency.",
    )
    profile.add_argument("--models", default="", metavar="PATTERN", help="timm wildcard filter, e.g. 'gated_vit_*'")
    profile.add_argument("--image", default=None, help="an image file to use instead of scikit-learn's china.jpg")
    profile.add_argument("--repeats", type=int, default=3, help="timed forward passes per model (median reported)")
    profile.set_defaults(func=_cmd_profile)

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint (official, Hugging Face, exported, mmdet) into a timm local-dir folder or, with "
        "--config, a recipe weights folder",
        description="With --model: load CHECKPOINT into MODEL through the model's checkpoint filter (official "
        "training pickles are read without executing code) and write OUT/model.safetensors + OUT/config.json, "
        "loadable with timm.create_model('local-dir:OUT', pretrained=True) (without pretrained=True timm builds "
        "random weights). With --config: map a released mmdetection checkpoint (Mask R-CNN, Cascade Mask R-CNN, "
        "RetinaNet) onto the detector of a COCO recipe config, or a released mmsegmentation checkpoint (UperNet, "
        "Semantic FPN) onto the segmenter of an ADE20K recipe config, and write OUT/model.safetensors + "
        "OUT/meta.json, loadable with --model.weights OUT.",
    )
    convert.add_argument("--model", default=None, help="registered model name, e.g. nat_tiny")
    convert.add_argument(
        "--config", default=None, help="recipe config, e.g. coco/nat_mini_cascade_mask_rcnn_3x.yaml or ade20k/..."
    )
    convert.add_argument("--src", required=True, metavar="CHECKPOINT", help="checkpoint file or exported folder")
    convert.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    convert.add_argument("--num-classes", type=int, default=None, help="the checkpoint's class count, if not the cfg's")
    convert.add_argument("--img-size", type=int, default=None, help="input size the checkpoint was trained at")
    convert.set_defaults(func=_cmd_convert)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (onnxruntime-ready); needs the 'onnx' extra",
        description="Export MODEL (with --weights: a checkpoint file or exported folder) to ONNX through torch's "
        "dynamo exporter; the batch dimension is dynamic, --dynamic-size makes height and width dynamic where the "
        "architecture allows (plain ViTs).",
    )
    export.add_argument("--model", required=True, help="registered model name")
    export.add_argument("--weights", default=None, metavar="DIR|FILE", help="checkpoint file or exported folder")
    export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    export.add_argument("--dynamic-size", action="store_true", help="symbolic image height and width")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--img-size", type=int, default=None, help="export (and check) at this square size")
    export.set_defaults(func=_cmd_export)

    models = commands.add_parser(
        "models", help="list the registered attnzoo models", description="List attnzoo's models in timm's registry."
    )
    models.add_argument("pattern", nargs="?", default="", help="timm wildcard filter")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from attnzoo.recipes.cli import main as run_lightning_command

        run_lightning_command(None if from_command_line else argv)  # the DDP launcher re-runs sys.argv for the ranks
        return 0
    if argv and argv[0] == "detect":
        from attnzoo.recipes.detection.cli import main as run_detection_command

        run_detection_command(None if from_command_line else argv[1:])
        return 0
    if argv and argv[0] == "segment":
        from attnzoo.recipes.segmentation.cli import main as run_segmentation_command

        run_segmentation_command(None if from_command_line else argv[1:])
        return 0
    if argv and argv[0] == "demo":
        if argv[1:2] == ["detection"]:
            from attnzoo.recipes.detection.demo import run_detection_demo

            run_detection_demo(argv[2:])
            return 0
        if argv[1:2] == ["segmentation"]:
            from attnzoo.recipes.segmentation.demo import run_segmentation_demo

            run_segmentation_demo(argv[2:])
            return 0
        from attnzoo.recipes.demo import run_training_demo

        run_training_demo(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
