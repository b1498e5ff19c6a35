"""The training set resident on the device (GPU or TPU): train.py's
`--input device`.

The uint8 images and the labels go to the device once. Each epoch, the host
draws what `sampling.train_batches` draws from the epoch's rng (the order,
the class batches or the pairs, and the crop offsets and flips), with the
same function
(`sampling.batch_plan`), and sends those few integers to the device in one
copy; the device gathers, crops, flips and normalizes each batch. So a batch
costs no host work on the pixels and no host-to-device copy of them, and the
batches are those of the host path (`--input host`), up to float rounding.
`keras.ops` only: the same code on every backend.
"""

import numpy as np

from experiment import sampling

PAD = 4  # the zero padding of preprocessing.augment (batch_plan draws
# its offsets)


class DeviceTrainSet:
    """Training images `(N, H, W, C)` uint8 and labels on the device, with
    the normalization `preprocessing.normalize` applies (`mean`, `std` per
    channel).

    With `augmented`, the images are kept padded by `PAD` zero pixels on each
    side (for 50000 CIFAR-10 images, 240 MB instead of 154 MB), so that a
    batch of crops is one gather of pixels."""

    def __init__(self, images, labels, mean, std, augmented=False):
        from keras import ops

        self.augmented = augmented
        self.pad = PAD if augmented else 0
        _, self.height, self.width, channels = images.shape
        if augmented:
            p = self.pad
            images = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
            # One row per pixel, so a batch of crops is a `take` of rows;
            # int32 pixel indices: up to 1.3 million 40x40 images.
            images = images.reshape(-1, channels)
        self.images = ops.convert_to_tensor(images)
        self.host_labels = np.asarray(labels, np.int32)  # to draw batches
        self.labels = ops.convert_to_tensor(self.host_labels)
        # preprocessing.normalize's float32 constants, so the values agree.
        scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
        offset = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
        self.scale = ops.convert_to_tensor(scale)
        self.offset = ops.convert_to_tensor(offset)
        self.rows = ops.arange(self.height, dtype="int32")
        self.cols = ops.arange(self.width, dtype="int32")

    def train_batches(self, batch_size, rng, classes_per_batch=None,
                      pairs=None):
        """One epoch of normalized batches `(x float32, y int32)` on the
        device: those of `sampling.train_batches` with the same arguments and
        `rng` (augmented if this set is)."""
        from keras import ops

        # The epoch's indices and offsets in a copy per batch size (the
        # last batch may be smaller), not one per batch.
        for plan in self.epoch_plan(batch_size, rng, classes_per_batch,
                                    pairs):
            plan = ops.convert_to_tensor(plan)
            for step in range(plan.shape[0]):
                yield self.batch(plan[step])

    def epoch_plan(self, batch_size, rng, classes_per_batch=None, pairs=None,
                   steps_per_call=None):
        """The epoch's batch plans, drawn as `train_batches` draws them, as
        host int32 arrays `(steps, 1 or 4, B)`: one per run of consecutive
        batches of one size B, cut into at most `steps_per_call` steps
        (None: uncut). Each array is what one compiled call of several
        steps takes (`batch` makes a step's batch of one of its rows)."""
        runs = []
        for index, offsets in sampling.batch_plan(
                self.host_labels, batch_size, rng, self.augmented,
                classes_per_batch, pairs):
            rows = [index] + (list(offsets) if self.augmented else [])
            step = np.stack(rows).astype(np.int32)
            if runs and runs[-1][-1].shape == step.shape:
                runs[-1].append(step)
            else:
                runs.append([step])
        cut = steps_per_call or max(len(run) for run in runs)
        return [np.stack(run[start:start + cut]) for run in runs
                for start in range(0, len(run), cut)]

    def tensors(self):
        """The set's device arrays, for a compiled function to take as
        arguments (closed over, they would be compiled in as constants)."""
        return self.images, self.labels, self.scale, self.offset

    def batch(self, plan, tensors=None):
        """The batch of a plan `(1 or 4, B)` int32 on the device: indices,
        then (augmented) the crops' top and left offsets and flips; from
        `tensors` (default: `self.tensors()`)."""
        from keras import ops

        images, labels, scale, offset = tensors or self.tensors()
        index = plan[0]
        labels = ops.take(labels, index, axis=0)
        if not self.augmented:
            images = ops.take(images, index, axis=0)
            return normalize(images, scale, offset), labels
        top, left, flip = plan[1], plan[2], plan[3]
        rows = top[:, None] + self.rows  # (B, H) in the padded image
        cols = left[:, None] + self.cols
        mirrored = left[:, None] + (self.width - 1) - self.cols
        cols = ops.where(flip[:, None] > 0, mirrored, cols)  # (B, W)
        height = self.height + 2 * self.pad
        width = self.width + 2 * self.pad
        pixels = ((index * height)[:, None, None] + rows[:, :, None]) * width
        pixels = pixels + cols[:, None, :]  # (B, H, W) rows of self.images
        images = ops.take(images, pixels, axis=0)
        return normalize(images, scale, offset), labels


def normalize(images, scale, offset):
    """uint8 -> float32 `(x / 255 - mean) / std`, as
    preprocessing.normalize (`scale`, `offset`: its float32 constants)."""
    from keras import ops

    return ops.cast(images, "float32") * scale + offset
