"""Training: synthetic-store accuracy, RUN/ contract, 1 vs 4 devices, resume after interruption."""

import json
import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
    U32,
    U64,
    U_F16,
    adam_first_update,
    assert_exceeds,
    assert_within,
    ccc,
    ccc_perturbed,
    head_gain,
    heads_rounding,
    max_diff,
    nudge,
    trajectory,
    two_orders,
)
from toy_store import write_toy_store

from jax_ifmvse.config import ATTRIBUTES, TrainConfig, load_config

N_TRAIN, N_DEV, N_TEST = 384, 96, 32


def make_store(path: Path, seed: int = 0) -> None:
    """A store whose labels are tanh of a linear projection of view `a`; `b` mixes `a` + noise."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_DEV + N_TEST
    a = rng.normal(size=(n, 16)).astype(np.float32)
    b = np.concatenate([a @ rng.normal(size=(16, 16)) / 4, rng.normal(size=(n, 8))], 1)
    y = (4 + 2.5 * np.tanh(a @ rng.normal(size=(16, 3)) / 4)).astype(np.float32)
    y[N_TRAIN + N_DEV :, 2] = np.nan  # a test split without dominance labels
    splits = ["Train"] * N_TRAIN + ["Development"] * N_DEV + ["Test1"] * N_TEST
    write_toy_store(path, splits, y, {"a": a, "b": b})


SETS = "[{name: S1, kind: mlp, views: [a]}, {name: S2, kind: fusion, views: [a, b]}]"


def small_cfg(*extra):
    return load_config(
        "configs/paper.yaml" if Path("configs/paper.yaml").exists() else None,
        [
            "model.common_dim=16",
            "model.hidden=32",
            "model.dropout=0.1",
            f"model.score_sets={SETS}",
            "train.learning_rate=1e-2",
            "train.attributes=[arousal]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp("store") / "store.h5"
    make_store(p)
    return p


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)


def test_training_reaches_dev_ccc_and_writes_run_contract(store, tmp_path):
    from jax_ifmvse.inference import load_heads
    from jax_ifmvse.train import train_run

    cfg = small_cfg("train.epochs=10")
    run = tmp_path / "RUN"
    seen = []
    manifest = train_run(store, cfg, run, progress=seen.append)
    assert len(seen) == 2 * 10 and seen[-1]["model"] == "S2/arousal"
    for s in ("S1", "S2"):
        assert manifest["best"][s]["arousal"]["dev_ccc"] >= 0.9, manifest["best"]
        d = run / s / "arousal"
        for f in ("metrics.jsonl", "curves.png", "scatter.png"):
            assert (d / f).stat().st_size > 0
        assert len((d / "metrics.jsonl").read_text().splitlines()) == 10
        assert (d / "checkpoints").is_dir()

    on_disk = json.loads((run / "manifest.json").read_text())
    for key in (
        "store",
        "store_ids_sha256",
        "config",
        "attributes",
        "score_sets",
        "created",
        "version",
        "best",
    ):
        assert key in on_disk
    assert on_disk["store"] == str(store.absolute()) and on_disk["attributes"] == ["arousal"]
    assert (run / "config.yaml").exists()
    assert load_config(run / "config.yaml") == cfg

    dev = np.load(run / "scores" / "Development.npz")
    test = np.load(run / "scores" / "Test1.npz")
    assert dev["scores"].shape == (2, N_DEV, 3) and test["scores"].shape == (2, N_TEST, 3)
    assert dev["scores"].dtype == np.float32 and list(dev["score_sets"]) == ["S1", "S2"]
    assert list(dev["attributes"]) == list(ATTRIBUTES) and dev["ids"][0] == f"utt{N_TRAIN:04d}"
    # Only arousal was trained: the other two columns are NaN; arousal is on the 1..7 scale.
    assert np.isfinite(dev["scores"][:, :, 0]).all() and np.isnan(dev["scores"][:, :, 1:]).all()
    assert 1.5 < np.mean(dev["scores"][:, :, 0]) < 6.5
    assert np.isnan(test["labels"][:, 2]).all() and np.isfinite(dev["labels"]).all()
    from featurestore import FeatureStore
    from jax_ifmvse.metrics import ccc_np

    # The saved heads on the store's Development features vs training's stored scores: the same
    # maths in another batch (`heads_rounding`), then stored as float32 (u32 |score|).
    split = FeatureStore(store).load("Development", ["a", "b"])
    scorer = load_heads(run)
    got, want = scorer(split.features), dev["scores"]  # (K, N, 3)
    assert np.isnan(got[:, :, 1:]).all()  # untrained attributes: NaN on both sides
    f = {k: x.astype(np.float32) for k, x in split.features.items()}
    bound = heads_rounding(lambda x: scorer(x)[:, :, :1], f) + U32 * np.abs(want[:, :, :1])
    assert_within(got[:, :, :1], want[:, :, :1], bound, "saved heads vs stored dev scores")
    assert_exceeds(got[:, ::-1, :1], want[:, :, :1], bound, "rows reversed")
    # The best epoch's dev CCC (from training's float32 predictions, ccc_np in float64) vs
    # ccc_np of the stored scores: the scores within the same bound, `ccc_perturbed`, plus
    # float64's two orders.
    best = manifest["best"]["S2"]["arousal"]["dev_ccc"]
    y, p = dev["labels"][:, 0], dev["scores"][1, :, 0]
    cbound = ccc_perturbed(y, p, 0.0, float(bound[1].max())) + ccc(N_DEV, u=U64)
    assert_within(ccc_np(y, p), best, cbound, "stored dev scores' CCC vs the manifest's")
    assert_exceeds(ccc_np(y, dev["scores"][0, :, 0]), best, cbound, "the other set's CCC")
    from jax_ifmvse.train import TrainError

    with pytest.raises(TrainError, match=r"\['b'\] are needed"):
        scorer({"a": split.features["a"]})


def test_multitask_run_fills_all_three_attributes(store, tmp_path):
    from jax_ifmvse.train import train_run

    cfg = small_cfg(
        "train.epochs=2",
        "train.multitask=true",
        "model.score_sets=[{name: S1, kind: mlp, views: [a]}]",
    )
    m = train_run(store, cfg, tmp_path / "RUN")
    assert m["targets"] == ["multitask"] and set(m["best"]["S1"]) == set(ATTRIBUTES)
    dev = np.load(tmp_path / "RUN" / "scores" / "Development.npz")
    assert dev["scores"].shape == (1, N_DEV, 3) and np.isfinite(dev["scores"]).all()
    assert (tmp_path / "RUN" / "S1" / "multitask" / "checkpoints").is_dir()
    # Run again with the same config: nothing left to train, same scores.
    events = []
    again = train_run(store, cfg, tmp_path / "RUN", progress=events.append)
    assert events == [] and again["best"] == m["best"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "RUN" / "scores" / "Development.npz")["scores"], dev["scores"]
    )
    # A second call with another config into the same RUN/ refuses rather than mixing runs.
    from jax_ifmvse.train import TrainError

    with pytest.raises(TrainError, match="another store or config"):
        train_run(store, small_cfg("train.epochs=3"), tmp_path / "RUN")


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(160, 16)).astype(np.float32)
    x2 = rng.normal(size=(160, 24)).astype(np.float32)
    y = (4 + 2 * np.tanh(x1[:, :1] + x2[:, :1])).astype(np.float32)
    tr = ({"a": x1[:128], "b": x2[:128]}, y[:128])
    dv = ({"a": x1[128:], "b": x2[128:]}, y[128:])
    return tr, dv


def _fusion():
    from jax_ifmvse.heads import FusionModel

    return FusionModel(views=("a", "b"), dim=16, hidden=16, dropout=0.5, n_outputs=1)


def _train(out_dir, epochs, on_epoch=None, checkpoint_every=1, learning_rate=3e-3):
    """Train the small fusion model on in-memory arrays with every device of this process."""
    import jax

    from jax_ifmvse.train import train_model

    tr, dv = _arrays()
    cfg = TrainConfig(
        batch_size=32,
        learning_rate=learning_rate,
        epochs=epochs,
        seed=3,
        checkpoint_every=checkpoint_every,
    )
    res = train_model(_fusion(), tr, dv, cfg, out_dir, targets=["arousal"], on_epoch=on_epoch)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(res.params)])
    return {
        "devices": jax.device_count(),
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in res.history],
        "best_epoch": res.best_epoch,
        "params": flat.tolist(),
    }


def test_the_epoch_compiles_once_per_run(tmp_path, caplog):
    """`train_model` compiles its epoch once: the state it threads keeps its sharding (a state
    placed on one device comes back replicated on the mesh, and epoch 2 would compile again)."""
    import jax

    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles():
        _train(tmp_path / "run", epochs=2)
    compiles = [r.getMessage() for r in caplog.records if "Compiling jit(" in r.getMessage()]
    assert sum(m.startswith("Compiling jit(train_epoch)") for m in compiles) == 1, compiles


def test_interrupted_run_resumes_to_identical_metrics(tmp_path):
    full = _train(tmp_path / "full", epochs=6)

    class Killed(RuntimeError):
        pass

    def die_after_3(rec):
        if rec["epoch"] == 3:
            raise Killed

    with pytest.raises(Killed):
        _train(tmp_path / "cut", epochs=6, on_epoch=die_after_3)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    resumed_epochs = []
    resumed = _train(
        tmp_path / "cut", epochs=6, on_epoch=lambda r: resumed_epochs.append(r["epoch"])
    )
    assert resumed_epochs == [4, 5, 6]  # training continued, it did not start over
    assert resumed["history"] == full["history"]
    assert resumed["best_epoch"] == full["best_epoch"]
    np.testing.assert_array_equal(resumed["params"], full["params"])
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 6
    kept = sorted(
        int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert kept == sorted({6, full["best_epoch"]})  # latest + best only


def test_sparse_checkpoints_resume_to_identical_metrics(tmp_path):
    """checkpoint_every=4: a resume recomputes the epochs since the last save, identically."""
    full = _train(tmp_path / "full", epochs=6)

    def die_after_3(rec):
        if rec["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", epochs=6, on_epoch=die_after_3, checkpoint_every=4)
    saved = [int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()]
    best3 = max(full["history"][:3], key=lambda h: h["dev_ccc"])["epoch"]
    assert saved == [best3]  # only new bests were saved before epoch 4
    seen = []
    resumed = _train(tmp_path / "cut", 6, lambda r: seen.append(r["epoch"]), checkpoint_every=4)
    assert seen == list(range(best3 + 1, 7))
    assert resumed["history"] == full["history"] and resumed["best_epoch"] == full["best_epoch"]
    np.testing.assert_array_equal(resumed["params"], full["params"])


def test_sigkilled_run_resumes_to_identical_metrics(tmp_path):
    import signal
    import time

    full = _train(tmp_path / "full", epochs=8)
    # The child compiles the same programs as this process: it loads them from the session's
    # compile cache (conftest.py puts its folder in the environment).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cut = tmp_path / "cut"
    child = subprocess.Popen(
        [sys.executable, __file__, str(cut), str(tmp_path / "x.json"), "8"], env=env
    )
    try:
        deadline = time.monotonic() + 90
        log = cut / "metrics.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.monotonic() < deadline, "the child made no progress"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)  # wherever it is: training, saving or logging
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "x.json").exists()
    resumed = _train(cut, epochs=8)
    assert resumed["history"] == full["history"]
    np.testing.assert_array_equal(resumed["params"], full["params"])


def _first_step():
    """`_train`'s step on its first 32 rows over every device of this process: loss, gradient
    norm, the gradient (read from `MultiSteps(sgd, every_k=2)`, which never applies it), the
    parameters before and after the AdamW update, and (one device only) each gradient element's
    magnitude: the sum over rows of the sizes of the rows' contributions."""
    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_ifmvse.heads.specs import to_train_scale
    from jax_ifmvse.objective import ccc_mean_loss
    from jax_ifmvse.parallel import data_mesh
    from jax_ifmvse.train import make_optimizer, make_train_step
    from jax_ifmvse.trainer.state import init_state

    def flat(tree):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).tolist()

    (x, y), _ = _arrays()
    mesh = data_mesh()
    rows = NamedSharding(mesh, P("data"))
    feats = {k: v[:32] for k, v in x.items()}
    labels = to_train_scale(y[:32], True).astype(np.float32)
    batch = {"features": feats, "labels": labels, "weights": np.ones(32, np.float32)}
    model, key = _fusion(), jax.random.key(1)
    adamw = make_optimizer(TrainConfig(learning_rate=3e-3))
    out = {}
    for name, tx in (("adamw", adamw), ("probe", optax.MultiSteps(optax.sgd(1.0), 2))):
        state = jax.jit(partial(init_state, model, tx), out_shardings=NamedSharding(mesh, P()))(
            {k: v[:1] for k, v in x.items()}, jax.random.key(0)
        )
        params = state.params
        state, m = jax.jit(make_train_step(model, tx, key, rows))(
            state, jax.device_put(batch, rows)
        )
        out[f"{name}_loss"], out[f"{name}_grad_norm"] = float(m["loss"]), float(m["grad_norm"])
        if name == "adamw":
            out["before"], out["params"] = flat(params), flat(state.params)
        else:
            out["grad"] = flat(state.opt_state.acc_grads)
    if jax.device_count() == 1:  # the gradient is a sum over rows of vjp(row's cotangent)
        rng = jax.random.fold_in(key, 0)

        @jax.jit  # one compilation instead of ~120 op by op (15 s of this test on 2 cores)
        def magnitude(params, batch):
            def apply(p):
                return model.apply({"params": p}, batch["features"], train=True,
                                   rngs={"dropout": rng})  # fmt: skip

            pred, vjp = jax.vjp(apply, params)
            cot = jax.grad(lambda q: ccc_mean_loss(q, batch)[0])(pred)  # (32, 1)
            rows = jnp.arange(32)
            per_row = jax.vmap(lambda r: vjp(cot * (rows == r)[:, None])[0])(rows)
            return jax.tree.map(lambda g: jnp.abs(g).sum(0), per_row)

        out["magnitude"] = flat(magnitude(params, batch))
    return out


