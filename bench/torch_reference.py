"""A plain PyTorch implementation of our score-set heads and of their training, as paper code would be.

    python bench/torch_reference.py --store runs/demo/store.h5 --config demo --seeds 0 1 2
    python bench/torch_reference.py --store runs/demo/store.h5 --init flax   # Flax's draws instead
    python bench/torch_reference.py --store S --ours RUN0 RUN1 RUN2          # + our runs beside it

It is the yardstick of issue 17: written the way PyTorch code is written by default, and with
nothing taken from our JAX code but the feature store's reader (numpy + h5py) and the numpy CCC:
- modules and parameter names mirror `jax_ifmvse.heads` (`view1.proj`, `gate.W1p`,
  `mlp.path0.fc1`, ...), so our Flax parameters load by name (`load_flax_params`);
- `torch.nn.Linear`'s own initialisation (or `flax_init_`: Flax's LeCun-normal and zero biases);
- views centred by the Train mean per dimension and divided by one spread per view (the square
  root of the mean per-dimension variance), computed here again in numpy, before the model;
- labels trained on (y - 1) / 6; loss 1 - CCC over each batch (population variances);
- `DataLoader(shuffle=True)` with its default `drop_last=False`, `torch.optim.AdamW` with its
  defaults (betas 0.9/0.999, eps 1e-8, decoupled weight decay on every parameter), no schedule,
  no clipping, `nn.Dropout` (inverted: kept units scaled by 1 / (1 - p));
- after every epoch the CCC over the whole Development split; the best epoch's weights score the
  test split, one model per score set and attribute.
`tests/test_torch_twin.py` trains it against ours step by step and seed by seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jax_ifmvse.config import ATTRIBUTES, Config, ModelConfig, ScoreSetConfig  # noqa: E402
from jax_ifmvse.metrics import ccc_np  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Modules: names mirror our Flax heads.


class TorchMLPPath(nn.Module):
    """Linear fc1 -> ReLU -> Dropout -> Linear fc2."""

    def __init__(self, dim: int, hidden: int, dropout: float, n_outputs: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_outputs)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class TorchMLPHead(nn.Module):
    """`branches` MLP paths (`path0`, ...) whose outputs are averaged, as `MLPHead`."""

    def __init__(self, dim: int, hidden: int, dropout: float, n_outputs: int, branches: int = 1):
        super().__init__()
        self.branches = branches
        for i in range(branches):
            setattr(self, f"path{i}", TorchMLPPath(dim, hidden, dropout, n_outputs))

    def forward(self, x):
        outs = [getattr(self, f"path{i}")(x) for i in range(self.branches)]
        return outs[0] if self.branches == 1 else torch.stack(outs).mean(0)


class TorchLayerSum(nn.Module):
    """Softmax-weighted sum over stored layers, weights starting at zero (s3prl)."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(n_layers))

    def forward(self, x):  # (B, L, D) -> (B, D)
        return torch.einsum("l,bld->bd", torch.softmax(self.layer_weights, 0), x)


class TorchViewInput(nn.Module):
    """Optional layer sum, then Linear `proj` to `dim` when the view's width differs."""

    def __init__(self, d_in: int, dim: int, n_layers: int | None = None):
        super().__init__()
        self.layer_sum = TorchLayerSum(n_layers) if n_layers else None
        self.proj = nn.Linear(d_in, dim) if d_in != dim else None

    def forward(self, x):
        if self.layer_sum is not None:
            x = self.layer_sum(x)
        return x if self.proj is None else self.proj(x)


class TorchGate(nn.Module):
    """MSBG, eq. 5-6."""

    def __init__(self, dim: int):
        super().__init__()
        for name in ("W1p", "W2p", "W1q", "W2q"):
            setattr(self, name, nn.Linear(dim, dim))
        self.Wzp = nn.Linear(2 * dim, dim)
        self.Wzq = nn.Linear(2 * dim, dim)

    def forward(self, f1, f2, f1h, f2h):
        p1, p2 = torch.tanh(self.W1p(f1)), torch.tanh(self.W2p(f2))
        zp = torch.sigmoid(self.Wzp(torch.cat([f1, f2], -1)))
        q1, q2 = torch.tanh(self.W1q(f1h)), torch.tanh(self.W2q(f2h))
        zq = torch.sigmoid(self.Wzq(torch.cat([f1h, f2h], -1)))
        return zp * p1 + (1 - zp) * p2 + zq * q1 + (1 - zq) * q2


