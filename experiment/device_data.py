"""The training set resident on the device (`--input device`,
docs/experiment.md): the host draws the plan, the device makes the batches."""

from itertools import groupby

import numpy as np

from experiment import sampling
from experiment.preprocessing import crop_index
from experiment.preprocessing import normalization
from experiment.preprocessing import pad


class DeviceTrainSet:
    """uint8 images `(N, H, W, C)`, labels and normalization on the device;
    `augmented`: padded, a row per pixel (int32: up to 1.3 M 40x40 images)."""

    def __init__(self, images, labels, mean, std, augmented=False):
        from keras import ops

        self.augmented = augmented
        _, self.height, self.width, _ = images.shape
        self.images = ops.convert_to_tensor(pad(images) if augmented
                                            else images)
        self.host_labels = np.asarray(labels, np.int32)  # to draw batches
        self.labels = ops.convert_to_tensor(self.host_labels)
        scale, offset = normalization(mean, std)
        self.scale = ops.convert_to_tensor(scale)
        self.offset = ops.convert_to_tensor(offset)

    def train_batches(self, batch_size, rng, classes_per_batch=None,
                      pairs=None):
        """`sampling.train_batches`'s batches, made on the device."""
        from keras import ops

        for plan in self.epoch_plan(batch_size, rng, classes_per_batch,
                                    pairs):
            plan = ops.convert_to_tensor(plan)  # one copy per batch size
            for step in range(plan.shape[0]):
                yield self.batch(plan[step])

    def epoch_plan(self, batch_size, rng, classes_per_batch=None, pairs=None,
                   steps_per_call=None):
        """The epoch's `sampling.batch_plan`: int32 `(steps, 1 or 4, B)`,
        one per run of batches of a size B, of at most `steps_per_call`."""
        steps = [np.stack([index, *(offsets or ())]).astype(np.int32)
                 for index, offsets in sampling.batch_plan(
                     self.host_labels, batch_size, rng, self.augmented,
                     classes_per_batch, pairs)]
        runs = [list(run) for _, run in groupby(steps, key=np.shape)]
        cut = steps_per_call or max(len(run) for run in runs)
        return [np.stack(run[start:start + cut]) for run in runs
                for start in range(0, len(run), cut)]

    def tensors(self):
        """The device arrays, as arguments (closed over: constants)."""
        return self.images, self.labels, self.scale, self.offset

    def batch(self, plan, tensors=None):
        """A plan `(1 or 4, B)`'s batch, from `tensors` (default: its own)."""
        from keras import ops

        images, labels, scale, offset = tensors or self.tensors()
        index = plan[0]
        if self.augmented:
            index = crop_index(index, plan[1], plan[2], plan[3],
                               self.height, self.width, ops)
        x = ops.cast(ops.take(images, index, axis=0), "float32")
        return x * scale + offset, ops.take(labels, plan[0], axis=0)