def test_one_and_four_devices_agree(tmp_path, monkeypatch):
    """The batch sharded over 4 devices: the same first step as on one device within bounds
    derived from float32 rounding (tests/tolerances.py); then 3 epochs (12 Adam steps), where no
    a-priori bound holds (after its first update Adam reacts to the gradients' relative error
    instead of damping it by eps), within `tolerances.trajectory`: the 1-device run once more
    from its initial parameters moved one ulp at random (`nudge`), its spread x lambda x the
    steps. A learning rate 1 % off must land outside it."""
    import jax_ifmvse.train as train_mod

    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    out = tmp_path / "four.json"
    child = subprocess.Popen(  # the 4-device run alongside this process's 1-device runs
        [sys.executable, __file__, str(tmp_path / "four"), str(out), "3", "first_step"], env=env
    )
    try:  # runs after the resume test on purpose: the 1-device half then hits the compile cache
        one, step1 = _train(tmp_path / "one", epochs=3), _first_step()
        wrong = _train(tmp_path / "wrong", epochs=3, learning_rate=3e-3 * 1.01)
        real_init = train_mod.init_state

        def nudged_init(model, tx, example, key):
            params = nudge(real_init(model, tx, example, key).params)
            state = real_init(model, tx, example, key)
            return state.replace(params=params, opt_state=tx.init(params))

        monkeypatch.setattr(train_mod, "init_state", nudged_init)
        nudged = _train(tmp_path / "nudged", epochs=3)
        assert child.wait(timeout=180) == 0
    finally:
        child.kill()  # a no-op once it has exited
    four = json.loads(out.read_text())
    step4 = four.pop("first_step")
    assert one["devices"] == 1 and four["devices"] == 4
    # The gradient: a sum over the 32 rows in another order (per device, then across).
    g1, g4 = (np.asarray(s["grad"]) for s in (step1, step4))
    bound = two_orders(32, np.asarray(step1["magnitude"]))
    assert_within(g4, g1, bound, "gradient")
    assert_exceeds(g4 / 4, g1, bound, "a gradient not averaged over the 4 devices")
    for k in ("adamw_grad_norm", "probe_grad_norm"):
        assert_within(step4[k], step1[k], two_orders(32, np.linalg.norm(bound) + step1[k]), k)
    # AdamW's first update: its conditioning on each gradient element's difference.
    p1, p4, p0 = (np.asarray(x) for x in (step1["params"], step4["params"], step1["before"]))
    update = adam_first_update(3e-3, 1e-8, g1, np.abs(g4 - g1), p0)
    assert_within(p4, p1, update, "first AdamW update")
    assert np.abs(p1 - p0).max() > 1e-3  # the update happened (about lr per parameter)
    # Three epochs of 4 steps: the trajectory's answer to nudged initial parameters.
    steps = one["history"][-1]["step"]
    assert steps == 12 and [h["step"] for h in one["history"]] == [
        h["step"] for h in four["history"]
    ]
    bound = trajectory(max_diff(nudged["params"], one["params"]), steps)
    assert_within(four["params"], one["params"], bound, "parameters after 3 epochs")
    assert_exceeds(wrong["params"], one["params"], bound, "parameters, learning rate 1 % off")
    # Epoch losses: the same answer to the same roundings, plus the CCC's own rounding over 32
    # rows in two orders.
    loss = {k: [h["train_loss"] for h in r["history"]] for k, r in
            (("one", one), ("four", four), ("nudged", nudged), ("wrong", wrong))}  # fmt: skip
    bound = trajectory(max_diff(loss["nudged"], loss["one"]), steps) + ccc(32)
    assert_within(loss["four"], loss["one"], bound, "epoch train losses")
    assert_exceeds(loss["wrong"], loss["one"], bound, "epoch train losses, learning rate 1 % off")
    assert_exceeds(4 * loss["four"][0], loss["one"][0], bound, "a loss summed over the devices")
    assert one["best_epoch"] == four["best_epoch"]


