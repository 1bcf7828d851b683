"""The training core on toy problems (seconds): `fit` (resume, best selection, save every k),
the step's trainable mask, the optimizer's groups, the run directory's settings check."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import adamw_steps, assert_exceeds, assert_within

from jax_ifmvse.finetune.data import PlanIterator
from jax_ifmvse.parallel import data_mesh
from jax_ifmvse.trainer.checkpoints import saved_within_epoch
from jax_ifmvse.trainer.fit import fit, host_epoch
from jax_ifmvse.trainer.optim import make_optimizer
from jax_ifmvse.trainer.rundir import changed_settings, check_rerun, write_json
from jax_ifmvse.trainer.state import TrainState, make_step

# Development score after epoch e (1-based), written by hand: best at epoch 2, later ones lower.
SCORES = {1: 0.30, 2: 0.70, 3: 0.10, 4: 0.20, 5: 0.65}


class Killed(RuntimeError):
    pass


def _fit(directory, *, every=1, kill_after=None, seen=None):
    """Toy fit: an epoch adds 1 to w and 3 to the step; the score is SCORES[w]."""
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros((), jnp.float32)}, ())

    def train_epoch(state, epoch):
        new = TrainState(state.step + 3, {"w": state.params["w"] + 1.0}, ())
        return new, {"train_loss": float(10 - epoch)}

    def on_epoch(rec):
        if seen is not None:
            seen.append(rec["epoch"])
        if rec["epoch"] == kill_after:
            raise Killed

    return fit(
        state,
        directory=directory,
        epochs=5,
        train_epoch=train_epoch,
        evaluate=lambda params: {"dev_score": SCORES[int(params["w"])]},
        score_key="dev_score",
        sharding=NamedSharding(data_mesh(), P()),
        checkpoint_every=every,
        on_epoch=on_epoch,
    )


def _plain(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_fit_selects_the_best_epoch_and_restores_its_params(tmp_path):
    res = _fit(tmp_path / "run")
    assert res.best_epoch == 2 and float(res.best_params["w"]) == 2.0
    assert float(res.state.params["w"]) == 5.0 and int(res.state.step) == 15
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    assert [h["step"] for h in res.history] == [3, 6, 9, 12, 15]
    assert [h["dev_score"] for h in res.history] == [SCORES[e] for e in range(1, 6)]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert _plain(json.loads(x) for x in lines) == _plain(res.history)


def test_fit_resumes_from_the_last_save_of_every_k(tmp_path):
    """checkpoint_every=2: epoch 1 (improved) and 2 are saved, 3 is not; killed after epoch 3, the
    rerun restarts at epoch 3 and ends as an uninterrupted run."""
    full = _fit(tmp_path / "full", every=2)
    with pytest.raises(Killed):
        _fit(tmp_path / "cut", every=2, kill_after=3)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3
    seen = []
    resumed = _fit(tmp_path / "cut", every=2, seen=seen)
    assert seen == [3, 4, 5]
    assert _plain(resumed.history) == _plain(full.history)
    assert resumed.best_epoch == full.best_epoch == 2
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 5


def test_fit_resumes_after_the_last_epoch_saved(tmp_path):
    """checkpoint_every=1: killed after epoch 3 (saved), the rerun runs epochs 4 and 5 only."""
    with pytest.raises(Killed):
        _fit(tmp_path / "cut", kill_after=3)
    seen = []
    res = _fit(tmp_path / "cut", seen=seen)
    assert seen == [4, 5] and res.best_epoch == 2 and float(res.best_params["w"]) == 2.0


def test_host_epoch_means_the_losses_and_reports_each_step():
    calls = []

    def step(state, batch):
        return TrainState(state.step + 1, state.params, ()), {"loss": jnp.float32(batch)}

    run = host_epoch(step, lambda epoch: [1.0, 2.0, 6.0], lambda s, e, k: calls.append((e, k)))
    state, rec = run(TrainState(jnp.zeros((), jnp.int32), {}, ()), 7)
    assert int(state.step) == 3 and rec == {"train_loss": 3.0}
    assert calls == [(7, 0), (7, 1), (7, 2)]


def _host_fit(directory, *, every_steps, kill_at=None, decoded=None):
    """Toy host-fed fit (fine-tuning's `PlanIterator`): 3 epochs of 5 batches in an order drawn
    from the epoch; a step adds batch * 0.1 to w (float32), its loss is w after the step."""

    def batches(epoch):
        order = np.random.default_rng([7, epoch]).permutation(5).astype(np.float32)

        def make(start):
            for i in range(start, len(order)):
                if decoded is not None:
                    decoded.append((epoch, i))
                yield order[i]

        return PlanIterator(epoch, make)

    def step(state, batch):
        w = state.params["w"] + jnp.float32(batch) * jnp.float32(0.1)
        return TrainState(state.step + 1, {"w": w}, ()), {"loss": w}

    def on_step(state, epoch, k):
        if kill_at is not None and int(state.step) == kill_at:
            raise Killed

    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros((), jnp.float32)}, ())
    return fit(
        state,
        directory=directory,
        epochs=3,
        train_epoch=host_epoch(step, batches, on_step),
        evaluate=lambda params: {"dev_score": -abs(float(params["w"]) - 1.0)},
        score_key="dev_score",
        sharding=NamedSharding(data_mesh(), P()),
        checkpoint_every=3,
        checkpoint_steps=every_steps,
    )


@pytest.mark.parametrize(("kill_at", "first", "left"), [(9, (1, 2), 3 + 5), (3, (0, 2), 3 + 10)])
def test_host_fed_fit_resumes_within_the_epoch_to_the_same_bits(tmp_path, kill_at, first, left):
    """checkpoint_steps=2, epochs saved every 3 (and on improvement): killed after step 9 (epoch
    2's 4th batch, before its save; the last save within the epoch after step 7) or step 3
    (epoch 1, before any epoch was saved), the rerun decodes that epoch from its 3rd batch on
    (index 2) and ends with the weights and history of a run without saves within epochs."""
    full = _host_fit(tmp_path / "full", every_steps=0)
    with pytest.raises(Killed):
        _host_fit(tmp_path / "cut", every_steps=2, kill_at=kill_at)
    assert saved_within_epoch(tmp_path / "cut")  # what fine-tuning checks before its head init
    decoded = []
    res = _host_fit(tmp_path / "cut", every_steps=2, decoded=decoded)
    assert decoded[0] == first and len(decoded) == left  # the rest of that epoch, then the others
    assert int(res.state.step) == 15
    assert (
        np.asarray(res.state.params["w"]).tobytes() == np.asarray(full.state.params["w"]).tobytes()
    )
    assert _plain(res.history) == _plain(full.history)
    assert not saved_within_epoch(tmp_path / "cut")  # removed when the run ends


def test_step_mask_freezes_and_groups_get_their_rates():
    """A frozen leaf gets no update; the `head` group moves at its own rate (SGD-like first
    AdamW step: each moved leaf changes by exactly its learning rate)."""
    params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    labels = {"a": "frozen", "b": "train", "c": "head"}
    tx = make_optimizer(0.1, 0.0, labels=labels, group_learning_rates={"train": 0.1, "head": 0.01})
    step = make_step(
        lambda p, batch, rng: p["a"] + p["b"] + p["c"],
        lambda pred, batch: (jnp.sum(pred), {}),
        tx,
        jax.random.key(0),
        trainable={"a": False, "b": True, "c": True},
    )
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state, m = step(state, {})
    np.testing.assert_array_equal(state.params["a"], [1.0, 1.0])
    # 1 - lr g / (|g| + eps) in float32 vs exact, g = 1: one order's half of `adamw_steps`
    # (the float32 bias correction 1 - 0.999 alone errs by ~2000 u), + lr eps / |g| for eps.
    for leaf, lr in (("b", 0.1), ("c", 0.01)):
        bound = adamw_steps(lr, 0.0, np.ones((1, 2)), np.ones(2)) / 2 + lr * 1e-8
        assert_within(state.params[leaf], [1 - lr] * 2, bound, f"{leaf}: one step at lr {lr}")
    assert_exceeds(state.params["c"], [0.9, 0.9], bound, "c at the other group's rate")
    assert float(m["grad_norm"]) == 2.0  # (b, c) grads of 1; a's stopped: sqrt(4), exact


def test_accumulation_updates_every_k_calls():
    params = {"w": jnp.ones(())}
    tx = make_optimizer(0.1, 0.0, accumulation=2)
    step = make_step(
        lambda p, batch, rng: p["w"] * batch["x"],
        lambda pred, batch: (pred, {}),
        tx,
        jax.random.key(0),
    )
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state, _ = step(state, {"x": jnp.float32(1.0)})
    assert float(state.params["w"]) == 1.0  # accumulating
    state, _ = step(state, {"x": jnp.float32(3.0)})
    # Adam's first step: lr * sign (the mean gradient 2 over the two calls)
    bound = adamw_steps(0.1, 0.0, np.full((1, 1), 2.0), np.ones(1)) / 2 + 1e-9
    assert_within(float(state.params["w"]), 0.9, float(bound[0]), "accumulated Adam step")


def test_rerun_check_accepts_a_new_setting_at_its_default_and_refuses_a_change(tmp_path):
    default = {"config": {"lr": 0.1, "new": 5}}
    old = {"config": {"lr": 0.2}}  # recorded before `new` existed
    assert changed_settings(old, {"config": {"lr": 0.2, "new": 5}}, default) == []
    diff = changed_settings(old, {"config": {"lr": 0.3, "new": 5}}, default)
    assert diff == ["config.lr 0.2 -> 0.3"]
    path = tmp_path / "m.json"
    write_json(path, {"fingerprint": old})
    check_rerun(path, {"config": {"lr": 0.2, "new": 5}}, default, ValueError, key="fingerprint")
    with pytest.raises(ValueError, match="other settings.*config.new 5 -> 6"):
        check_rerun(path, {"config": {"lr": 0.2, "new": 6}}, default, ValueError, key="fingerprint")


def test_finetune_run_made_before_a_setting_existed_still_resumes():
    """A fine-tuning fingerprint recorded without a (since added) setting at its default is the
    same settings; the same fingerprint with that setting changed is not."""
    from jax_ifmvse.config import Config, load_config
    from jax_ifmvse.finetune.run import settings_fingerprint

    default = settings_fingerprint(Config())
    now = settings_fingerprint(load_config("finetune"))
    old = json.loads(json.dumps(now))
    added = "head_init_from_data"  # at its default in configs/finetune.yaml
    assert now["config"]["finetune"][added] == default["config"]["finetune"][added]
    del old["config"]["finetune"][added]  # a RUN/ from before that setting
    assert changed_settings(old, now, default) == []
    other = settings_fingerprint(load_config("finetune", ["train.seed=12345"]))
    assert changed_settings(old, other, default)[0].startswith("config.train.seed")


def test_one_reader_says_whether_a_run_is_finished(tmp_path):
    """`rundir.read_finished`: missing, unreadable and unfinished manifests give one RunError
    with one advice line; `inference.load_run` (trained heads) and `FinetunedModel` (a
    fine-tuned backbone) both use it."""
    from jax_ifmvse.errors import RunError
    from jax_ifmvse.finetune.predictor import FinetunedModel
    from jax_ifmvse.inference import load_run
    from jax_ifmvse.trainer.rundir import read_finished

    run = tmp_path / "RUN"
    run.mkdir()
    advice = f"run `ifmvse train --out {run}` with its config to make or finish it"
    with pytest.raises(RunError, match="manifest.json: not found") as e:
        read_finished(run, "manifest.json", "train")
    assert str(e.value).endswith(advice) and "\n" not in str(e.value)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match=r"manifest.json: unreadable \(JSONDecodeError\)"):
        read_finished(run, "manifest.json", "train")
    (run / "manifest.json").write_text(json.dumps({"complete": False}))
    for call in (lambda: read_finished(run, "manifest.json", "train"), lambda: load_run(run)):
        with pytest.raises(RunError, match="the run is not finished") as e:
            call()
        assert str(e.value).endswith(advice)
    (run / "manifest.json").write_text(json.dumps({"complete": True, "x": 1}))
    assert read_finished(run, "manifest.json", "train") == {"complete": True, "x": 1}

    ft = tmp_path / "FT"
    ft.mkdir()
    with pytest.raises(RunError, match="finetune.json: not found"):
        FinetunedModel(ft)
    (ft / "finetune.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(RunError, match="the run is not finished") as e:
        FinetunedModel(ft)
    assert str(e.value).endswith(
        f"run `ifmvse finetune --out {ft}` with its config to make or finish it"
    )
