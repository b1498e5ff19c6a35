"""The layer under TensorFlow's MirroredStrategy, on two logical CPU devices
(in a subprocess: logical devices must be set before TensorFlow starts).

Per-replica statistics by default: three steps on two replicas (4 examples
each) are one device's steps with `virtual_batch_size=4`; with
`synchronized=True` they are one device's steps on the whole batch, masked
positions left out. The two
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
    # Masked sequences: steps 3-4 of every example, and more of the second
    # replica's, masked out (zero steps). Replicas weigh a masked loss by
    # their own counts, so only one step's moving statistics (the forward
    # pass) are compared.
    seq = rng.normal(1, 2, size=(8, 5, 3)).astype("float32")
    seq[:, 3:] = 0
    seq[5:, 1:] = 0
    seq_y = rng.normal(size=(8, 5, 3)).astype("float32")
    CLIP = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0,
                d_max_steps=0, momentum=0.5)

    def steps(strategy, masked=False, count=3, **kwargs):
        with (strategy or tf.distribute.get_strategy()).scope():
            keras.utils.set_random_seed(0)
            inputs = ([keras.Input((5, 3)), keras.layers.Masking(0.0),
                       keras.layers.Dense(3)] if masked else
                      [keras.Input((6, 6, 3)),
                       keras.layers.Conv2D(3, 3, padding="same")])
            model = keras.Sequential(
                [*inputs, BatchRenormalization(**CLIP, **kwargs)])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        data = (seq, seq_y) if masked else (x, y)
        for _ in range(count):
            model.fit(*data, batch_size=8, epochs=1, verbose=0,
                      shuffle=False)
        if masked:
            return [keras.ops.convert_to_numpy(w) for w in
                    model.layers[-1].non_trainable_weights], None
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
    masked_whole, _ = steps(None, True, 1)
    masked_per_replica, _ = steps(mirrored, True, 1)
    masked_synced, _ = steps(mirrored, True, 1, synchronized=True)
    print(json.dumps({
        "replicas": len(copies),
        "per_replica_vs_groups": difference(grouped, per_replica),
        "per_replica_vs_whole": difference(whole, per_replica),
        "synchronized_vs_whole": difference(whole, synced),
        "masked_per_replica_vs_whole": difference(masked_whole,
                                                  masked_per_replica),
        "masked_synchronized_vs_whole": difference(masked_whole,
                                                   masked_synced),
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
    # With a mask, synchronized moments are over every replica's selected
    # positions.
    assert found["masked_per_replica_vs_whole"] > 0.05, found
    assert found["masked_synchronized_vs_whole"] < 1e-5, found
    assert found["copies"] == 0.0 and found["synchronized_copies"] == 0.0
