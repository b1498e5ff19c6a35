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

        plan = list(sampling.batch_plan(self.host_labels, batch_size, rng,
                                       self.augmented, classes_per_batch,
                                       pairs))
        # The whole epoch's indices and offsets in one host-to-device copy.
        parts = [np.concatenate([index for index, _ in plan])]
        if self.augmented:
            for part in range(3):  # top, left, flip
                parts.append(np.concatenate([o[part] for _, o in plan]))
        epoch = ops.convert_to_tensor(np.stack(parts).astype(np.int32))
        start = 0
        for index, _ in plan:
            yield self.batch(ops.slice(epoch, (0, start),
                                       (len(parts), len(index))))
            start += len(index)

    def batch(self, plan):
        """The batch of a plan `(1 or 4, B)` int32 on the device: indices,
        then (augmented) the crops' top and left offsets and flips."""
        from keras import ops

        index = plan[0]
        labels = ops.take(self.labels, index, axis=0)
        if not self.augmented:
            return self.normalize(ops.take(self.images, index, axis=0)), labels
        top, left, flip = plan[1], plan[2], plan[3]
        rows = top[:, None] + self.rows  # (B, H) in the padded image
        cols = left[:, None] + self.cols
        mirrored = left[:, None] + (self.width - 1) - self.cols
        cols = ops.where(flip[:, None] > 0, mirrored, cols)  # (B, W)
        height = self.height + 2 * self.pad
        width = self.width + 2 * self.pad
        pixels = ((index * height)[:, None, None] + rows[:, :, None]) * width
        pixels = pixels + cols[:, None, :]  # (B, H, W) rows of self.images
        return self.normalize(ops.take(self.images, pixels, axis=0)), labels

    def normalize(self, images):
        """uint8 -> float32 `(x / 255 - mean) / std`, as
        preprocessing.normalize."""
        from keras import ops

        return ops.cast(images, "float32") * self.scale + self.offset