class TorchFusion(nn.Module):
    """Two views -> DIA (eq. 2-4) -> MSBG -> MLP."""

    def __init__(
        self, dims, dim=1024, hidden=512, dropout=0.5, n_outputs=1, branches=1, layers=(None, None)
    ):
        super().__init__()
        self.view1 = TorchViewInput(dims[0], dim, layers[0])
        self.view2 = TorchViewInput(dims[1], dim, layers[1])
        self.gate = TorchGate(dim)
        self.mlp = TorchMLPHead(dim, hidden, dropout, n_outputs, branches)

    def forward(self, x1, x2):
        f1, f2 = self.view1(x1), self.view2(x2)
        alpha = torch.sigmoid(torch.tanh(f1 * f2))  # eq. 2-3
        return self.mlp(self.gate(f1, f2, alpha * f1, alpha * f2))


class TorchSingle(nn.Module):
    """One view -> MLP."""

    def __init__(
        self, dims, dim=1024, hidden=512, dropout=0.5, n_outputs=1, branches=1, layers=(None,)
    ):
        super().__init__()
        self.view1 = TorchViewInput(dims[0], dim, layers[0])
        self.mlp = TorchMLPHead(dim, hidden, dropout, n_outputs, branches)

    def forward(self, x1):
        return self.mlp(self.view1(x1))


def torch_model(
    ss: ScoreSetConfig,
    mc: ModelConfig,
    view_dims: Mapping[str, int],
    n_outputs: int = 1,
    view_layers: Mapping[str, int] | None = None,
) -> nn.Module:
    """The PyTorch twin of `build_score_model(ss, mc, view_dims, n_outputs)`, torch's own init."""
    cls = TorchFusion if ss.kind == "fusion" else TorchSingle
    dims = [view_dims[v] for v in ss.views]
    layers = tuple((view_layers or {}).get(v) for v in ss.views)
    return cls(dims, mc.common_dim, mc.hidden, mc.dropout, n_outputs, mc.mlp_branches, layers)


def flax_init_(model: nn.Module) -> nn.Module:
    """Redraw every Linear as flax.linen.Dense does: LeCun normal (truncated at 2 sd), zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            # Flax's truncated normal divides by the std of a unit normal truncated to [-2, 2].
            std = math.sqrt(1.0 / m.in_features) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
    return model


def load_flax_params(model: nn.Module, params) -> None:
    """Copy our Flax params into the twin: our `Linear` is stored as `nn.Linear`, names and shapes."""
    from flax.traverse_util import flatten_dict

    sd = {
        ".".join(p): torch.from_numpy(np.asarray(v).copy()) for p, v in flatten_dict(params).items()
    }
    model.load_state_dict(sd, strict=True)


def torch_ccc_loss(y, pred):
    """Mean over columns of 1 - CCC with population variances (as `losses.ccc_loss`)."""
    my, mp = y.mean(0), pred.mean(0)
    cov = ((y - my) * (pred - mp)).mean(0)
    denom = y.var(0, unbiased=False) + pred.var(0, unbiased=False) + (my - mp) ** 2
    return (1 - 2 * cov / denom.clamp(min=1e-12)).mean()


# ---------------------------------------------------------------------------------------------
# Training.


def train_torch(
    model: nn.Module,
    train_x: Sequence[np.ndarray],
    train_y: np.ndarray,
    dev_x: Sequence[np.ndarray],
    dev_y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int = 0,
    batches: Callable[[int], Iterable[np.ndarray]] | None = None,
    on_step: Callable[[float], None] | None = None,
) -> dict:
    """AdamW on 1 - CCC; returns {best_epoch, best_dev_ccc, history, state (best weights)}.

    `train_y`/`dev_y` are (N, K) on the training scale; the dev CCC is mean over columns of the
    CCC over the whole split, rows without a label left out. `batches(epoch)`, when given,
    yields the row indices of each step (the twin test feeds ours); otherwise a shuffling
    `DataLoader` with its defaults makes them.
    """
    dt = next(model.parameters()).dtype  # float32, or float64 for the twin test

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(dt)

    xs, y, dxs = [tensor(x) for x in train_x], tensor(train_y), [tensor(x) for x in dev_x]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(len(y))),
        batch_size=batch_size,
        shuffle=True,
        generator=g,
    )
    history, best = [], {"best_dev_ccc": -math.inf, "best_epoch": 0, "state": None}
    for epoch in range(epochs):
        model.train()
        order = batches(epoch) if batches is not None else (b[0] for b in loader)
        losses = []
        for ix in order:
            ix = torch.as_tensor(np.asarray(ix), dtype=torch.long)
            loss = torch_ccc_loss(y[ix], model(*[x[ix] for x in xs]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(losses[-1])
        model.eval()
        with torch.no_grad():
            pred = model(*dxs).numpy()
        per = [
            float(ccc_np(dev_y[ok, k], pred[ok, k]))
            for k in range(dev_y.shape[1])
            for ok in [np.isfinite(dev_y[:, k])]
        ]
        dev = float(np.mean(per))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_ccc": dev})
        if dev > best["best_dev_ccc"]:
            best = {
                "best_dev_ccc": dev,
                "best_epoch": epoch + 1,
                "state": copy.deepcopy(model.state_dict()),
            }
    return {**best, "history": history}


# ---------------------------------------------------------------------------------------------
# A whole store, as `ifmvse train` runs it.


def load_views(store, split: str, views: Sequence[str], layer_views: set[str] = frozenset()):
    """({view: (N, D)}, labels (N, 3) corpus scale) of the split's rows filled for every view."""
    parts = {v: store.load(split, [v], layers=v in layer_views) for v in views}
    common = None
    for p in parts.values():
        common = p.indices if common is None else np.intersect1d(common, p.indices)
    feats = {v: p.features[v][np.searchsorted(p.indices, common)] for v, p in parts.items()}
    labels = np.stack(
        [store.labels.get(a, np.full(store.n, np.nan))[common] for a in ATTRIBUTES], -1
    ).astype(np.float32)
    return feats, labels


