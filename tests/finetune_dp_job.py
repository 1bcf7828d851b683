"""Child of test_finetune.py: two micro-steps on 1 device and on 2 (batch sharded).

Prints one JSON line after RESULT: for each device count the two micro-steps' losses and
gradient norms, the mean gradient of the two micro-batches (read from an accumulator that
never applies it: `MultiSteps(sgd, every_k=3)`), the parameters after the AdamW update of the
real optimizer (accumulation 2), and the parameters before; the test derives its bounds.
"""

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from test_finetune_twin import Twin  # noqa: E402

from jax_ifmvse.finetune.run import make_finetune_step  # noqa: E402
from jax_ifmvse.parallel import data_mesh  # noqa: E402

assert jax.device_count() == 2
tw = Twin("wavlm", accumulation=2)
# Same params, batches and dropout keys (fold_in(key, step)); every_k=3: after two micro-steps
# its acc_grads hold the mean gradient the real optimizer applied, and nothing was applied.
probe = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3)


def flat(tree) -> list[list[float]]:
    return [np.asarray(x, np.float64).ravel().tolist() for x in jax.tree.leaves(tree)]


out = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = data_mesh(devices)
    sharding = NamedSharding(mesh, P("data"))
    res = {}
    for name, tx in (("adamw", tw.tx), ("probe", probe)):
        step = make_finetune_step(tw.spec, tx, tw.labels, jax.random.key(0), sharding)
        state = tw.state()  # fresh copies: the step donates its state
        state = jax.device_put(
            state.replace(opt_state=tx.init(state.params)), NamedSharding(mesh, P())
        )
        for s in range(2):
            batch = jax.device_put(jax.tree.map(jnp.asarray, tw.batch(s)), sharding)
            state, m = step(state, batch)
            res.setdefault(f"{name}_loss", []).append(float(m["loss"]))
            res.setdefault(f"{name}_grad_norm", []).append(float(m["grad_norm"]))
        if name == "adamw":
            res["params"] = flat(jax.device_get(state.params))
        else:
            res["mean_grad"] = flat(jax.device_get(state.opt_state.acc_grads))
    out.append(res)
print("RESULT " + json.dumps({"one": out[0], "two": out[1], "before": flat(tw.params)}))