if __name__ == "__main__":  # child process of the 4-device and SIGKILL tests
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    res = _train(Path(sys.argv[1]), epochs=epochs)
    if sys.argv[4:] == ["first_step"]:
        res["first_step"] = _first_step()
    Path(sys.argv[2]).write_text(json.dumps(res))


def test_offset_view_is_standardized_with_train_statistics(tmp_path):
    """A view with a huge common offset and tiny spread still trains (the demo's S5 failure).

    Without standardization (model.standardize=false) this run stays at dev CCC ~0.
    """
    from featurestore import FeatureStore, StoreWriter, finalize
    from jax_ifmvse.data.views import load_stats
    from jax_ifmvse.train import train_run

    path = tmp_path / "store.h5"
    make_store(path)
    s = FeatureStore(path)
    a = s.load(None, ["a"]).features["a"]
    with StoreWriter(path, "c", dim=a.shape[1]) as w:
        w.write(np.arange(s.n), 50.0 + 0.01 * a)  # offset 50, spread 0.01
    finalize(path)
    cfg = small_cfg("train.epochs=10", "model.score_sets=[{name: S1, kind: mlp, views: [c]}]")
    manifest = train_run(path, cfg, tmp_path / "RUN")
    assert manifest["best"]["S1"]["arousal"]["dev_ccc"] >= 0.9
    stats = load_stats(tmp_path / "RUN" / "view_stats.npz")
    train_c = FeatureStore(path).load("Train", ["c"]).features["c"].astype(np.float64)
    mean = train_c.mean(0)
    scale = np.sqrt(train_c.var(0).mean())  # one scale for the view, not one per dimension
    # Both sum in float64 (two orders of n terms), the stats then rounded to float32 (as
    # test_torch_twin::test_standardisation_equals_reference): the variance s2 / n - mean^2
    # errs by the float64 sums' error at |x|^2 = 2500, relative to a variance of 1e-4.
    n = len(train_c)
    mean64 = two_orders(n, np.abs(train_c).mean(0), U64)  # the float64 mean, before rounding
    mean_bound = mean64 + U32 * np.abs(mean)
    var_err = (two_orders(n, (train_c**2).mean(0), U64) + 2 * np.abs(mean) * mean64).mean()
    spread_bound = scale * (var_err / (2 * scale**2) + 2 * U32)  # the sqrt halves; rounded
    assert_within(stats["c"][0], mean, mean_bound, "offset view: mean")
    assert_within(stats["c"][1], np.full(train_c.shape[1], scale), spread_bound, "offset: spread")
    assert_exceeds(train_c[1:].mean(0), mean, mean_bound, "offset view: one row left out")
    ddof1 = np.sqrt(train_c.var(0, ddof=1).mean())
    assert_exceeds(ddof1, scale, spread_bound, "offset view: ddof 1 spread")