def view_stats_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean per dimension, one spread per view or layer) of Train features, in float64."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    spread = np.sqrt(x.var(0).mean(-1, keepdims=True))
    return mean, np.broadcast_to(np.maximum(spread, 1e-6), mean.shape)


def train_store(
    store_path: str | Path, cfg: Config, seed: int, init: str = "torch", log=print
) -> dict:
    """Train every score set x attribute of `cfg` on the store; best-epoch dev and test CCC."""
    from featurestore import FeatureStore

    torch.manual_seed(seed)
    store = FeatureStore(store_path)
    info = store.backbones
    view_dims = {k: v.dim for k, v in info.items()}
    layer_views = (
        {k for k, v in info.items() if v.num_layers is not None}
        if cfg.model.layer_weights
        else set()
    )
    views = sorted({v for s in cfg.model.score_sets for v in s.views})
    train_f, train_l = {}, {}
    stats = {}
    for v in views:
        x, _ = load_views(store, cfg.train.train_split, [v], layer_views)
        stats[v] = view_stats_np(x[v])
    test_split = cfg.train.test_splits[0]
    out = {}
    for ss in cfg.model.score_sets:
        splits = {
            s: load_views(store, s, ss.views, layer_views)
            for s in (cfg.train.train_split, cfg.train.dev_split, test_split)
        }
        std = {
            s: [
                ((f[v] - stats[v][0]) / stats[v][1] if cfg.model.standardize else f[v]).astype(
                    np.float32
                )
                for v in ss.views
            ]
            for s, (f, _) in splits.items()
        }
        train_f, train_l = std[cfg.train.train_split], splits[cfg.train.train_split][1]
        dev_f, dev_l = std[cfg.train.dev_split], splits[cfg.train.dev_split][1]
        out[ss.name] = {}
        for a in cfg.train.attributes:
            k = ATTRIBUTES.index(a)
            keep = np.isfinite(train_l[:, k])
            dkeep = np.isfinite(dev_l[:, k])
            scale = (lambda y: (y - 1) / 6) if cfg.corpus.normalize_labels else (lambda y: y)
            model = torch_model(
                ss, cfg.model, view_dims, 1, {v: info[v].num_layers for v in layer_views}
            )
            if init == "flax":
                flax_init_(model)
            res = train_torch(
                model,
                [x[keep] for x in train_f],
                scale(train_l[keep][:, [k]]),
                [x[dkeep] for x in dev_f],
                scale(dev_l[dkeep][:, [k]]),
                epochs=cfg.train.epochs,
                batch_size=cfg.train.batch_size,
                lr=cfg.train.learning_rate,
                weight_decay=cfg.train.weight_decay,
                seed=seed * 1000 + len(out) * 10 + k,
            )
            model.load_state_dict(res["state"])
            model.eval()
            with torch.no_grad():
                pred = model(*[torch.from_numpy(x) for x in std[test_split]]).numpy()[:, 0]
            ty = splits[test_split][1][:, k]
            ok = np.isfinite(ty)
            test = float(ccc_np(scale(ty[ok]), pred[ok])) if ok.sum() > 1 else float("nan")
            out[ss.name][a] = {
                "dev_ccc": res["best_dev_ccc"],
                "best_epoch": res["best_epoch"],
                "test_ccc": test,
            }
            log(f"seed {seed} {ss.name}/{a}: dev {res['best_dev_ccc']:.4f} test {test:.4f}")
    return out


