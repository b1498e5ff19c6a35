"""The layer under TensorFlow's MirroredStrategy, on two logical CPU devices
(in a subprocess: logical devices must be set before TensorFlow starts).

Per-replica statistics by default: three steps on two replicas (4 examples
each) are one device's steps with `virtual_batch_size=4`; with
`synchronized=True` they are one device's steps on the whole batch. The two
replicas' copies of the moving statistics stay equal (they are
mean-aggregated variables)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent

STEPS = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from batch_renorm import BatchRenormalization

    rng = np.random.default_rng(0)
    x = rng.normal(1, 2, size=(8, 6, 6, 3)).astype("float32")
    x[4:] += 2  # the replicas' halves differ
    y = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    CLIP = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0,
                d_max_steps=0, momentum=0.5)

    def steps(strategy, **kwargs):
        with (strategy or tf.distribute.get_strategy()).scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([
                keras.Input((6, 6, 3)),
                keras.layers.Conv2D(3, 3, padding="same"),
                BatchRenormalization(**CLIP, **kwargs)])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        for _ in range(3):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        stats = model.layers[-1].moving_mean.value
        copies = [t.numpy() for t in getattr(stats, "values", [stats])]
        return model.get_weights(), copies

    def difference(a, b):
        return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    grouped, _ = steps(None, virtual_batch_size=4)
    whole, _ = steps(None)
    per_replica, copies = steps(mirrored)
    synced, synced_copies = steps(mirrored, synchronized=True)
    print(json.dumps({
        "replicas": len(copies),
        "per_replica_vs_groups": difference(grouped, per_replica),
        "per_replica_vs_whole": difference(whole, per_replica),
        "synchronized_vs_whole": difference(whole, synced),
        "copies": difference(copies[:1], copies[1:]),
        "synchronized_copies": difference(synced_copies[:1],
                                          synced_copies[1:])}))
""")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.distribute: the tensorflow pass")
def test_mirrored_strategy_per_replica_and_synchronized():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", STEPS], env=env,
                            capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["replicas"] == 2
    # Per-replica and whole-batch statistics differ here ...
    assert found["per_replica_vs_whole"] > 0.05, found
    # ... and each mode is the single-device computation it claims to be.
    assert found["per_replica_vs_groups"] < 1e-5, found
    assert found["synchronized_vs_whole"] < 1e-5, found
    assert found["copies"] == 0.0 and found["synchronized_copies"] == 0.0
