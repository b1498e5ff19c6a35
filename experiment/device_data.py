"""The training set resident on the device: train.py's `--input device`. The
uint8 images and labels go to the device once; each epoch the host draws
`sampling.batch_plan` (as `--input host` does) and sends those integers in
one copy; the device gathers, crops, flips and normalizes. `keras.ops`
only."""

import numpy as np

from experiment import sampling
from experiment.preprocessing import PAD
from experiment.preprocessing import normalization


class DeviceTrainSet:
    """Training images `(N, H, W, C)` uint8 and labels on the device, with
    the normalization of `preprocessing.normalize` (`mean`, `std` per
    channel). With `augmented`, the images are kept padded by `PAD` zero
    pixels on each side, one row per pixel, so that a batch of crops is one
    `take` of rows (int32 indices: up to 1.3 million 40x40 images)."""

    def __init__(self, images, labels, mean, std, augmented=False):
        from keras import ops

        self.augmented = augmented
        self.pad = PAD if augmented else 0
        _, self.height, self.width, channels = images.shape
        if augmented:
            p = self.pad
            images = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
            images = images.reshape(-1, channels)
        self.images = ops.convert_to_tensor(images)
        self.host_labels = np.asarray(labels, np.int32)  # to draw batches
        self.labels = ops.convert_to_tensor(self.host_labels)
        scale, offset = normalization(mean, std)
        self.scale = ops.convert_to_tensor(scale)
        self.offset = ops.convert_to_tensor(offset)
        self.rows = ops.arange(self.height, dtype="int32")
        self.cols = ops.arange(self.width, dtype="int32")

    def train_batches(self, batch_size, rng, classes_per_batch=None,
                      pairs=None):
        """One epoch of normalized batches `(x float32, y int32)` on the
        device: those of `sampling.train_batches` with the same arguments
        (augmented if this set is)."""
        from keras import ops

        for plan in self.epoch_plan(batch_size, rng, classes_per_batch,
                                    pairs):
            plan = ops.convert_to_tensor(plan)  # one copy per batch size
            for step in range(plan.shape[0]):
                yield self.batch(plan[step])

    def epoch_plan(self, batch_size, rng, classes_per_batch=None, pairs=None,
                   steps_per_call=None):
        """The epoch's `sampling.batch_plan` as host int32 arrays
        `(steps, 1 or 4, B)`: one per run of consecutive batches of one size
        B, cut into at most `steps_per_call` steps (None: uncut), each what
        one compiled call of several steps takes."""
        runs = []
        for index, offsets in sampling.batch_plan(
                self.host_labels, batch_size, rng, self.augmented,
                classes_per_batch, pairs):
            step = np.stack([index, *(offsets or ())]).astype(np.int32)
            if runs and runs[-1][-1].shape == step.shape:
                runs[-1].append(step)
            else:
                runs.append([step])
        cut = steps_per_call or max(len(run) for run in runs)
        return [np.stack(run[start:start + cut]) for run in runs
                for start in range(0, len(run), cut)]

    def tensors(self):
        """The device arrays, for a compiled function to take as arguments
        (closed over, they would be compiled in as constants)."""
        return self.images, self.labels, self.scale, self.offset

    def batch(self, plan, tensors=None):
        """The batch of a plan `(1 or 4, B)` int32 on the device: indices,
        then (augmented) the crops' top and left offsets and flips; from
        `tensors` (default: `self.tensors()`)."""
        from keras import ops

        images, labels, scale, offset = tensors or self.tensors()
        index = plan[0]
        if self.augmented:
            top, left, flip = plan[1], plan[2], plan[3]
            rows = top[:, None] + self.rows  # (B, H) in the padded image
            cols = left[:, None] + self.cols
            mirrored = left[:, None] + (self.width - 1) - self.cols
            cols = ops.where(flip[:, None] > 0, mirrored, cols)  # (B, W)
            width = self.width + 2 * self.pad
            index = ((index * (self.height + 2 * self.pad))[:, None, None]
                     + rows[:, :, None]) * width + cols[:, None, :]
        x = ops.cast(ops.take(images, index, axis=0), "float32")
        return x * scale + offset, ops.take(labels, plan[0], axis=0)
