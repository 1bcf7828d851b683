"""The one training core: state and step, optimizer, fit loop, run directory, checkpoints.

`train` (score-set heads) and `finetune` (a backbone end to end) both run on it:
- `state`: `TrainState` and `train_step` (an `apply` and a loss, an optional trainable mask,
  dropout keyed by fold_in(key, step)), jitted once with the state donated;
- `optim`: the one AdamW builder (per-group learning rates, frozen groups and gradient
  accumulation only when asked);
- `fit`: the epoch loop (resume from the latest checkpoint, history, metrics.jsonl, the save rule,
  restoring the best state), fed by an in-memory scan epoch or host-side batches;
- `rundir`: the settings check of a rerun, atomic JSON writes, the complete flag;
- `checkpoints`: the Orbax manager (latest + best) and its restores.
"""
