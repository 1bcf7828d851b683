"""`ifmvse finetune` on a tiny random WavLM: resume after SIGKILL, export, use, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_corpus import write_tone_corpus
from tiny_models import save_tiny_wavlm
from tolerances import (
    LAMBDA,
    U32,
    adam_first_update,
    assert_exceeds,
    assert_within,
    chain,
    encoder_ops,
    folded_linear,
    gamma,
    two_orders,
    written,
)

from jax_ifmvse.config import load_config
from jax_ifmvse.finetune.model import FinetuneError, encode
from jax_ifmvse.finetune.predictor import FinetunedModel
from jax_ifmvse.finetune.run import KILL_AT_STEP_ENV, finetune_run

# 12 Train rows, micro-batches of 2 (batch 4, accumulation 2): 6 micro-steps per epoch.
SETTINGS = [
    "train.epochs=3",
    "train.batch_size=4",
    "train.learning_rate=1e-3",
    "finetune.accumulation_steps=2",
    "finetune.head_hidden=16",
    "finetune.eval_batch=4",
    "audio.max_seconds=1.0",
    "audio.bucket_seconds=[1.0]",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    manifest = write_tone_corpus(root / "corpus")
    # A corrupt Train clip: skipped and listed, the run goes on.
    (root / "corpus" / "bad.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    with open(manifest, "a") as f:
        f.write("bad.wav,Train,4,4,4\n")
    ckpt = save_tiny_wavlm(root / "wavlm")
    return root, manifest, ckpt


def _cfg(root, manifest, *extra):
    ov = ["corpus.kind=manifest", f"corpus.path={manifest}", f"extract.cache_dir={root / 'cache'}"]
    return load_config("finetune", [*ov, *SETTINGS, *extra])


@pytest.fixture(scope="module")
def run(corpus):
    root, manifest, ckpt = corpus
    out = root / "run"
    finetune_run(_cfg(root, manifest), "w", str(ckpt), out)
    return out


def _cli(root, manifest, ckpt, out, env_extra=None, *extra):
    args = [sys.executable, "-m", "jax_ifmvse.cli", "finetune", "--manifest", str(manifest)]
    args += ["--backbone", f"w={ckpt}", "--out", str(out)]
    for s in [f"extract.cache_dir={root / 'cache'}", *SETTINGS, *extra]:
        args += ["--set", s]
    # One compile cache for both processes: the restarted run loads the killed run's programs.
    env = {**os.environ, "IFMVSE_COMPILE_CACHE": str(root / "xla"), **(env_extra or {})}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def _weights(out: Path) -> dict[str, np.ndarray]:
    return {**load_file(str(out / "hf" / "model.safetensors")),
            **load_file(str(out / "head.safetensors"))}  # fmt: skip


@pytest.mark.slow  # two `ifmvse finetune` subprocesses
@pytest.mark.parametrize("within", [(), ("train.checkpoint_steps=2",)], ids=["epochs", "steps"])
def test_sigkilled_run_resumes_to_the_same_weights(corpus, run, within):
    """Killed mid-accumulation in epoch 2 (micro-step 9), restarted: same weights and history.
    With checkpoint_steps=2 the restart continues epoch 2 from its save after micro-step 8
    (mid-accumulation: the accumulated gradient is in the saved optimizer state)."""
    root, manifest, ckpt = corpus
    out = root / f"killed{len(within)}"
    first = _cli(root, manifest, ckpt, out, {KILL_AT_STEP_ENV: "9"}, *within)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (out / "hf").exists()
    assert (out / "checkpoints_in_epoch").is_dir() == bool(within)
    second = _cli(root, manifest, ckpt, out, None, *within)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Development" in second.stdout
    want, got = _weights(run), _weights(out)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in ref]
    assert [h["step"] for h in hist] == [6, 12, 18]


def test_training_moved_the_encoder_not_the_frozen_cnn(corpus, run):
    root, _, ckpt = corpus
    src, ft = load_file(str(ckpt / "model.safetensors")), _weights(run)
    cnn = [k for k in ft if k.startswith("feature_extractor.")]
    enc = [k for k in ft if k.startswith("encoder.layers.") and k in src]
    assert cnn and enc
    for k in cnn:
        np.testing.assert_array_equal(ft[k], src[k], err_msg=k)
    assert max(np.abs(ft[k] - src[k]).max() for k in enc) > 1e-4
    manifest = json.loads((run / "finetune.json").read_text())
    assert manifest["complete"] and manifest["best"]["epoch"] in (1, 2, 3)
    assert set(manifest["ccc"]) == {"Development", "Test1"}
    assert (run / "curves.png").stat().st_size > 0


def test_corrupt_clip_is_skipped_and_listed(run):
    lines = (run / "skipped.csv").read_text().splitlines()
    assert len(lines) == 2 and "bad.wav" in lines[1]
    assert json.loads((run / "finetune.json").read_text())["skipped"] == 1


def test_export_loads_in_pytorch_with_our_hidden_states(run):
    """RUN/hf/ in transformers (AutoModel) == the Flax model with the best checkpoint's weights."""
    import torch
    from transformers import AutoModel

    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.trainer.checkpoints import checkpoint_manager

    hf = run / "hf"
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (hf / f).is_file()
    model, info = AutoModel.from_pretrained(str(hf), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    bb = load_backbone(str(hf), cache_dir=run / "cache")
    # The exported weights are the best epoch's, exactly.
    mngr = checkpoint_manager(run / "checkpoints")
    raw = mngr.restore(mngr.best_step())["state"]["params"]["backbone"]
    mngr.close()
    # Every leaf is stored as is, but the positional conv's, written as torch's weight norm
    # (g = ||w|| in float32, v = w) and read back as g v / ||v||: three float32 roundings (g,
    # g v, the quotient).
    for a, b in zip(jax.tree.leaves(bb.params), jax.tree.leaves(raw), strict=True):
        b = np.asarray(b)
        assert_within(np.asarray(a), b, gamma(4) * np.abs(b), "exported weights")
    # The time-masking embedding (trained: the tiny WavLM masks with its config's 0.05) is
    # exported, so transformers loads it finite and equal instead of uninitialised.
    emb = model.masked_spec_embed.detach().numpy()
    assert np.isfinite(emb).all()
    np.testing.assert_array_equal(emb, np.asarray(raw["masked_spec_embed"]))

    rng = np.random.default_rng(0)
    lengths = np.asarray([8000, 5000])
    x = (0.3 * rng.standard_normal((2, 8000))).astype(np.float32)
    x[1, 5000:] = 0
    hidden, mask = jax.jit(bb.hidden_states)(bb.params, jnp.asarray(x), jnp.asarray(lengths))
    # The tiny WavLM has a group-norm CNN: transformers normalises over the padding, ours over
    # the valid samples, so each utterance is compared with transformers run on it alone.
    for b, n in enumerate(lengths):
        with torch.no_grad():
            ref = model.eval()(torch.from_numpy(x[b : b + 1, :n]), output_hidden_states=True)
        for i, h in enumerate(ref.hidden_states):
            f = h.shape[1]
            assert np.asarray(mask)[b].sum() == f
            # Ours vs PyTorch through the tiny WavLM (7 convs, projection, the positional conv's
            # 128 taps x 8 channels = 1024 the longest dot product) up to hidden state i.
            want = h[0].numpy()
            bound = chain(encoder_ops(i, front=9), 1024, np.abs(want).max())
            assert_within(hidden[i, b, :f], want, bound, f"utterance {b}, hidden state {i}")


def test_head_weights_load_into_the_baseline_modules(run):
    import torch
    from test_finetune_twin import BaselineASP, BaselineRegression

    sd = load_file(str(run / "head.safetensors"))
    info = json.loads((run / "head.json").read_text())
    d = info["input_dim"] // 2
    pool, head = BaselineASP(d), BaselineRegression(2 * d, info["hidden"])
    strip = {p: {k[len(p) + 1 :]: torch.from_numpy(v) for k, v in sd.items() if k.startswith(p)}
             for p in ("pool", "ser")}  # fmt: skip
    pool.load_state_dict(strip["pool"], strict=True)
    head.load_state_dict(strip["ser"], strict=True)


def test_finetuned_model_scores_files_like_the_run(corpus, run):
    """FinetunedModel (predict / serve entry point) reproduces RUN/predictions/Test1.csv."""
    root, manifest, _ = corpus
    import csv

    with open(run / "predictions" / "Test1.csv") as f:
        rows = list(csv.DictReader(f))
    files = [root / "corpus" / r["file"] for r in rows] + [root / "corpus" / "bad.wav"]
    model = FinetunedModel(run)
    pred, errors = model.predict_files(files)
    want = np.asarray([[float(r[a]) for a in ("arousal", "valence", "dominance")] for r in rows])
    want = np.clip(want, 1, 7)
    assert errors[:-1] == [None] * len(rows)
    # The run scored Test1 in its own batches; predict_files batches these files (and a broken
    # one) otherwise: the tiny WavLM's two orders on its last hidden state h (`chain`, front 9
    # as the exported-WavLM comparison: lambda sigma per element), carried by the pool and
    # head's derivatives g_j = d y / d h_j (reverse mode on each clip alone: a magnitude), the
    # elements' errors summed as independent roundings (Hoeffding, as in
    # `frames_batch_path_bound`: lambda sigma sqrt(sum_j g_j^2)), + the pool and head's own
    # roundings (lambda sqrt(k) u sqrt(2 x 8) sum_j |g_j| |h_j|: pool projection, softmax sum,
    # mean, std, fc1, LayerNorm, fc2, the 1..7 scale), x 6 to the 1..7 scale, + the CSV's 6
    # decimals (`written(6, 7)`).
    scale = 6.0 if model.normalize_labels else 1.0  # from_unit
    layers = json.loads((run / "hf" / "config.json").read_text())["num_hidden_layers"]
    spec, params = model.spec, model.params
    bound = np.zeros(want.shape)
    for i, f in enumerate(files[:-1]):
        w = model.loader(f)
        h, mask = encode(spec, params["backbone"], jnp.asarray(w)[None], jnp.asarray([len(w)]))

        def head(h, mask=mask):
            pooled = spec.pool.apply({"params": params["pool"]}, h, mask)
            return spec.head.apply({"params": params["head"]}, pooled, train=False)[0]  # (3,)

        h = jnp.asarray(h, jnp.float32)
        _, vjp = jax.vjp(head, h)
        x = np.abs(np.asarray(h, np.float64))
        delta = chain(encoder_ops(layers, front=9), 1024, float(x.max()))
        k = max(2 * x.shape[-1], x.shape[1])  # fc1 takes mean and std; the mean sums F frames
        for a in range(3):
            g = np.abs(np.asarray(vjp(jnp.zeros(3).at[a].set(1.0))[0], np.float64))
            rounding = LAMBDA * np.sqrt(k) * U32 * np.sqrt(2 * 8) * (g * x).sum()
            bound[i, a] = scale * (np.sqrt((g * g).sum()) * delta + rounding) + written(6, 7)
    for p, wt, b, r in zip(pred[:-1], want, bound, rows, strict=True):
        assert_within(p, wt, b, f"finetuned predict_files vs predictions/Test1.csv {r['file']}")
    far = int(np.argmax(np.abs(want - want[0]).max(1)))  # the row scored least like the first
    assert_exceeds(pred[far], want[0], bound[0], "another file")
    assert np.isnan(pred[-1]).all() and "bad.wav" in errors[-1]


def test_extract_fills_a_view_from_run_hf(corpus, run, tmp_path):
    """`ifmvse extract --backbone ft=RUN/hf` works like any checkpoint."""
    root, manifest, _ = corpus
    from featurestore import FeatureStore

    r = subprocess.run(
        [sys.executable, "-m", "jax_ifmvse.cli", "extract", "--manifest", str(manifest),
         "--backbone", f"ft={run / 'hf'}", "--out", str(tmp_path / "s.h5"),
         "--set", f"extract.cache_dir={root / 'cache'}", "--max-seconds", "1"],
        env={**os.environ, "IFMVSE_COMPILE_CACHE": "off"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    store = FeatureStore(tmp_path / "s.h5")
    assert store.backbones["ft"].dim == 32
    assert int(np.sum(store.filled("ft"))) == 20 and int(np.sum(store.failed("ft"))) == 1


def test_resume_with_other_settings_is_refused(corpus, run):
    root, manifest, ckpt = corpus
    with pytest.raises(FinetuneError, match="other settings") as e:
        finetune_run(_cfg(root, manifest, "train.learning_rate=1e-4"), "w", str(ckpt), run)
    assert "\n" not in str(e.value) and "finetune.json" in str(e.value)


def test_backbone_family_that_cannot_be_finetuned(corpus, tmp_path):
    root, manifest, _ = corpus
    bad = tmp_path / "w2v"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(FinetuneError, match="cannot be fine-tuned"):
        finetune_run(_cfg(root, manifest), "w", str(bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corpus_without_development_labels(corpus, tmp_path):
    root, manifest, ckpt = corpus
    lines = manifest.read_text().splitlines()
    unlabeled = [lines[0]] + [
        ",".join(line.split(",")[:2] + ["", "", ""]) if ",Development," in line else line
        for line in lines[1:]
    ]
    m2 = root / "corpus" / "nodev.csv"
    m2.write_text("\n".join(unlabeled) + "\n")
    with pytest.raises(FinetuneError, match="Development.*fewer than 2 labelled"):
        finetune_run(_cfg(root, m2), "w", str(ckpt), tmp_path / "out")
    nodev = [line for line in lines if ",Development," not in line]
    m3 = root / "corpus" / "nodev2.csv"
    m3.write_text("\n".join(nodev) + "\n")
    with pytest.raises(FinetuneError, match="no rows in split 'Development'"):
        finetune_run(_cfg(root, m3), "w", str(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_finetuned_predictor_has_the_predictor_interface(corpus, run):
    """What `predict` / `serve` call: warm_up, predict_files -> Scored, info."""
    from jax_ifmvse.finetune.predictor import FinetunedPredictor
    from jax_ifmvse.inference import is_finetune_run

    root, _, _ = corpus
    assert is_finetune_run(run) and not is_finetune_run(root)
    p = FinetunedPredictor(run, max_clips=4)
    assert p.warm_up() > 0 and p.ready
    good, bad = root / "corpus" / "u03.wav", root / "corpus" / "bad.wav"
    a, b = p.predict_files([good, bad])
    assert a.prediction.error is None and a.prediction.fallback == ""
    assert all(1 <= v <= 7 for v in a.prediction.values)
    # Never an invented score: the bad file has no values unless the label mean is asked for.
    assert b.prediction.values is None and b.prediction.fallback == ""
    assert "bad.wav" in b.prediction.error and b.duration_s is None
    assert p.info()["kind"] == "finetune" and p.info()["programs"]["w"]
    mean = json.loads((run / "finetune.json").read_text())["train_label_mean"]
    p.fallback = "label-mean"
    _, b2 = p.predict_files([good, bad])
    assert b2.prediction.fallback == "Train label mean"
    assert b2.prediction.values == tuple(mean[k] for k in ("arousal", "valence", "dominance"))


def test_predict_command_scores_a_finetuned_run(corpus, run, tmp_path):
    """`ifmvse predict --run RUN` on a fine-tuned run: the good file scored, the bad one an error."""
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli

    root, _, _ = corpus
    good, bad = root / "corpus" / "u03.wav", root / "corpus" / "bad.wav"
    out = tmp_path / "p.json"
    res = CliRunner().invoke(
        cli, ["predict", str(good), str(bad), "--run", str(run), "--out", str(out)]
    )
    assert res.exit_code == 1, res.output  # a file failed
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == [str(good), str(bad)]
    assert rows[0]["error"] is None and all(
        1 <= rows[0][a] <= 7 for a in ("arousal", "valence", "dominance")
    )
    assert rows[1]["arousal"] is None and "bad.wav" in rows[1]["error"]


@pytest.mark.slow  # a subprocess with 2 host devices compiling 4 programs: about 45 s
def test_data_parallel_over_two_devices_equals_one():
    """The batch sharded over a 2-device `data` mesh: same loss, gradient and AdamW update as on
    one device, within bounds derived from float32 rounding (the two reduce in other orders)."""
    here = Path(__file__).parent
    r = subprocess.run(
        [sys.executable, str(here / "finetune_dp_job.py")], capture_output=True, text=True,
        timeout=1800, cwd=here, env={**os.environ, "IFMVSE_COMPILE_CACHE": "off"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.split("RESULT")[1])
    one, two = res["one"], res["two"]
    # Every loss and gradient element is a float32 sum over at most n = 4 rows x 199 frames
    # (0.25 s through the CNN's stride 20): two orders differ by <= 2 gamma_n of the scale.
    n = 4 * 199
    for k in ("adamw_loss", "adamw_grad_norm", "probe_loss"):
        for a, b in zip(one[k], two[k], strict=True):
            assert_within(b, a, two_orders(n, abs(a)), k)
    g1, g2 = (list(map(np.asarray, x["mean_grad"])) for x in (one, two))
    scale = max(np.abs(g).max() for g in g1)  # the largest gradient element
    dg = [np.abs(a - b) for a, b in zip(g1, g2, strict=True)]
    bound = two_orders(n, scale)  # ~1.8e-4 here
    for a, b in zip(g1, g2, strict=True):
        assert_within(b, a, bound, "mean gradient")
    assert_exceeds(np.concatenate(g2) * 2, np.concatenate(g1), bound, "a gradient not averaged")
    # AdamW's first update: its eps conditioning on each gradient element's difference (a
    # gradient that is rounding noise, e.g. a bias before a softmax, becomes +-lr dg / eps).
    before = list(map(np.asarray, res["before"]))
    moved = 0.0
    for p1, p2, p0, g, d in zip(*(map(np.asarray, x["params"]) for x in (one, two)), before,
                                g1, dg, strict=True):  # fmt: skip
        assert_within(p2, p1, adam_first_update(1e-3, 1e-8, g, d, p0), "AdamW update")
        moved = max(moved, float(np.abs(p1 - p0).max()))
    assert moved > 1e-4  # the update happened (about lr per trained parameter)


def test_head_init_from_data_equals_standardized_inputs():
    """The folded first Linear on raw pooled vectors == the original on standardized ones."""
    from jax_ifmvse.finetune.model import standardize_head_input
    from jax_ifmvse.heads.regression import EmotionRegression

    rng = np.random.default_rng(0)
    x = (50 + rng.normal(size=(64, 10)) * rng.uniform(0.01, 2, 10)).astype(np.float32)
    head = EmotionRegression(hidden=8, dropout=0.0)
    p = head.init(jax.random.key(0), jnp.zeros((1, 10)), train=False)["params"]
    folded = standardize_head_input({"head": p}, x.astype(np.float64))["head"]
    z = (x - x.mean(0)) / x.std(0)
    want = head.apply({"params": p}, jnp.asarray(z), train=False)
    got = head.apply({"params": folded}, jnp.asarray(x), train=False)
    # The first Linear: `folded_linear`, with the test's float32 mean (64 terms) and std (its
    # variance's 64 squares + the mean's error squared) off the fold's float64 ones.
    x64 = x.astype(np.float64)
    m, s = x64.mean(0), x64.std(0)
    assert (s > 1e-3 * s.max()).all()  # the fold's floor on the std is not in play
    dm = gamma(65) * np.abs(x64).mean(0)
    ds = (dm**2 + gamma(70) * (s**2 + dm**2)) / (2 * s) + U32 * s
    fc = p["fc_0_0"]
    e_h = folded_linear(fc["weight"], fc["bias"], x, m, s, dm, ds)  # (B, H)
    # Then LayerNorm over H, to first order by its Jacobian (I - 1/H - y y^T / H) / sigma in
    # absolute value + its own roundings (gamma_{2H+6} (2 + |y|)); ReLU does not enlarge it;
    # the output Linear carries it by |W2| + its own two orders.
    h = z.astype(np.float64) @ np.asarray(fc["weight"], np.float64).T + np.asarray(fc["bias"])
    sigma = h.std(1, keepdims=True)
    y = (h - h.mean(1, keepdims=True)) / sigma
    ln = p["fc_0_1"]
    scale, shift = np.asarray(ln["scale"]), np.asarray(ln["bias"])
    n_h = h.shape[1]
    jac = (np.eye(n_h)[None] - 1 / n_h - y[:, :, None] * y[:, None, :] / n_h) / sigma[:, :, None]
    e_y = np.einsum("bij,bj->bi", np.abs(jac), e_h) + gamma(2 * n_h + 6) * (2 + np.abs(y))
    e_y = np.abs(scale) * e_y
    w2, b2 = np.asarray(p["out_0"]["weight"]), np.asarray(p["out_0"]["bias"])
    a = np.maximum(y * scale + shift, 0)
    bound = e_y @ np.abs(w2).T + two_orders(9, 1.0) * (a @ np.abs(w2).T + np.abs(b2))
    assert_within(got, want, bound, "folded head vs head on standardized inputs")
    # The fold's std floor 100 x too high (0.1 x the largest std) falls outside; a fold with
    # the sample std (ddof 1, 0.8 % off) would not: this bound is a worst case, ~400 x above
    # what is measured, as the folded layer sums terms up to |x| / s = 5000 times its inputs'.
    w1 = np.asarray(fc["weight"], np.float64) / np.maximum(s, 0.1 * s.max())[None]
    bad = {**p, "fc_0_0": {"weight": jnp.asarray(w1), "bias": jnp.asarray(fc["bias"] - w1 @ m)}}
    wrong = head.apply({"params": bad}, jnp.asarray(x), train=False)
    assert_exceeds(wrong, want, bound, "std floor 0.1 x the largest")


def test_whisper_export_with_its_window_loads_in_transformers(tmp_path):
    """A 0.5-s-window Whisper encoder exported: transformers (model + feature extractor from
    RUN/hf) and `load_backbone(RUN/hf)` give the same hidden states."""
    import torch
    from test_finetune_twin import Twin
    from transformers import AutoFeatureExtractor, AutoModel

    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.finetune.export import export_hf

    tw = Twin("whisper")
    export_hf(tw.spec, jax.device_get(tw.params["backbone"]), tmp_path / "hf")
    bb = load_backbone(str(tmp_path / "hf"), cache_dir=tmp_path / "cache")
    assert bb.input_seconds == 0.5 and bb.window_samples == 8000
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal((2, 8000))).astype(np.float32)
    hidden, _ = jax.jit(bb.hidden_states)(bb.params, jnp.asarray(x), jnp.asarray([8000, 8000]))
    fe = AutoFeatureExtractor.from_pretrained(str(tmp_path / "hf"))
    feats = fe(list(x), sampling_rate=16000, return_tensors="pt").input_features
    assert feats.shape[-1] == 50  # the window's mel frames, not 3000
    model = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ref = model.encoder(feats, output_hidden_states=True).hidden_states
    for i, h in enumerate(ref):  # conv1's 80 mels x 3 taps = 240, the longest dot product
        bound = chain(encoder_ops(i, front=3), 240, np.abs(h.numpy()).max())
        assert_within(hidden[i], h.numpy(), bound, f"hidden state {i}")
    assert_exceeds(hidden[1], ref[2].numpy(), bound, "the next hidden state")


def test_pool_init_from_data_equals_standardized_frames():
    """The folded `sap_linear` on raw frames == the original on standardized frames."""
    from jax_ifmvse.finetune.model import standardize_pool_input
    from jax_ifmvse.heads.pooling import AttentiveStatisticsPooling

    rng = np.random.default_rng(0)
    x = (30 + rng.normal(size=(2, 7, 6)) * rng.uniform(0.1, 3, 6)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mean, std = x.reshape(-1, 6).mean(0), x.reshape(-1, 6).std(0)
    pool = AttentiveStatisticsPooling()
    p = pool.init(jax.random.key(0), jnp.zeros((1, 2, 6)), jnp.ones((1, 2), bool))["params"]
    folded = standardize_pool_input({"pool": p}, mean.astype(np.float64), std.astype(np.float64))
    h_raw = folded["pool"]["sap_linear"]["weight"] @ x[0, 0] + folded["pool"]["sap_linear"]["bias"]
    z = (x[0, 0] - mean) / std
    h_std = p["sap_linear"]["weight"] @ z + p["sap_linear"]["bias"]
    # The test's float32 mean and std are the fold's (in float64): dm = ds = 0.
    sap = p["sap_linear"]
    bound = folded_linear(sap["weight"], sap["bias"], x[0, :1], mean, std)[0]  # (D,)
    assert_within(h_raw, h_std, bound, "folded sap_linear vs sap_linear on standardized")
    wrong = folded["pool"]["sap_linear"]["weight"] @ (x[0, 1])
    wrong = wrong + folded["pool"]["sap_linear"]["bias"]
    assert_exceeds(wrong, h_std, bound, "another frame")
    att = p["attention"] / np.sqrt(6)  # the same division: one float32 rounding either way
    assert_within(folded["pool"]["attention"], att, U32 * np.abs(att), "attention / sqrt(D)")
    out = pool.apply({"params": folded["pool"]}, jnp.asarray(x), jnp.asarray(mask))
    assert out.shape == (2, 12) and np.isfinite(np.asarray(out)).all()


def test_restart_reads_train_stats_back_and_decodes_no_train_file_first(
    corpus, run, tmp_path, monkeypatch
):
    """`audio.normalize: train`: RUN/normalize_stats.json from the first start (the corrupt Train
    clip listed), read back by a restart: no statistics pass, and before the restart's first
    step only the first micro-batches' Train clips are decoded."""
    import shutil

    import jax_ifmvse.data.audio as audio
    import jax_ifmvse.encode as encode

    root, manifest, ckpt = corpus
    stored = json.loads((run / "normalize_stats.json").read_text())
    assert [f["path"] for f in stored["failures"]] == [str(root / "corpus" / "bad.wav")]
    assert json.loads((run / "finetune.json").read_text())["normalize_stats_failures"] == 1
    out = tmp_path / "again"
    shutil.copytree(run, out)
    steps = sorted(int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit())
    for s in steps[1:]:  # back to the earliest kept epoch: the restart trains again
        shutil.rmtree(out / "checkpoints" / str(s))
    train = {str(root / "corpus" / r.split(",")[0]) for r in manifest.read_text().splitlines()
             if ",Train," in r}  # fmt: skip

    def no_pass(*a, **k):
        raise AssertionError("a restart must not recompute the Train statistics")

    decoded, at_first_step = [], []
    real = audio.load_audio

    def counting(path, *a, **k):
        decoded.append(str(path))
        return real(path, *a, **k)

    def progress(e):
        if e["kind"] == "step" and not at_first_step:
            at_first_step.append(sum(p in train for p in decoded))

    monkeypatch.setattr(audio, "compute_train_stats", no_pass)
    monkeypatch.setattr(audio, "load_audio", counting)
    monkeypatch.setattr(encode, "load_audio", counting)  # the Loader's own name for it
    finetune_run(_cfg(root, manifest), "w", str(ckpt), out, progress=progress)
    got = json.loads((out / "finetune.json").read_text())
    assert got["normalize_stats"] == [stored["mean"], stored["std"]]
    assert got["normalize_stats_computed"] is False
    if steps[0] < 3:  # a step ran: at most the feed's read-ahead (4 micro-batches of 2 rows)
        assert at_first_step and 0 < at_first_step[0] <= 8 < len(train)
