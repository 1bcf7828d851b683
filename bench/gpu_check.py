"""One-call GPU check: extraction, head training and serving on one device, in ONE table.

    just gpu-wheels                    # here (needs PyPI): the wheels the GPU image lacks -> .whl/
    python3 bench/gpu_check.py         # on the GPU machine, .whl/ carried (< 8 min, H100/H200)
    python bench/gpu_check.py --smoke  # the same code at tiny shapes, on a CPU (< 2 min)

Started by a Python that cannot run the package (the GPU image: JAX with CUDA, Flax, Optax,
Orbax, h5py and PyTorch, but transformers 5, which has no Flax classes, and no soundfile or
soxr), it first makes a venv with `--system-site-packages` that also sees the starting Python's
own packages, installs the wheels of `.whl/` and this package into it with `--no-deps` (no index
is reached), and runs itself again there.

The table: for whisper-large-v3- and wavlm-large-shaped encoders (random weights, the real
shapes), in float32 and bfloat16, utterances/s and audio-seconds/s of our jitted extraction and
of transformers' PyTorch model on the same GPU and the same padded batches, with MFU against the
matmul peak measured in the same run (float32 rows: both sides may use TF32, JAX's default
precision); head training steps/s (`bench_train.py`'s code, ours against its PyTorch twin); and
the serve throughput bench (`bench_serve.py --quick`'s code: a tiny random run, so it measures
the server's batching and HTTP overhead, not the encoders). Sections are listed in `SECTIONS`:
a new one (fine-tuning step time) is one function and one line there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import site
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEEL_DIR = Path(os.environ.get("IFMVSE_GPU_WHEELS", ROOT / ".whl"))
VENV = Path(os.environ.get("IFMVSE_GPU_VENV", "/tmp/ifmvse-gpu-venv"))
INNER = "IFMVSE_GPU_CHECK_INNER"  # set in the re-executed child: never bootstrap twice

# What the GPU image lacks, or has in a version the package cannot use (`just gpu-wheels`).
GPU_WHEELS = (
    "transformers==4.57.6",  # the image's transformers 5 has no Flax classes (FlaxWhisper)
    "huggingface_hub==0.36.2",  # transformers 4.x refuses huggingface_hub >= 1.0 at import
    "tokenizers==0.22.2",  # ... and tokenizers > 0.23.0 (the image has 0.23.2)
    "soundfile==0.14.0",  # decoding audio (ships libsndfile)
    "cffi==2.1.1",  # soundfile's binding to libsndfile
    "pycparser==3.12",  # cffi's parser
    "soxr==1.1.0",  # resampling to 16 kHz
    "starlette==1.10.0",  # `ifmvse serve`
    "uvicorn==0.55.0",  # `ifmvse serve`
    "python-multipart==0.0.34",  # `ifmvse serve`: multipart uploads
)
WHEELS_MAX_MB = 40.0
GPU_PYTHON = "3.12"  # the GPU image's Python
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Wheels and the venv.


def download_wheels(dest: Path = WHEEL_DIR) -> float:
    """`pip download --no-deps` every GPU_WHEELS entry for the GPU image; returns total MB."""
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", GPU_PYTHON, "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *GPU_WHEELS], check=True)
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MB  {w.name}")
    print(f"{total:7.2f} MB  in {len(wheels)} wheels under {dest} (limit {WHEELS_MAX_MB:g} MB)")
    if len(wheels) != len(GPU_WHEELS) or total > WHEELS_MAX_MB:
        raise SystemExit(f"expected {len(GPU_WHEELS)} wheels under {WHEELS_MAX_MB:g} MB")
    return total


def _usable() -> bool:
    """This Python can run the package: transformers < 5 and the audio and serve packages."""
    need = ("jax", "flax", "optax", "h5py", "soundfile", "soxr", "starlette", "transformers")
    if any(importlib.util.find_spec(m) is None for m in need):
        return False
    from importlib.metadata import version

    return int(version("transformers").split(".")[0]) < 5


def bootstrap(argv: list[str]) -> None:
    """Make the venv (system packages visible), install .whl/ and the package, re-run there."""
    if os.environ.get(INNER) or (_usable() and not os.environ.get("IFMVSE_GPU_CHECK_VENV")):
        return  # (IFMVSE_GPU_CHECK_VENV=1 makes the venv anyway: how the bootstrap is tested)
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{WHEEL_DIR}: no wheels; run `just gpu-wheels` where PyPI is reachable")
    t0 = time.perf_counter()
    py = VENV / "bin" / "python"
    if not py.exists():
        # No pip of its own (and so no bundled old setuptools): the starting Python's pip and
        # setuptools are seen through the .pth below and install into the venv.
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                        str(VENV)], check=True)  # fmt: skip
    # A venv made from a venv sees the base interpreter's packages, not its parent's (the image's
    # Python is itself a venv): list the starting Python's site folders after the venv's own, so
    # the wheels installed here shadow the image's versions (transformers 5) and nothing else.
    lib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    parents = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    Path(lib, "_ifmvse_parent_site.pth").write_text("\n".join(parents) + "\n")
    # --ignore-installed: into the venv even where the image has the package (another version).
    pip = [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
           "--no-build-isolation", "--disable-pip-version-check", "--ignore-installed"]  # fmt: skip
    subprocess.run([*pip, *map(str, wheels)], check=True)
    if subprocess.run([*pip, str(ROOT)]).returncode != 0:  # no setuptools there: use the source
        Path(lib, "_ifmvse_source.pth").write_text(f"{ROOT}\n")
        print("note: package installed as a path (.pth), not built", file=sys.stderr)
    print(f"venv {VENV} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *argv], {**os.environ, INNER: "1"})


# ---------------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass
class Row:
    """One line of the table; `ref` is PyTorch unless the notes say otherwise (NaN: absent)."""

    section: str
    benchmark: str
    unit: str
    ours: float
    ref: float = math.nan
    ours_mfu: float = math.nan
    ref_mfu: float = math.nan
    notes: str = ""

    @property
    def ratio(self) -> float:
        """ours / reference (NaN when the reference is absent)."""
        return self.ours / self.ref if self.ref and math.isfinite(self.ref) else math.nan


@dataclasses.dataclass
class Ctx:
    """What every section needs: size, device and the measured matmul peaks."""

    smoke: bool
    gpu: bool
    torch: bool  # PyTorch importable (the reference side)
    torch_device: str = "cpu"
    peaks: dict[str, float] = dataclasses.field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        """The measured jitted (n, n) matmul FLOP/s in `dtype` (measured once, on first use)."""
        if dtype not in self.peaks:
            from common import matmul_peak

            self.peaks[dtype] = matmul_peak.__wrapped__(self.peak_n, dtype, 5)
        return self.peaks[dtype]

    @property
    def peak_n(self) -> int:
        """Matmul size of the peak: 8192 fills a GPU, 256 keeps the smoke run short."""
        return 256 if self.smoke else 8192


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{x:.1%}" if math.isfinite(x) else "-"


def markdown(rows: list[Row]) -> str:
    """The table as Markdown (what the docs page shows)."""
    out = ["| section | benchmark | unit | ours | reference | ours / ref | ours MFU | ref MFU"
           " | notes |", "|---|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r.section} | {r.benchmark} | {r.unit} | {_fmt(r.ours)} | {_fmt(r.ref)} |"
            f" {_fmt(r.ratio)}{'x' if math.isfinite(r.ratio) else ''} | {_pct(r.ours_mfu)} |"
            f" {_pct(r.ref_mfu)} | {r.notes} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Sections.


def peak_section(ctx: Ctx) -> list[Row]:
    """Measured matmul peaks (the MFU yardsticks), JAX and PyTorch on the same device."""
    n = ctx.peak_n
    rows = []
    for dt in ("float32", "bfloat16"):
        ref = _torch_matmul(n, dt, ctx.torch_device) if ctx.torch else math.nan
        note = "the MFU yardstick of the rows below"
        if ctx.gpu and dt == "float32":
            note += " (TF32 allowed on both sides)"
        rows.append(Row("peak", f"matmul {n}x{n}x{n} {dt}", "TFLOP/s", ctx.peak(dt) / 1e12,
                        ref / 1e12, notes=note))  # fmt: skip
    return rows


def _torch_matmul(n: int, dtype: str, device: str, reps: int = 5) -> float:
    import torch
    from common import torch_sync

    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b
    torch_sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        torch_sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _whisper_config(smoke: bool):
    from transformers import WhisperConfig

    shape = (dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                  num_mel_bins=80) if smoke else  # a tiny model, still the 30-s window
             dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                  encoder_ffn_dim=5120, num_mel_bins=128))  # openai/whisper-large-v3  # fmt: skip
    return WhisperConfig(**shape, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=8,
                         vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=3)  # fmt: skip


def whisper_flops(cfg, batch: int) -> float:
    """Analytic forward FLOPs of the encoder on its full window: convs, projections, attention,
    FFN (2 per multiply-add; norms, softmax, GELU left out)."""
    f, d, i, m = int(cfg.max_source_positions), cfg.d_model, cfg.encoder_ffn_dim, cfg.num_mel_bins
    convs = 2 * (2 * f) * 3 * m * d + 2 * f * 3 * d * d  # conv1 over 2F mel frames, conv2 stride 2
    per_layer = 8 * f * d * d + 4 * f * d * i + 4 * f * f * d  # qkvo, FFN, scores + values
    return float(batch * (convs + cfg.encoder_layers * per_layer))


def _random_params(module, example, seed: int = 0):
    """Random float32 parameters for a Flax module from its traced shapes (no torch, no init
    graph to compile): kernels ~ N(0, 1/fan_in), norms at identity, biases zero."""
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(seed), example))["params"]
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten_dict(shapes).items():
        if path[-1] == "kernel":
            v = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            v = np.ones(leaf.shape)
        elif path[-1] == "bias":
            v = np.zeros(leaf.shape)
        else:
            v = 0.02 * rng.standard_normal(leaf.shape)
        out[path] = v.astype(np.float32)
    return unflatten_dict(out)


def _whisper_side(ctx: Ctx, waves, lengths):
    """(config, params, ours(dtype) -> fn, torch(dtype) -> fn or None, flops) for Whisper."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_ifmvse.backbones.whisper import WhisperBackbone, convert_state_dict, frame_mask

    cfg = _whisper_config(ctx.smoke)
    enc = None
    if ctx.torch:
        import torch
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        torch.manual_seed(0)
        with torch.device(ctx.torch_device):  # draw on the device: seconds, not a minute
            enc = WhisperEncoder(cfg).eval()
        sd = {f"encoder.{k}": v.float().cpu().numpy() for k, v in enc.state_dict().items()}
        params = convert_state_dict(sd, cfg)
        del sd
    else:
        bb = WhisperBackbone(cfg, None, {})
        params = _random_params(bb.module, jnp.zeros((1, cfg.num_mel_bins, 3000)))
    frames = int(cfg.max_source_positions)
    n_valid = np.asarray(frame_mask(jnp.asarray(lengths), frames)).sum(1)  # (B,)
    feats = np.array(
        jax.jit(WhisperBackbone(cfg, params, {}).features)(jnp.asarray(waves))
    )  # writable

    def torch_fn(dtype: str):
        if enc is None:
            return None
        import torch

        e = enc.to(getattr(torch, dtype))
        x = torch.from_numpy(feats).to(ctx.torch_device, getattr(torch, dtype))  # (B, M, 3000)
        m = (torch.arange(frames)[None, :] < torch.from_numpy(n_valid)[:, None]).float()
        m = m[..., None].to(ctx.torch_device)  # (B, F, 1)

        def run():
            with torch.inference_mode():
                h = e(x).last_hidden_state.float()  # (B, F, D)
                return ((h * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu().numpy()

        return run

    def ours_fn(dtype: str):
        return WhisperBackbone(cfg, params, {}, jnp.dtype(dtype))

    note = "PyTorch: encoder on log-mel computed beforehand (mel excluded from its time)"
    model = "whisper (tiny)" if ctx.smoke else "whisper-large-v3"
    name = f"{model} {cfg.d_model}x{cfg.encoder_layers}"
    return name, ours_fn, torch_fn, whisper_flops(cfg, len(lengths)), note


def _wavlm_side(ctx: Ctx, waves, lengths):
    """The same for WavLM (bench_extract.py's models and PyTorch pooling)."""
    import jax
    import jax.numpy as jnp

    from jax_ifmvse.backbones.wavlm import WavLMBackbone

    if ctx.smoke:
        from transformers import WavLMConfig

        cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2),
                          conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4, num_buckets=16, max_bucket_distance=24,
                          feat_extract_norm="layer", do_stable_layer_norm=True)  # fmt: skip
    else:
        from bench_extract import wavlm_large_config

        cfg = wavlm_large_config(24)
    tm = None
    if ctx.torch:
        from bench_extract import build_models

        tm, bb, cfg = build_models(cfg, None, "float32", ctx.torch_device)
        params = bb.params
    else:
        params = WavLMBackbone.init_params(cfg, jax.random.key(0))

    def torch_fn(dtype: str):
        if tm is None:
            return None
        import torch
        from bench_extract import torch_pooled

        m = tm.to(getattr(torch, dtype))

        def run():
            with torch.inference_mode():
                return torch_pooled(m, cfg, waves, lengths)

        return run

    def ours_fn(dtype: str):
        return WavLMBackbone(cfg, params, {}, jnp.dtype(dtype))

    from bench_extract import wavlm_flops

    model = "wavlm (tiny)" if ctx.smoke else "wavlm-large"
    name = f"{model} {cfg.hidden_size}x{cfg.num_hidden_layers}"
    return name, ours_fn, torch_fn, wavlm_flops(cfg, *waves.shape), ""