def ours_from_run(run: str | Path) -> dict:
    """Best-epoch dev CCC and test CCC per score set and attribute of one of our RUN/ dirs."""
    run = Path(run)
    manifest = json.loads((run / "manifest.json").read_text())
    test_split = manifest["config"]["train"]["test_splits"][0]
    z = np.load(run / "scores" / f"{test_split}.npz")
    out = {}
    for k, name in enumerate(z["score_sets"]):
        out[str(name)] = {}
        for a, rec in manifest["best"][str(name)].items():
            j = ATTRIBUTES.index(a)
            y, p = z["labels"][:, j], z["scores"][k][:, j]
            ok = np.isfinite(y)
            out[str(name)][a] = {
                "dev_ccc": rec["dev_ccc"],
                "best_epoch": rec["epoch"],
                "test_ccc": float(ccc_np(y[ok], p[ok])),
            }
    return out


def summarize(runs: Sequence[dict], key: str = "dev_ccc") -> dict[str, tuple[float, float]]:
    """Per score set: (mean, sample sd) over runs of the mean over attributes of `key`."""
    out = {}
    for name in runs[0]:
        per_run = [np.mean([r[name][a][key] for a in r[name]]) for r in runs]
        sd = float(np.std(per_run, ddof=1)) if len(per_run) > 1 else 0.0
        out[name] = (float(np.mean(per_run)), sd)
    return out


def main() -> None:
    from jax_ifmvse.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="feature store (e.g. runs/demo/store.h5)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--init", choices=["torch", "flax"], default="torch")
    ap.add_argument("--ours", nargs="*", default=[], help="our RUN/ directories to put beside")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    runs = [train_store(args.store, cfg, s, args.init) for s in args.seeds]
    ours = [ours_from_run(r) for r in args.ours]
    table = {
        "torch_dev": summarize(runs),
        "torch_test": summarize(runs, "test_ccc"),
    }
    if ours:
        table |= {"ours_dev": summarize(ours), "ours_test": summarize(ours, "test_ccc")}
    cols = list(table)
    print("| score set | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in table["torch_dev"]:
        cells = [f"{table[c][name][0]:.3f} ± {table[c][name][1]:.3f}" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "init": args.init,
                    "seeds": args.seeds,
                    "torch": runs,
                    "ours": ours,
                    "ours_runs": args.ours,
                    "summary": table,
                },
                indent=1,
            )
        )


class BaselineASP(nn.Module):
    """The challenge baseline's net/pooling.py AttentiveStatisticsPooling, given frame lengths:
    per utterance, sliced to its frames (the reference of `heads/pooling.py`)."""

    def __init__(self, d):
        super().__init__()
        self.sap_linear = nn.Linear(d, d)
        self.attention = nn.Parameter(torch.randn(d, 1))

    def forward(self, xs, feat_lens):
        out = []
        for x, n in zip(xs, feat_lens, strict=True):
            x = x[:n].unsqueeze(0)
            h = torch.tanh(self.sap_linear(x))
            w = torch.softmax(torch.matmul(h, self.attention).squeeze(2), dim=1).view(1, -1, 1)
            mu = torch.sum(x * w, dim=1)
            rh = torch.sqrt((torch.sum(x**2 * w, dim=1) - mu**2).clamp(min=1e-5))
            out.append(torch.cat((mu, rh), 1).squeeze(0))
        return torch.stack(out)


if __name__ == "__main__":
    main()
