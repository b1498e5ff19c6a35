"""Loading and checks (experiment/cifar10.py), subsets, normalization and
augmentation (experiment/preprocessing.py), on tiny files written in the
official python layout."""

import pickle

import numpy as np
import pytest

from experiment import preprocessing
from experiment import sampling

from experiment import cifar10
from fake_cifar import write_fake_cifar

pytestmark = pytest.mark.backend_independent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fake_cifar(
        tmp_path_factory.mktemp("data") / "cifar-10-batches-py", per_class=4,
        test_per_class=3)


def copy_folder(source, target):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_load_folder(folder):
    data = cifar10.load(folder)
    assert data.x_train.shape == (200, 32, 32, 3)
    assert data.x_test.shape == (30, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int32
    assert np.bincount(data.y_train).tolist() == [20] * 10
    assert data.source == str(folder)
    # Channel-major rows (1024 red, 1024 green, 1024 blue) -> HWC images.
    with open(folder / "data_batch_1", "rb") as file:
        raw = pickle.load(file, encoding="bytes")
    row = raw[b"data"][0]
    assert data.x_train[0, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert data.x_train[0, 0, 1, 2] == row[2048 + 1]
    assert data.x_train[0, 1, 0, 0] == row[32]
    assert data.y_train[0] == raw[b"labels"][0]


def test_parent_folder_and_environment(folder, monkeypatch):
    assert cifar10.load(folder.parent).source == str(folder)
    monkeypatch.setenv("CIFAR10_DIR", str(folder))
    assert cifar10.load().source == str(folder)
    # --data-dir wins over CIFAR10_DIR.
    monkeypatch.setenv("CIFAR10_DIR", "/nonexistent")
    assert cifar10.load(folder).source == str(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(cifar10.DataError) as error:
        cifar10.load(tmp_path / "nowhere")
    message = str(error.value)
    assert "nowhere" in message and "does not exist" in message
    assert "\n" not in message


def test_missing_file(folder, tmp_path):
    broken = copy_folder(folder, tmp_path / "broken")
    (broken / "data_batch_3").unlink()
    with pytest.raises(cifar10.DataError, match=r"missing file .*data_batch_3"):
        cifar10.load(broken)


def test_truncated_file(folder, tmp_path):
    broken = copy_folder(folder, tmp_path / "broken")
    content = (broken / "test_batch").read_bytes()
    (broken / "test_batch").write_bytes(content[: len(content) // 2])
    with pytest.raises(cifar10.DataError, match="test_batch is truncated") as e:
        cifar10.load(broken)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("batch, complaint", [
    ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, "3072"),
    ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "labels"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]},
     "0..9"),
    ({b"pixels": np.zeros((4, 3072), np.uint8)}, "no 'data'"),
    ([1, 2, 3], "not a dict"),
])
def test_wrong_content(folder, tmp_path, batch, complaint):
    broken = copy_folder(folder, tmp_path / "broken")
    with open(broken / "data_batch_2", "wb") as file:
        pickle.dump(batch, file)
    with pytest.raises(cifar10.DataError) as error:
        cifar10.load(broken)
    assert "data_batch_2" in str(error.value)
    assert complaint in str(error.value)


class Exploit:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_unpickling_runs_no_code(folder, tmp_path, capsys):
    broken = copy_folder(folder, tmp_path / "broken")
    with open(broken / "data_batch_1", "wb") as file:
        pickle.dump({b"data": Exploit(), b"labels": []}, file)
    with pytest.raises(cifar10.DataError, match="data_batch_1"):
        cifar10.load(broken)
    assert "must not run" not in capsys.readouterr().out


def test_offline_without_a_copy(monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure: [Errno -3] no network")

    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(cifar10.DataError) as error:
        cifar10.load()
    message = str(error.value)
    assert "\n" not in message
    for hint in ("no network", cifar10.URL, "--data-dir", "CIFAR10_DIR",
                 "cifar-10-batches-py"):
        assert hint in message


def test_stratified_subset():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(labels)
    index = preprocessing.stratified_subset(labels, 123, seed=1)
    assert len(index) == 123 and len(set(index)) == 123
    assert np.all(np.diff(index) > 0)
    counts = np.bincount(labels[index], minlength=10)
    assert counts.min() == 12 and counts.max() == 13
    assert counts.sum() == 123
    again = preprocessing.stratified_subset(labels, 123, seed=1)
    assert np.array_equal(index, again)
    assert not np.array_equal(index, preprocessing.stratified_subset(labels, 123, 2))
    with pytest.raises(cifar10.DataError, match="only 50"):
        preprocessing.stratified_subset(labels, 600)


def test_normalization(folder):
    data = cifar10.load(folder)
    mean, std = preprocessing.channel_stats(data.x_train)
    pixels = data.x_train.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-4)
    x = preprocessing.normalize(data.x_train, mean, std)
    assert x.dtype == np.float32 and x.shape == data.x_train.shape
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(x.reshape(-1, 3).std(0), 1, atol=1e-3)


def test_augment_is_a_padded_crop_or_its_mirror():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(64, 32, 32, 3)).astype(np.uint8)

    def augment(seed):
        offsets = preprocessing.crop_offsets(64, np.random.default_rng(seed))
        return preprocessing.crop(images, *offsets)

    out = augment(5)
    assert out.shape == images.shape and out.dtype == np.uint8
    again = augment(5)
    assert np.array_equal(out, again)
    flips = 0
    for image, result in zip(images, out):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        crops = [padded[top:top + 32, left:left + 32]
                 for top in range(9) for left in range(9)]
        if any(np.array_equal(result, c) for c in crops):
            continue
        assert any(np.array_equal(result, c[:, ::-1]) for c in crops)
        flips += 1
    assert 16 <= flips <= 48
    assert not np.array_equal(out, images)


def test_train_batches():
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 32, 32, 3), np.uint8)
    labels = np.arange(10, dtype=np.int32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32) / 255.0

    def epoch(seed, number, augmented=False):
        return list(sampling.train_batches(
            images, labels, 4, mean, std, sampling.epoch_rng(seed, number),
            augmented=augmented))

    batches = epoch(0, 0)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    seen = np.concatenate([y for _, y in batches])
    assert sorted(seen) == list(range(10))
    x, y = batches[0]
    assert x.dtype == np.float32 and x.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(x[:, 0, 0, 0], y)  # images follow their labels
    assert np.array_equal(seen, np.concatenate([y for _, y in epoch(0, 0)]))
    assert not np.array_equal(seen, np.concatenate([y for _, y in epoch(0, 1)]))
    augmented = epoch(0, 0, augmented=True)
    assert [len(y) for _, y in augmented] == [4, 4, 2]