def extract_section(ctx: Ctx) -> list[Row]:
    """Both encoders x float32/bfloat16: ours (jitted Extractor) vs PyTorch, same padded batch."""
    import numpy as np
    from common import best_interleaved

    from jax_ifmvse.encode import Extractor

    batch, lo, hi = (2, 0.5, 1.0) if ctx.smoke else (32, 6.0, 8.0)
    rng = np.random.default_rng(0)
    secs = rng.uniform(lo, hi, batch)
    lengths = (secs * 16000).astype(np.int32)
    waves = np.zeros((batch, int(hi * 16000)), np.float32)  # (B, T): one 8-s bucket
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.1 * rng.standard_normal(n)
    audio_s = float(lengths.sum()) / 16000
    reps = 1 if ctx.smoke else 3
    rows = []
    for side in (_whisper_side, _wavlm_side):
        name, ours_bb, torch_fn, flops, note = side(ctx, waves, lengths)
        outs = {}
        for dtype in ("float32", "bfloat16"):
            ex = Extractor(ours_bb(dtype), layers=None)
            ex.compile(*waves.shape)

            def ours(ex=ex):
                return np.asarray(ex(waves, lengths)[0])

            fns = [ours] + ([torch_fn(dtype)] if ctx.torch else [])
            for f in fns:  # untimed warm-up of each side (first-run buffers, kernel selection)
                f()
            times, results = best_interleaved(fns, reps)
            outs[dtype] = results
            t_ours = times[0]
            t_ref = times[1] if ctx.torch else math.nan
            peak = ctx.peak(dtype)
            notes = [f"compile {ex.compile_s:.0f} s (excluded)"] + ([note] if note else [])
            if dtype == "bfloat16":  # each side against its own float32 result
                scale = float(np.abs(outs["float32"][0]).max())
                errs = [float(np.abs(b - a).max()) / scale
                        for a, b in zip(outs["float32"], results, strict=True)]  # fmt: skip
                notes.append(
                    "bf16 vs own f32 (max, of scale): "
                    + ", ".join(
                        f"{s} {e:.1e}" for s, e in zip(("ours", "PyTorch"), errs, strict=False)
                    )
                )
            elif ctx.torch:
                d = float(np.abs(results[0] - results[1]).max())
                notes.append(f"max abs ours - PyTorch {d:.1e}")
            label = f"{name} {dtype}, batch {batch} x {lo:g}-{hi:g} s"
            if name.startswith("whisper"):  # every clip costs the whole window
                label += " (30-s window)"
            mfu = (flops / t_ours / peak, flops / t_ref / peak)
            rows.append(Row("extract", label, "utterances/s", batch / t_ours, batch / t_ref, *mfu,
                            "; ".join(notes)))  # fmt: skip
            rows.append(Row("extract", label, "audio-seconds/s", audio_s / t_ours, audio_s / t_ref,
                            *mfu))  # fmt: skip
            del ex
    return rows


