"""`ditkit sample --upscale-from`: the high-resolution chain from the command line."""

import numpy as np
from PIL import Image

from helpers import run_cli, tiny_run


def test_upscale_chain_from_a_teacher_into_a_clear_student(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "digits", *tiny_run(run), "--no-progress")[0] == 0
    chain = ["sample", "--ckpt", str(run), "--mixer", "clear", "--mixer-opt", "radius=2", "--base-ckpt", str(run),
             "--resolution", "32", "--upscale-from", "16", "--strength", "0.5", "--num", "2", "--steps", "4",
             "--attention-scale", "--position-scaling", "ntk"]
    code, out, _ = run_cli(capsys, *chain, "--out", str(tmp_path / "a.png"))
    assert code == 0 and "upscaled from 16 at strength 0.5" in out
    run_cli(capsys, *chain, "--out", str(tmp_path / "b.png"))
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "b.png"))
    assert a.shape == (2 + 34, 2 + 2 * 34) and np.array_equal(a, b)  # 1x2 grid of 32 px images; same seed

    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--resolution", "32", "--upscale-from", "64",
                           "--out", str(tmp_path / "c.png"))
    assert code == 2 and "larger than the target" in err
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--base-ckpt", str(run),
                           "--out", str(tmp_path / "d.png"))
    assert code == 2 and "--base-ckpt needs --upscale-from" in err