def test_layered_view_trains_float16_with_missing_rows_and_labels(tmp_path):
    """A fusion of a pooled and a layered float16 view (layer_weights): Train rows missing the
    layered view or a label are left out, Development rows missing it score NaN, and the rows
    that are trained on stay aligned with their labels (dev CCC as with pooled views)."""
    from featurestore import FeatureStore, StoreWriter, finalize
    from jax_ifmvse.inference import load_heads
    from jax_ifmvse.metrics import ccc_np
    from jax_ifmvse.train import train_run

    rng = np.random.default_rng(3)
    n = N_TRAIN + N_DEV + N_TEST
    a = rng.normal(size=(n, 16)).astype(np.float32)
    y = (4 + 2.5 * np.tanh(a @ rng.normal(size=(16, 3)) / 4)).astype(np.float32)
    y[5, 0] = np.nan  # one unlabelled Train row: trained on a device-side subset
    splits = ["Train"] * N_TRAIN + ["Development"] * N_DEV + ["Test1"] * N_TEST
    path = tmp_path / "store.h5"
    write_toy_store(path, splits, y, {"a": a})
    # Layer k = a * (k + 1) / 3 plus noise; rows 7 (Train) and 2 Development rows are not stored.
    layers = (a[:, None, :] * (np.arange(3)[None, :, None] + 1) / 3).astype(np.float16)
    layers += rng.normal(scale=0.1, size=layers.shape).astype(np.float16)  # (N, 3, 16)
    missing = [7, N_TRAIN + 1, N_TRAIN + 10]
    rows = np.setdiff1d(np.arange(n), missing)
    with StoreWriter(path, "L", dim=16, num_layers=3, dtype="float16") as w:
        w.write(rows, layers[rows, -1], layers[rows])
    finalize(path)

    cfg = small_cfg(
        "train.epochs=10",
        "model.layer_weights=true",
        "model.score_sets=[{name: F, kind: fusion, views: [a, L]}]",
    )
    manifest = train_run(path, cfg, tmp_path / "RUN")
    assert manifest["view_layers"] == {"L": 3}
    dev = np.load(tmp_path / "RUN" / "scores" / "Development.npz")
    score = dev["scores"][0, :, 0]  # (N_DEV,)
    gone = np.isin(np.arange(N_TRAIN, N_TRAIN + N_DEV), missing)
    assert np.isnan(score[gone]).all() and np.isfinite(score[~gone]).all()
    best = manifest["best"]["F"]["arousal"]["dev_ccc"]
    assert best >= 0.85, best
    # The saved heads score the store's float32 features as training's float16 copy did: the
    # copy rounds x (u_f16 |x|) and the standardized (x - m) / s (u_f16 |x - m| in x's units),
    # carried by the heads' measured gain (first order: Σ_j |∂y/∂x_j| 2 u_f16 (|x_j| + |m_j|),
    # + 2^-25 twice below float16's normal range),
    # + the heads' own roundings in another batch (`heads_rounding`) and the float32 store.
    s = FeatureStore(path)
    feats = {
        "a": s.load("Development", ["a", "L"]).features["a"],
        "L": s.load("Development", ["L"], layers=True).features["L"],  # the same rows
    }
    feats = {v: x.astype(np.float32) for v, x in feats.items()}
    heads = load_heads(tmp_path / "RUN")
    first = lambda f: heads(f)[:1, :, :1]  # noqa: E731 (1, N, 1): the set's arousal
    stats = np.load(tmp_path / "RUN" / "view_stats.npz")
    f16 = sum(
        2 * U_F16 * (terms + gain * float(np.abs(stats[f"{v}/mean"]).max())) + gain * 2.0**-24
        for v, (gain, terms) in head_gain(first, feats).items()
    )
    rounding = heads_rounding(first, feats) + U32 * np.abs(score[~gone])[None, :, None]
    bound = (f16 + rounding)[0, :, 0]
    got = heads(feats)[0, :, 0]
    assert_within(got, score[~gone], bound, "layered view: float32 store vs float16 copy")
    assert_exceeds(got[::-1], score[~gone], bound, "layered view: rows reversed")
    # The best epoch's dev CCC vs ccc_np of the stored scores (as the pooled run's test).
    y, p = dev["labels"][~gone, 0], score[~gone]
    cbound = ccc_perturbed(y, p, 0.0, float(rounding.max())) + ccc(len(y), u=U64)
    assert_within(ccc_np(y, p), best, cbound, "layered view: stored scores' CCC vs manifest's")
    assert_exceeds(ccc_np(y, np.roll(p, 1)), best, cbound, "layered view: rows shifted")