def train_section(ctx: Ctx) -> list[Row]:
    """Head training steps/s: bench_train.py's jitted epoch vs its PyTorch twin (S1 MLP, S2
    fusion at the paper's widths; tiny widths in smoke)."""
    if not ctx.torch:
        raise RuntimeError("PyTorch absent: bench_train's twin needs it")
    import bench_train

    from jax_ifmvse.config import ModelConfig

    sets = bench_train.SCORE_SETS[:2]
    if ctx.smoke:
        dims, mc, steps, batch, reps = {"whisper": 24, "wavlm": 16}, ModelConfig(
            common_dim=16, hidden=8), 10, 8, 2  # fmt: skip
    else:
        dims, mc, steps, batch, reps = bench_train.VIEW_DIMS, None, 1000, 32, 3
    out = bench_train.bench_train(steps, batch, reps, sets, dims, mc, peak_n=ctx.peak_n)
    return [
        Row("train", f"{r['model']} {r['kind']} {r['views']}, batch {batch}, AdamW, 1 - CCC",
            "steps/s", r["ours_sps"] / batch, r["torch_sps"] / batch, r["ours_peak_fraction"],
            r["torch_flops"] / r["matmul_peak_flops"],
            f"{steps} steps a timing; AdamW alone {r['optimizer_share']:.0%} of our step")
        for r in out
    ]  # fmt: skip


