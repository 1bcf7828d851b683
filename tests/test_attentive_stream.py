"""Attentive training streamed from the frame file equals the in-memory path for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tolerances import assert_exceeds, assert_within, ccc, max_diff, nudge, trajectory
from toy_store import write_toy_store

from featurestore.frames import FrameWriter, finalize_frames


def _frame_store(tmp_path, n=120, d=4):
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        t = int(rng.integers(3, 30))
        frames.append(rng.normal(size=d) + rng.uniform(0.2, 2) * rng.normal(size=(t, d)))
    pooled = np.stack([f.mean(0) for f in frames])
    labels = np.stack([1 + 6 * np.tanh(np.abs(f).mean(0)[:3]) for f in frames])
    splits = ["Train"] * 70 + ["Development"] * 30 + ["Test1"] * 20
    store = tmp_path / "s.h5"
    codes = {
        "EmoClass": np.asarray(["A", "S", "H", "N"])[np.arange(n) % 4],
        "Gender": ["Female"] * n,
    }
    write_toy_store(store, splits, labels, {"a": pooled, "b": pooled[:, ::-1]}, codes)
    for v in ("a", "b"):
        w = FrameWriter(store, v, d)
        for s in range(0, n, 25):
            rows = np.arange(s, min(n, s + 25))
            rows = rows[rows != 7]  # a Train row without frames: left out of training
            w.write(rows, [frames[r] if v == "a" else frames[r][:, ::-1] for r in rows])
        finalize_frames(store, v)
    return store


@pytest.mark.parametrize(
    "tasks", ["[attributes]", pytest.param("[attributes, category]", marks=pytest.mark.slow)]
)
def test_streamed_training_equals_in_memory_training(tmp_path, monkeypatch, tasks):
    """Streamed and in-memory training differ by float32 rounding only: the same batches,
    dropout keys and updates, but reductions over a batch's own padded length instead of the
    split's and one jitted step per batch instead of a scan. Over 10 Adam steps no a-priori
    bound holds (Adam divides rounding noise by sqrt(v) + eps), so the bound is measured in
    this run: the in-memory run once more from its initial parameters moved one ulp at random
    (`tolerances.nudge`), its spread scaled by what 10 steps of the two orders' roundings can
    inject (`tolerances.trajectory`: x lambda x steps). A learning rate 1 % off must land
    outside it."""
    import jax_ifmvse.train as train_mod
    from jax_ifmvse.config import load_config
    from jax_ifmvse.train import train_run

    store = _frame_store(tmp_path)
    common = [
        "model.common_dim=8", "model.hidden=8", "model.dropout=0.2", "model.pooling=attentive",
        "model.score_sets=[{name: S, kind: fusion, views: [a, b]}]",
        f"train.tasks={tasks}", "train.epochs=2", "train.batch_size=16",
        "train.learning_rate=1e-2", "train.test_splits=[Test1]", "loader.pad_frames=16",
        "loader.eval_batch=8",
    ]  # fmt: skip
    if tasks == "[attributes]":  # the config allows multitask only with the attributes alone
        common.append("train.multitask=true")
    runs = {}
    for mode in ("memory", "stream"):
        cfg = load_config(None, [*common, f"loader.frames={mode}"])
        train_run(store, cfg, tmp_path / mode)
        runs[mode] = tmp_path / mode
    wrong = load_config(None, [*common, "loader.frames=memory", "train.learning_rate=1.01e-2"])
    train_run(store, wrong, tmp_path / "wrong")
    real_init = train_mod.init_state

    def nudged_init(model, tx, example, key):
        params = nudge(real_init(model, tx, example, key).params)
        return real_init(model, tx, example, key).replace(params=params, opt_state=tx.init(params))

    monkeypatch.setattr(train_mod, "init_state", nudged_init)
    train_run(store, load_config(None, [*common, "loader.frames=memory"]), tmp_path / "nudged")
    runs |= {"wrong": tmp_path / "wrong", "nudged": tmp_path / "nudged"}

    model = "multitask" if "category" not in tasks else "joint"
    hist = {
        k: [json.loads(x) for x in (r / "S" / model / "metrics.jsonl").open()]
        for k, r in runs.items()
    }
    assert [h["step"] for h in hist["memory"]] == [h["step"] for h in hist["stream"]] == [5, 10]
    steps = hist["memory"][-1]["step"]  # 10 Adam steps: 69 Train rows with frames / 16, 2 epochs
    scores = {k: {} for k in runs}
    for split in ("Development", "Test1"):
        for name, r in runs.items():
            scores[name][split] = np.load(r / "scores" / f"{split}.npz")
    for split in ("Development", "Test1"):
        a, b = scores["memory"][split], scores["stream"][split]
        assert np.isfinite(a["scores"]).sum() > 0
        np.testing.assert_array_equal(np.isnan(a["scores"]), np.isnan(b["scores"]))
        for part in ("scores", "probs")[: 1 + ("probs" in a.files)]:
            spread = max_diff(scores["nudged"][split][part], a[part])
            bound = trajectory(spread, steps)
            assert_within(b[part], a[part], bound, f"{split} {part}, streamed")
            assert_exceeds(scores["wrong"][split][part], a[part], bound,
                           f"{split} {part}, learning rate 1 % off")  # fmt: skip
    # Epoch train losses: the same answer to the same roundings, plus the loss's own rounding
    # (a CCC over 16 rows, in two orders).
    loss = {k: [h["train_loss"] for h in v] for k, v in hist.items()}
    bound = trajectory(max_diff(loss["nudged"], loss["memory"]), steps) + ccc(16)
    assert_within(loss["stream"], loss["memory"], bound, "epoch train losses, streamed")
    assert_exceeds(loss["wrong"], loss["memory"], bound, "train losses, learning rate 1 % off")


class Killed(RuntimeError):
    pass


@pytest.mark.slow  # three tiny train_runs: about 30 s (the parts: test_loaders, test_trainer)
def test_killed_streamed_training_resumes_mid_epoch_to_the_same_bits(tmp_path, monkeypatch):
    """train.checkpoint_steps=2: killed before step 4 of epoch 2 (saved after its step 2), the
    rerun restores the state, the loader's Grain iterator and the epoch's losses so far, runs
    the epoch's last 3 steps only and ends with the bits of a run never interrupted (without
    saves within epochs)."""
    import jax_ifmvse.train as train_mod
    from jax_ifmvse.config import load_config
    from jax_ifmvse.train import train_run

    store = _frame_store(tmp_path)
    common = [
        "model.common_dim=8", "model.hidden=8", "model.dropout=0.2", "model.pooling=attentive",
        "model.score_sets=[{name: S, kind: mlp, views: [a]}]", "train.multitask=true",
        "train.epochs=2", "train.batch_size=16", "train.learning_rate=1e-2",
        "train.test_splits=[Test1]", "loader.pad_frames=16", "loader.eval_batch=8",
        "loader.bucket_window=2",
    ]  # fmt: skip
    train_run(store, load_config(None, common), tmp_path / "full")

    calls = []
    real = train_mod.run_steps

    def counted(state, step, batches, within=None, on_step=None):
        def one(s, b):
            calls.append(int(s.step))
            if kill_at and len(calls) == kill_at:
                raise Killed  # the process dies before this step
            return step(s, b)

        return real(state, one, batches, within, on_step)

    monkeypatch.setattr(train_mod, "run_steps", counted)
    cfg = load_config(None, [*common, "train.checkpoint_steps=2"])
    kill_at = 9  # 5 steps per epoch (69 rows / 16): epoch 2's steps are calls 6 to 10
    with pytest.raises(Killed):
        train_run(store, cfg, tmp_path / "cut")
    model = tmp_path / "cut" / "S" / "multitask"
    assert (model / "checkpoints_in_epoch").is_dir()
    calls.clear()
    kill_at = 0
    train_run(store, cfg, tmp_path / "cut")
    assert calls == [7, 8, 9]  # the optimizer steps run after the resume: epoch 2's last three
    assert not any((model / "checkpoints_in_epoch").iterdir())  # done: nothing left within

    for split in ("Development", "Test1"):
        a = np.load(tmp_path / "full" / "scores" / f"{split}.npz")
        b = np.load(tmp_path / "cut" / "scores" / f"{split}.npz")
        assert np.isfinite(a["scores"]).sum() > 0
        np.testing.assert_array_equal(b["scores"], a["scores"])
    ha = [json.loads(x) for x in (tmp_path / "full" / "S" / "multitask" / "metrics.jsonl").open()]
    hb = [json.loads(x) for x in (model / "metrics.jsonl").open()]
    for h in (*ha, *hb):
        h.pop("seconds")
    assert hb == ha and [h["step"] for h in hb] == [5, 10]
