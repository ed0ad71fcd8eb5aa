"""One process of a two-process CPU training run (see test_distributed.py).

  python distributed_train.py PROCESS_ID PORT DATA_DIR WORKDIR OUT
"""

import hashlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, data_dir, workdir, out = sys.argv[1:6]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))

import numpy as np  # noqa: E402

from midog_jax.training import inputs  # noqa: E402
from midog_jax.training import trainer
from tests.train_fixtures import tiny_config  # noqa: E402

config = tiny_config(data_dir, batch_size=4, num_epochs=1, train_patches_per_epoch=16)
assert jax.process_count() == 2 and len(jax.devices()) == 2
data = inputs.build(config)
result = trainer.train(config, workdir, data)
# Each process fingerprints its own replica of the final parameters.
leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(
    (result.state.params, result.state.batch_stats))]
digest = hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()
with open(out, "w") as f:
  f.write(f"{digest} {result.summary['status']} {len(data.meta['train'])} "
          f"{len(data.train.plan(0))}\n")
jax.distributed.shutdown()