def serve_section(ctx: Ctx) -> list[Row]:
    """`ifmvse serve` on a tiny random run at 1/4/16 clients vs one by one in process."""
    import bench_serve

    r = bench_serve.bench_serve(quick=True, n_clips=6 if ctx.smoke else 24,
                                time_limit_s=20.0 if ctx.smoke else 30.0)  # fmt: skip
    rows = [
        Row("serve", f"{lv['clients']} client{'s' if lv['clients'] > 1 else ''}, tiny random run",
            "clips/s", lv["clips_per_s"], lv["one_by_one_clips_per_s"], lv["peak_share"],
            lv["one_by_one_peak_share"],
            f"reference: one by one in process; p50 / p95 {lv['p50_ms']:.0f} / "
            f"{lv['p95_ms']:.0f} ms; 4xx {lv['n_4xx']}, 5xx {lv['n_5xx']}")
        for lv in r["levels"]
    ]  # fmt: skip
    rows.append(
        Row(
            "serve",
            f"idle latency, one {r['latency_clip_s']:.1f}-s clip",
            "ms (p50)",
            r["idle_p50_ms"],
            r["compute_ms"],
            notes=f"reference: in-process compute; warm-up {r['warmup_s']:.1f} s",
        )
    )
    return rows


def finetune_section(ctx: Ctx) -> list[Row]:
    """`finetune_step` (bfloat16 compute, float32 master weights, remat per layer, CNN frozen)
    on a wavlm-large-shaped model with random weights vs transformers' WavLMModel + the
    baseline's pooling and head under bfloat16 autocast with gradient checkpointing, same batch.

    MFU counts model FLOPs only: 3 x the analytic forward (`wavlm_flops`), the same for both
    sides, so remat's recomputation is not credited.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_extract import wavlm_flops, wavlm_large_config
    from bench_finetune import TOY, _batch
    from common import best_interleaved, compiled_flops
    from transformers import WavLMConfig

    from jax_ifmvse.backbones.wavlm import WavLMBackbone
    from jax_ifmvse.config import load_config
    from jax_ifmvse.finetune.model import frozen_labels, init_params, make_spec
    from jax_ifmvse.finetune.run import make_finetune_step, make_optimizer
    from jax_ifmvse.trainer.state import TrainState

    cfg_t = WavLMConfig(**TOY) if ctx.smoke else wavlm_large_config(24)
    batch, seconds, head, reps = (2, 1.0, 16, 1) if ctx.smoke else (4, 8.0, 1024, 3)
    bb = WavLMBackbone(cfg_t, WavLMBackbone.init_params(cfg_t, jax.random.key(0)), {})
    cfg = load_config("finetune", [
        f"finetune.head_hidden={head}", "finetune.head_dropout=0", "finetune.remat=true",
        "finetune.compute_dtype=bfloat16", "finetune.accumulation_steps=1",
        f"train.batch_size={batch}",
    ])  # fmt: skip
    spec = make_spec(bb, cfg)
    params = init_params(spec, bb.params, jax.random.key(1))
    del bb
    labels = frozen_labels(spec, params, True)
    tx = make_optimizer(cfg, labels)
    state = [TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params))]
    del params
    w, n, y = _batch(batch, int(seconds * 16000))
    b = {"waves": w, "lengths": n, "labels": y, "weights": np.ones(batch, np.float32)}
    b = jax.tree.map(jnp.asarray, b)
    t0 = time.perf_counter()
    step = make_finetune_step(spec, tx, labels, jax.random.key(2)).lower(state[0], b).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = compiled_flops(step)

    def ours():
        state[0], m = step(state[0], b)
        return float(jax.block_until_ready(m["loss"]))

    fns = [ours]
    if ctx.torch:
        fns.append(_torch_finetune_step(cfg_t, head, w, n, y, ctx.torch_device))
    for f in fns:  # untimed warm-up (first-run buffers, autotuning)
        f()
    times, losses = best_interleaved(fns, reps)
    t_ours = times[0]
    t_ref = times[1] if ctx.torch else math.nan
    flops = 3 * wavlm_flops(cfg_t, batch, w.shape[1])
    peak = ctx.peak("bfloat16")
    model = "wavlm (tiny)" if ctx.smoke else "wavlm-large"
    label = (f"{model} {cfg_t.hidden_size}x{cfg_t.num_hidden_layers} finetune_step bfloat16"
             f" remat, batch {batch} x {seconds:g} s")  # fmt: skip
    notes = [f"step ours {t_ours * 1e3:.0f} ms", f"compile {compile_s:.0f} s (excluded)",
             f"XLA counts {xla_flops / max(flops, 1):.2f}x model FLOPs (remat)"]  # fmt: skip
    if ctx.torch:
        notes.insert(1, f"PyTorch {t_ref * 1e3:.0f} ms (autocast bf16, checkpointing)")
    return [Row("finetune", label, "steps/s", 1 / t_ours, 1 / t_ref, flops / t_ours / peak,
                flops / t_ref / peak, "; ".join(notes))]  # fmt: skip


def _torch_finetune_step(cfg, head: int, w, n, y, device: str):
    """One PyTorch training step on the same batch: WavLMModel (CNN frozen, checkpointing) +
    the baseline's pooling and head, sum of 1 - CCC, AdamW; bfloat16 autocast."""
    import copy

    import numpy as np
    import torch
    from transformers import WavLMModel

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_finetune_twin import BaselineASP, BaselineRegression, baseline_ccc

    from jax_ifmvse.finetune.model import REGULARIZATION_RATES

    cfg = copy.deepcopy(cfg)  # train mode (for checkpointing) with no dropout, layerdrop or
    for k in REGULARIZATION_RATES:  # SpecAugment, as ours
        setattr(cfg, k, 0.0)
    torch.manual_seed(0)
    model = WavLMModel(cfg).to(device)
    model.freeze_feature_encoder()
    # Non-reentrant: the reentrant kind gives no gradients when the (frozen CNN) input has none.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pool = BaselineASP(cfg.hidden_size).to(device)
    reg = BaselineRegression(2 * cfg.hidden_size, head).to(device)
    params = [p for m in (model, pool, reg) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    wt, yt = torch.from_numpy(w).to(device), torch.from_numpy(y).to(device)
    am = torch.from_numpy((np.arange(w.shape[1])[None] < n[:, None]).astype(np.int64)).to(device)
    feat_lens = [int(x) for x in model._get_feat_extract_output_lengths(torch.from_numpy(n))]
    kind = "cuda" if device.startswith("cuda") else "cpu"

    def step():
        model.train()  # checkpointing runs only in train mode; dropouts are 0 below
        with torch.autocast(kind, dtype=torch.bfloat16):
            hidden = model(wt, attention_mask=am).last_hidden_state
            pred = reg(pool(hidden.float(), feat_lens))
        loss = torch.sum(1.0 - baseline_ccc(pred.float(), yt))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


@dataclasses.dataclass(frozen=True)
class Section:
    """A named part of the table: a function of the context returning its rows."""

    name: str
    run: Callable[[Ctx], list[Row]]


# The table, in order; a new section is one more line here.
SECTIONS: list[Section] = [
    Section("peak", peak_section),
    Section("extract", extract_section),
    Section("train", train_section),
    Section("finetune", finetune_section),
    Section("serve", serve_section),
]


def run_check(
    smoke: bool, only: tuple[str, ...] = (), budget_s: float = math.inf
) -> tuple[list[Row], dict]:
    """Every section (or `only` these) in order; a failing section becomes an ERROR row, and
    sections not started within `budget_s` seconds become SKIPPED rows."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave PyTorch its memory
    sys.path.insert(0, str(HERE))
    import jax
    from common import machine_info, on_gpu

    has_torch = importlib.util.find_spec("torch") is not None
    ctx = Ctx(smoke=smoke, gpu=on_gpu(), torch=has_torch)
    if has_torch:
        import torch
        from common import set_torch_threads, torch_device

        set_torch_threads()
        ctx.torch_device = torch_device()
        # JAX's default float32 matmul precision on GPUs uses TF32: let PyTorch too (fairness).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = machine_info() if has_torch else {"jax": jax.__version__, "torch": "absent"}
    info["device"] = str(jax.devices()[0].device_kind)
    rows: list[Row] = []
    took = {}
    start = time.perf_counter()
    for s in SECTIONS:
        if only and s.name not in only:
            continue
        if time.perf_counter() - start > budget_s:
            rows.append(
                Row(s.name, "SKIPPED", "", math.nan, notes=f"over the {budget_s:.0f}-s budget")
            )
            continue
        t0 = time.perf_counter()
        try:
            rows += s.run(ctx)
        except Exception as e:  # report it in the table and go on with the next section
            traceback.print_exc()
            rows.append(Row(s.name, "ERROR", "", math.nan, notes=f"{type(e).__name__}: {e}"[:300]))
        took[s.name] = time.perf_counter() - t0
        print(f"[{s.name}: {took[s.name]:.0f} s]", file=sys.stderr, flush=True)
    info["section_s"] = took
    return rows, info


def main() -> None:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, < 2 min)")
    ap.add_argument("--download-wheels", action="store_true", help="fill .whl/ (needs PyPI)")
    ap.add_argument("--only", nargs="*", default=(), help="run only these sections")
    ap.add_argument("--json", help="also write rows and machine info as JSON here")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no section after this many seconds (default 420: the whole check"
                    " must end within 8 minutes)")  # fmt: skip
    ap.add_argument("--out", help="folder for gpu_check.md and gpu_check.json")
    args = ap.parse_args()
    if args.download_wheels:
        download_wheels()
        return
    bootstrap(sys.argv[1:])
    t0 = time.perf_counter()
    rows, info = run_check(args.smoke, tuple(args.only), args.budget_s)
    info["total_s"] = time.perf_counter() - t0
    head = (f"GPU check{' (smoke)' if args.smoke else ''}: {info['device']}; JAX {info['jax']},"
            f" PyTorch {info['torch']}; {info['total_s']:.0f} s")  # fmt: skip
    table = markdown(rows)
    print(head + "\n\n" + table)
    data = {"info": info, "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]}
    paths = [Path(args.json)] if args.json else []
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.md").write_text(head + "\n\n" + table + "\n")
        paths.append(Path(args.out, "gpu_check.json"))
    for p in paths:
        p.write_text(json.dumps(data, indent=1, default=str))
    if any(r.benchmark in ("ERROR", "SKIPPED") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
