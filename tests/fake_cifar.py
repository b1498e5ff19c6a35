"""Tiny CIFAR-10 folders in the official python layout, for the tests."""

import pickle

import numpy as np

FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def write_fake_cifar(folder, per_class=20, test_per_class=10, seed=0):
    """Writes `cifar-10-batches-py`-style files into `folder` and returns it.

    Each training file holds `per_class` images of every class (so 5 *
    per_class * 10 in all), the test file `test_per_class` of each. An image
    is a class-dependent colour plus noise, so a tiny network can learn it.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 226, size=(10, 3))
    for name in FILES:
        count = test_per_class if name == "test_batch" else per_class
        labels = np.repeat(np.arange(10), count)
        rng.shuffle(labels)
        images = colours[labels][:, :, None, None] + rng.normal(
            0, 25, size=(len(labels), 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), -1)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                 b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)],
                     b"num_cases_per_batch": 10 * per_class,
                     b"num_vis": 3072}, file, protocol=2)
    return folder
