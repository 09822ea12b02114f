"""ADM reference batches (.npz): written by ditkit and read back equal; built here in ADM's layout and
read; bad files refused in one line."""

import numpy as np
import pytest
import torch

from ditkit.errors import DitkitError
from ditkit.metrics.adm import AdmAccumulator
from ditkit.metrics.features import InceptionFeatures
from ditkit.metrics.quality import load_reference, to_uint8_nhwc, write_reference
from ditkit.metrics.refbatch import read_reference_batch, write_reference_batch
from metrics.standin_inception import StandInInception

pytestmark = pytest.mark.usefixtures("one_thread")


def adm_statistics(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"mu": rng.normal(size=2048), "sigma": np.diag(rng.random(2048)),
            "mu_s": rng.normal(size=2023).astype(np.float32), "sigma_s": np.eye(2023, dtype=np.float32)}


def images(n=5, side=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def read_all(batch, batch_size=2) -> np.ndarray:
    return np.concatenate(list(batch.batches(batch_size)))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_batch_in_adm_layout_is_read(tmp_path, save):
    """As the ADM evaluator's files hold them: arr_0 uint8 NHWC, mu/sigma/mu_s/sigma_s, maybe labels."""
    path = tmp_path / "VIRTUAL_test.npz"
    stats, pixels = adm_statistics(), images(7)
    save(path, pixels, np.arange(7), **stats)  # arr_0 images, arr_1 labels (a labelled batch)
    batch = read_reference_batch(path)
    assert batch.image_shape == (7, 8, 8, 3) and batch.image_size == (8, 8) and batch.num_images == 7
    assert np.array_equal(read_all(batch, 3), pixels)
    for key, value in stats.items():
        assert batch.statistics[key].dtype == np.float64 and np.array_equal(batch.statistics[key], value)
    np.savez(tmp_path / "images.npz", pixels)  # images only: ADM computes the statistics
    assert read_reference_batch(tmp_path / "images.npz").statistics is None
    np.savez(tmp_path / "stats.npz", **stats)  # statistics only
    assert read_reference_batch(tmp_path / "stats.npz").image_shape is None


def test_a_batch_written_by_ditkit_reads_back_equal(tmp_path):
    stats, pixels = adm_statistics(1), images(9, side=6)
    path = write_reference_batch(tmp_path / "ref.npz", stats, iter([pixels[:4], pixels[4:]]), pixels.shape)
    batch = read_reference_batch(path)
    assert np.array_equal(read_all(batch, 4), pixels)
    assert all(np.array_equal(batch.statistics[k], v) for k, v in stats.items())
    with np.load(path) as plain:  # what the ADM evaluator's np.load and streaming reader see
        assert sorted(plain.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert plain["arr_0"].dtype == np.uint8 and np.array_equal(plain["arr_0"], pixels)
    write_reference_batch(tmp_path / "stats.npz", stats)
    assert read_reference_batch(tmp_path / "stats.npz").image_shape is None
    with pytest.raises(DitkitError, match="6 reference images were written where 9"):
        write_reference_batch(tmp_path / "short.npz", stats, iter([pixels[:6]]), pixels.shape)
    assert not (tmp_path / "short.npz").exists()


def test_write_reference_streams_a_dataset_with_its_statistics(tmp_path):
    extractor = InceptionFeatures(backbone=StandInInception(pool_dim=2048, grid=17))
    written = write_reference(tmp_path / "digits.npz", "digits", extractor, num=10, resolution=8, with_images=True,
                              batch_size=4, progress=False)
    expected_images = to_uint8_nhwc(load_reference("digits", 10, resolution=8))
    assert written.image_shape == (10, 8, 8, 3) and np.array_equal(read_all(written, 10), expected_images)
    accumulator = AdmAccumulator(keep_pool=False, score=False)
    pool, spatial, _ = extractor.adm_outputs(torch.from_numpy(expected_images).permute(0, 3, 1, 2))
    accumulator.update(pool, spatial)
    expected = accumulator.result()
    # float32 features of other batches: equal to float32 precision
    assert np.allclose(written.statistics["mu"], expected.mu, rtol=1e-5, atol=1e-7)
    assert np.allclose(written.statistics["sigma_s"], expected.sigma_s, rtol=1e-5, atol=1e-7)
    again = write_reference(tmp_path / "stats.npz", "digits", extractor, num=10, resolution=8, batch_size=4,
                            progress=False)
    assert again.image_shape is None and np.array_equal(again.statistics["sigma"], written.statistics["sigma"])


def bad_files(tmp_path):
    stats = adm_statistics()
    partial = {"mu": stats["mu"], "sigma": stats["sigma"]}
    yield "missing.npz", None, "does not exist"
    yield "text.npz", lambda p: p.write_text("not a zip"), "not a readable .npz"
    yield "empty.npz", lambda p: np.savez(p, labels=np.arange(3)), "neither images .arr_0. nor statistics"
    yield "partial.npz", lambda p: np.savez(p, **partial), "has mu, sigma but not mu_s, sigma_s"
    yield "float.npz", lambda p: np.savez(p, images(2).astype(np.float32)), "must be uint8 images"
    yield "nchw.npz", lambda p: np.savez(p, images(2).transpose(0, 3, 1, 2).copy()), r"uint8 \(2, 3, 8, 8\)"
    yield "small.npz", lambda p: np.savez(p, **{**stats, "mu": stats["mu"][:64]}), r"mu must be a float array of shape"
    yield "nan.npz", lambda p: np.savez(p, **{**stats, "mu_s": np.full(2023, np.nan)}), "NaN or infinite"


def test_bad_reference_batches_are_one_line_errors(tmp_path):
    for name, make, message in bad_files(tmp_path):
        path = tmp_path / name
        if make:
            make(path)
        with pytest.raises(DitkitError, match=message) as error:
            read_reference_batch(path)
        assert "\n" not in str(error.value), name
