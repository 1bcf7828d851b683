"""`ifmvse predict`: raw audio -> the same numbers as the batch path (extract, heads, ensemble)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_run import build_tiny_run
from tolerances import (
    U32,
    U64,
    assert_exceeds,
    assert_within,
    batch_path_bound,
    heads_rounding,
    two_orders,
)

from jax_ifmvse.cli import cli
from jax_ifmvse.config import ATTRIBUTES, load_config
from jax_ifmvse.ensemble.run import run_ensemble
from jax_ifmvse.predict import PredictError, open_predictor, predict_files


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """The session's tiny-Whisper run (2 s window, a derived middle-layer view, two score sets),
    copied and its ensemble removed: not yet ensembled (the first test checks predict refuses
    that; the next ensembles it again)."""
    root = tmp_path_factory.mktemp("predict")
    run = Path(shutil.copytree(tiny_run.run, root / "run"))
    shutil.rmtree(run / "ensemble")
    return root, tiny_run.audio, run, tiny_run.store


def test_predict_refuses_a_run_not_ensembled(trained):
    _, audio, run, _ = trained
    if (run / "ensemble").exists():
        pytest.skip("module order: the run was already ensembled")
    with pytest.raises(PredictError, match="not ensembled yet"):
        predict_files([audio / "u03.wav"], run)


def test_predict_equals_batch_path_and_reports_bad_files(trained, tmp_path):
    root, audio, run, store = trained
    run_ensemble(run, load_config(run / "config.yaml").ensemble)
    from featurestore import FeatureStore

    attrs = FeatureStore(store).backbones
    assert attrs["w"].attrs["whisper_window_s"] == 2.0
    assert attrs["w_mid"].attrs["derived_from"] == "w" and attrs["w_mid"].num_layers is None
    with open(run / "ensemble" / "Test1.csv") as f:  # unclipped; predict clips to 1..7
        batch = {
            r["FileName"]: np.clip([float(r[a]) for a in ATTRIBUTES], 1.0, 7.0)
            for r in csv.DictReader(f)
        }
    assert len(batch) == 4
    (tmp_path / "broken.wav").write_text("not audio")
    files = [audio / k for k in sorted(batch)] + [tmp_path / "broken.wav"]
    pred = open_predictor(run)
    seen = []  # the heads' inputs predict computed (measured for their magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    preds = [s.prediction for s in pred.predict_files(files)]
    assert [p.file for p in preds] == [str(f) for f in files]
    bound = batch_path_bound(run, score, seen[0])[:4]  # (N, 3)
    for p, k, b in zip(preds[:-1], sorted(batch), bound, strict=True):
        assert p.error is None and p.fallback == "" and np.isfinite(p.values).all()
        assert_within(p.values, batch[k], b, f"predict vs batch path {k}")
    # Another file's values are outside the bound: it can fail a real mix-up of rows.
    assert_exceeds(preds[1].values, batch[sorted(batch)[0]], bound[0], "another file")
    # The broken file: no values, its reason named, nothing stood in (no label mean by default).
    bad = preds[-1]
    assert bad.values is None and bad.failed and bad.fallback == ""
    assert bad.error.startswith("not audio or corrupt") and str(tmp_path) not in bad.error
    # Predictions differ between files, so the equality above is not a constant echoed back
    # (in some attribute: a 2-epoch toy model can have one attribute clipped to 1 for every file).
    assert np.ptp([p.values for p in preds[:-1]], axis=0).max() > 1e-4
    assert all(1.0 <= v <= 7.0 for p in preds[:-1] for v in p.values)

    # --fallback label-mean: the Train label mean, marked, and the error still named.
    (fb,) = predict_files([tmp_path / "broken.wav"], run, fallback="label-mean")
    mean = json.loads((run / "manifest.json").read_text())["train_label_mean"]
    with open(audio / "m.csv") as f:
        every = list(csv.DictReader(f))
    train = [r for r in every if r["split"] == "Train"]
    for a in ATTRIBUTES:
        # The store keeps labels as float32 (u32 |y| each); both means sum in float64.
        y = np.array([float(r[a]) for r in train])
        mean_bound = U32 * np.abs(y).max() + two_orders(len(y), np.abs(y).mean(), U64)
        assert_within(mean[a], y.mean(), mean_bound, f"Train label mean {a}")
        every_mean = np.mean([float(r[a]) for r in every])
        assert_exceeds(mean[a], every_mean, mean_bound, f"{a}: every split's mean")
    np.testing.assert_array_equal(fb.values, [mean[a] for a in ATTRIBUTES])  # 1..7: no clip
    assert fb.fallback == "Train label mean" and fb.failed and "not audio" in fb.error

    out = tmp_path / "pred.json"
    res = CliRunner().invoke(
        cli, ["predict", str(files[0]), str(tmp_path / "broken.wav"), "--run", str(run),
              "--out", str(out), "--fallback", "label-mean"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output  # a failed file, even with a stand-in
    assert f"Error: {tmp_path / 'broken.wav'}: not audio" in res.stderr
    assert "given the Train label mean" in res.stderr
    assert "1 of 2 file(s) scored, 1 failed" in res.stderr
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == [str(files[0]), str(tmp_path / "broken.wav")]
    assert [r["fallback"] for r in rows] == ["", "Train label mean"]
    assert rows[0]["error"] is None and "not audio" in rows[1]["error"]
    got = [rows[0][a] for a in ATTRIBUTES]
    assert_within(got, batch[sorted(batch)[0]], bound[0], "predict --out JSON vs batch path")


def test_predict_label_mean_fallback_without_train_label_mean(trained, tmp_path):
    """An older run (no Train label mean) asked for the fallback: a good file is still
    predicted; a broken one gets no values and a reason naming what the run lacks."""
    _, audio, run, _ = trained
    if not (run / "ensemble" / "weights.json").exists():
        run_ensemble(run, load_config(run / "config.yaml").ensemble)
    mpath = run / "manifest.json"
    saved = mpath.read_text()
    manifest = json.loads(saved)
    del manifest["train_label_mean"]
    (tmp_path / "broken.wav").write_text("not audio")
    try:
        mpath.write_text(json.dumps(manifest))
        good, bad = predict_files(
            [audio / "u03.wav", tmp_path / "broken.wav"], run, fallback="label-mean"
        )
    finally:
        mpath.write_text(saved)
    assert good.error is None and good.fallback == "" and np.isfinite(good.values).all()
    assert bad.values is None and bad.fallback == ""
    assert "not audio" in bad.error and "no train_label_mean" in bad.error
    assert "\n" not in bad.error


def test_fused_heads_equal_one_call_per_head(trained):
    """`load_heads(fused=True)` (one jitted call, what `Predictor` uses) scores as the batch path."""
    from jax_ifmvse.inference import load_heads

    _, _, run, _ = trained
    dims = json.loads((run / "manifest.json").read_text())["view_dims"]
    rng = np.random.default_rng(3)
    feats = {v: rng.standard_normal((5, d)).astype(np.float32) for v, d in dims.items()}
    want = load_heads(run)(feats)  # (K, N, 3)
    got = load_heads(run, fused=True)(feats)
    assert got.shape == want.shape and np.isfinite(want).all()
    bound = heads_rounding(load_heads(run), feats)  # one jitted call vs one per head
    assert_within(got, want, bound, "fused vs one call per head")
    assert_exceeds(got[:, ::-1], want, bound, "rows reversed")  # not a constant echoed back
    with pytest.raises(Exception, match="needed by its score sets"):
        load_heads(run, fused=True)({})
    # Zero rows: an empty (K, 0, 3) either way, not an error.
    none = {v: x[:0] for v, x in feats.items()}
    assert (
        load_heads(run)(none).shape
        == load_heads(run, fused=True)(none).shape
        == (want.shape[0], 0, 3)
    )


def test_predict_refuses_a_checkpoint_other_than_the_extracted_one(tmp_path):
    """The backbone folder's weights replaced after extraction: predict names the backbone, the
    source and both sha256 prefixes instead of scoring other weights' features."""
    import shutil

    from tiny_models import save_tiny_whisper

    from featurestore import FeatureStore

    # Its own run: the session's `tiny_run` is shared (other workers may read its checkpoint).
    pytest.importorskip("torch")
    (tmp_path / "own").mkdir()
    run, audio = build_tiny_run(tmp_path / "own", n=8)
    store = tmp_path / "own" / "store.h5"
    ckpt = tmp_path / "own" / "tinywhisper"
    want = str(FeatureStore(store).backbones["w"].attrs["sha256"])
    other = save_tiny_whisper(
        tmp_path / "other", seed=1, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32
    )
    shutil.copy(ckpt / "model.safetensors", tmp_path / "saved.safetensors")
    try:
        shutil.copy(other / "model.safetensors", ckpt / "model.safetensors")
        with pytest.raises(PredictError) as e:
            predict_files([audio / "u03.wav"], run)
    finally:
        shutil.copy(tmp_path / "saved.safetensors", ckpt / "model.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and "backbone 'w'" in msg and str(ckpt) in msg
    assert want[:12] in msg and "sha256" in msg
    got = msg.split("sha256 ")[1][:12]
    assert got != want[:12]
    (p,) = predict_files([audio / "u03.wav"], run)  # the restored checkpoint is accepted
    assert p.error is None


def test_predict_refuses_a_changed_waveform_normalisation():
    from jax_ifmvse.predictor import _check_same_checkpoint

    rec = {"source": "ckpt/", "sha256": "ab" * 32, "do_normalize": True}
    _check_same_checkpoint({"sha256": "ab" * 32, "do_normalize": True}, rec, "s.h5: backbone 'x'")
    with pytest.raises(PredictError, match=r"backbone 'x': source ckpt/ now has do_normalize=Fal"):
        _check_same_checkpoint({"sha256": "ab" * 32}, rec, "s.h5: backbone 'x'")
    _check_same_checkpoint({"sha256": "ab" * 32}, {"sha256": "ab" * 32}, "older store: no flag")
