"""Child of test_finetune.py: two micro-steps on 1 device and on 2 (batch sharded), same result."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from test_finetune_twin import Twin  # noqa: E402

from jax_ifmvse.finetune.run import make_finetune_step  # noqa: E402
from jax_ifmvse.parallel import data_mesh  # noqa: E402

assert jax.device_count() == 2
tw = Twin("wavlm", accumulation=2)
out = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = data_mesh(devices)
    sharding = NamedSharding(mesh, P("data"))
    step = make_finetune_step(tw.spec, tw.tx, tw.labels, jax.random.key(0), sharding)
    state = jax.device_put(tw.state(), NamedSharding(mesh, P()))
    for s in range(2):
        batch = jax.device_put(jax.tree.map(jnp.asarray, tw.batch(s)), sharding)
        state, m = step(state, batch)
    leaves = jax.tree.leaves(jax.device_get(state.params))
    out.append((float(m["loss"]), leaves))
(l1, p1), (l2, p2) = out
err = max(float(np.abs(a - b).max()) for a, b in zip(p1, p2))
moved = max(float(np.abs(a - b).max()) for a, b in zip(p1, jax.tree.leaves(tw.params)))
print(f"RESULT {l1} {l2} {err} {moved}")
