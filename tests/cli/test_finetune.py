"""finetune / eval: masks held through training, checkpoints, exact resume, DDP on two CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimap_fast.errors import DimapError
from dimap_fast.cli import main
from dimap_fast.io.models import load_model, prune_model
from dimap_fast.engine.masks import MaskHandle, MaskLeakError
from dimap_fast.train import MODEL_FILE, STATE_FILE, Recipe, load_data, load_train_state, make_scheduler, train
from dimap_fast.train.distributed import Dist
from dimap_fast.io.checkpoint import load_pruned, load_state_dict, save_atomic

TINY = ["--epochs", "1", "--max-train-samples", "96", "--max-val-samples", "64", "--batch-size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    # These tests pin the CPU training loop, bit for bit across a resume. On a GPU host "--device
    # auto" would train on CUDA, whose bias-table backward accumulates with atomics (not bit-exact);
    # CUDA fine-tuning is checked by bench/gpu_check's finetune step instead.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on a busy two-core machine run this tiny model several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _masks_hold(model_path) -> dict:
    state, masks, meta = load_pruned(model_path)
    assert masks, "the checkpoint holds no masks"
    for name, keep in masks.items():
        assert torch.count_nonzero(state[name][~keep]) == 0, name
    return meta


def _lrs(recipe: Recipe, steps_per_epoch: int) -> list[float]:
    """The LR of every optimizer step of a run, as the loop sets it (timm's scheduler, per step)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=recipe.lr)
    sched = make_scheduler(opt, recipe, steps_per_epoch)
    lrs = [opt.param_groups[0]["lr"]]
    for step in range(1, recipe.epochs * steps_per_epoch + 1):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_schedule_warms_up_then_decays_to_min_lr():
    r = Recipe(epochs=3, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=1)
    lrs = _lrs(r, 10)
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3) and lrs[30] == pytest.approx(1e-5)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # linear warm-up
    assert lrs[20] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half-way down the cosine
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert _lrs(Recipe(epochs=3, lr=1e-3, warmup_epochs=0), 10)[0] == pytest.approx(1e-3)
    with pytest.raises(DimapError, match="min-lr"):
        Recipe(lr=1e-5, min_lr=1e-4).check()
    with pytest.raises(DimapError, match="epochs"):
        Recipe(epochs=0).check()


def test_digits_prune_finetune_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--data", "digits", "--ratio", "0.5", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "50.0% of prunable weights removed" in text and "epoch 1/1" in text and "top-1" in text
    meta = _masks_hold(out / MODEL_FILE)
    assert json.loads(meta["data"])["data"] == "digits" and meta["method"] == "dimap" and meta["epoch"] == "1"
    assert (out / STATE_FILE).is_file()
    # eval reads the data settings the checkpoint records
    assert main(["eval", str(out / MODEL_FILE), "--max-val-samples", "64"]) == 0
    text = capsys.readouterr().out
    assert "50.0% of prunable weights removed" in text and "top-1" in text and "top-5" in text
    # the same run again is refused, a finished run resumes to nothing
    assert main(["finetune", "--data", "digits", "--out", str(out), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["finetune", "--resume", "--out", str(out)]) == 0
    assert "finished all 1 epochs" in capsys.readouterr().out


def _write_image_folder(root, classes=("cat", "dog"), per_class=(4, 2)):
    from PIL import Image

    for split, count in zip(("train", "val"), per_class):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (40, 36), color=(200 * index, 30 * k, 90)).save(folder / f"{k}.png")


def test_image_folder_dense_checkpoint_pruned_then_finetuned(tmp_path, capsys):
    from dimap_fast.train import small_swin, small_swin_config

    _write_image_folder(tmp_path / "images")
    torch.manual_seed(0)
    config = small_swin_config(num_classes=2)
    dense = tmp_path / "dense.safetensors"
    save_atomic(dense, small_swin(num_classes=2).state_dict(), {"model_config": json.dumps(config)})
    out = tmp_path / "run"
    args = ["finetune", str(dense), "--data", str(tmp_path / "images"), "--ratio", "0.6", "--pattern", "block",
            "--block-size", "16", "--out", str(out), "--workers", "0", "--epochs", "2", "--batch-size", "4",
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "epoch 2/2" in text and "top-5" not in text  # two classes: top-1 only
    meta = _masks_hold(out / MODEL_FILE)
    assert meta["pattern"] == "block" and json.loads(meta["model_config"])["num_classes"] == 2
    assert main(["eval", str(out / MODEL_FILE), "--workers", "0"]) == 0
    assert "on 4 " in capsys.readouterr().out
    # a 2-class checkpoint on 10-class data needs a new head, which only finetune gives
    assert main(["eval", str(dense), "--data", "digits"]) == 2
    assert "classifies 2 classes, the data has 10" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "images"), "--workers", "0"]) == 2
    assert "name the model" in capsys.readouterr().err


