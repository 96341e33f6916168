"""``attnzoo demo segmentation``, shortened: scenes, untrained and trained mIoU, per-class IoU, the PNG."""

import re

from PIL import Image

from attnzoo.cli import main


def test_demo_segmentation_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo config writes under runs/demo_segmentation/
    args = ["--train-scenes", "8", "--test-scenes", "2", "--trainer.max_steps", "2", "--model.max_iters", "2"]
    assert main(["demo", "segmentation", *args, "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    assert "segmentation demo: upernet on nat_mini, 2 steps; dataset-level metrics on 2 held-out scenes" in out
    for name in ("untrained", "trained  "):
        match = re.search(rf"  {name} mIoU (\d\.\d{{3}})  mAcc (\d\.\d{{3}})  aAcc (\d\.\d{{3}})", out)
        assert match and all(0.0 <= float(v) <= 1.0 for v in match.groups()), out
    rows = re.findall(r"  (background|digit \d) +(\d\.\d{3}|-) +(\d\.\d{3}|-)", out)
    assert [r[0] for r in rows] == ["background", *(f"digit {d}" for d in range(10))]
    scenes = tmp_path / "runs" / "demo_segmentation" / "scenes"
    assert (
        len(list((scenes / "train" / "masks").iterdir())) == 8
        and len(list((scenes / "test" / "images").iterdir())) == 2
    )
    with Image.open(tmp_path / "runs" / "demo_segmentation" / "test_predictions.png") as picture:
        # two 128 px scenes drawn twice as large: image | ground truth | prediction, 4 px gaps
        assert picture.size == (2 * (3 * 128 + 2 * 4), 2 * (2 * 128 + 4))