def test_resume_continues_exactly(tmp_path, capsys):
    common = ["--data", "digits", "--ratio", "0.7", "--epochs", "2", "--max-train-samples", "96",
              "--max-val-samples", "32", "--batch-size", "32", "--no-progress"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["finetune", *common, "--out", str(whole)]) == 0
    assert main(["finetune", *common, "--out", str(split), "--stop-after", "1"]) == 0
    assert "stopped after epoch 1 of 2" in capsys.readouterr().out
    assert load_train_state(split / STATE_FILE).epoch == 1
    # a changed recipe is refused: --resume continues the same run
    assert main(["finetune", "--resume", "--out", str(split), "--lr", "1e-2"]) == 2
    assert "differs from the run being resumed" in capsys.readouterr().err
    # so is another number of processes: the epochs would split differently
    state = load_train_state(split / STATE_FILE)
    with pytest.raises(DimapError, match="saved by 1 process"):
        train(load_model(None, "digits").model, load_data("digits", 32, 96, 32), resume=state, dist=Dist(world_size=2))
    assert main(["finetune", "--resume", "--out", str(split), "--no-progress"]) == 0
    a, _ = load_state_dict(whole / MODEL_FILE)
    b, _ = load_state_dict(split / MODEL_FILE)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_train_state(whole / STATE_FILE), load_train_state(split / STATE_FILE)
    assert sa.epoch == sb.epoch == 2
    assert all(torch.equal(sa.optimizer["state"][i][k], sb.optimizer["state"][i][k])
               for i in sa.optimizer["state"] for k in sa.optimizer["state"][i])
    assert [h["loss"] for h in sa.history] == [h["loss"] for h in sb.history]


def test_a_moved_pruned_weight_stops_training(monkeypatch):
    loaded = load_model(None, "digits")
    prune_model(loaded, 0.5)
    data = load_data("digits", 32, max_train=32, max_val=16)
    # the guard a bug might lose: no gradient masking, no re-zeroing after the step
    monkeypatch.setattr("dimap_fast.engine.masks._masked_grad", lambda keep: lambda grad: grad)
    monkeypatch.setattr(MaskHandle, "zero_", lambda self: None)
    with pytest.raises(MaskLeakError, match="after step 1 of epoch 1"):
        train(loaded.model, data, Recipe(epochs=1, lr=1e-3, warmup_epochs=0, batch_size=32), loaded.masks,
              progress=False, log=None)


def test_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        (["finetune", "--resume", "--out", str(tmp_path)], "no run to resume"),
        (["finetune", "--data", "digits", "--method", "global", "--out", str(tmp_path / "r")], "give --ratio too"),
        (["finetune", "--data", "digits", "--out", str(tmp_path / "a" / "b")], "does not exist"),
        (["finetune", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
          "swin_tiny_patch4_window7_224"], "not a directory"),
        (["finetune", "--data", "digits", "--epochs", "0", "--out", str(tmp_path / "r")], "epochs"),
        (["eval", "--data", "digits", "--ratio", "0.5", str(tmp_path / "missing.safetensors")], "not found"),
        # usage errors: the one parser's one line too (finetune's own parser used to print its usage)
        (["finetune", "--data", "digits", "--epochs", "two", "--out", str(tmp_path / "r")], "invalid int value"),
        (["eval", "--data", "digits", "--ratio", "1.5"], "ratio"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    # a pruned checkpoint is not pruned again
    out = tmp_path / "p"
    assert main(["finetune", "--data", "digits", "--ratio", "0.5", "--out", str(out), *TINY]) == 0
    assert main(["eval", str(out / MODEL_FILE), "--ratio", "0.5"]) == 2
    assert "pruned already" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_keep_masks_and_replicas_equal(tmp_path):
    out, ranks = tmp_path / "ddp", tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "dimap_fast.cli",
           "finetune", "--data", "digits", "--ratio", "0.6", "--out", str(out), "--device", "cpu",
           "--epochs", "1", "--max-train-samples", "64", "--max-val-samples", "32", "--batch-size", "16",
           "--no-progress", "--save-rank-weights", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == 1  # rank 0 alone prints
    assert "2 process(es)" in done.stdout
    zero, one = load_state_dict(ranks / "rank0.safetensors")[0], load_state_dict(ranks / "rank1.safetensors")[0]
    assert zero.keys() == one.keys() and all(torch.equal(zero[k], one[k]) for k in zero)
    _masks_hold(out / MODEL_FILE)
    state, masks, _ = load_pruned(out / MODEL_FILE)
    assert all(torch.equal(state[k], zero[k]) for k in zero)
    assert load_train_state(out / STATE_FILE).run["world_size"] == 2
    # it trained: two processes of 2 steps each moved the kept weights away from the pruned start
    start = load_model(None, "digits")
    prune_model(start, 0.6)
    name = next(iter(masks))
    assert not torch.equal(start.model.state_dict()[name], zero[name])
    assert torch.equal(start.masks[name], masks[name])

