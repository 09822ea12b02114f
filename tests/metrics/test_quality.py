import pytest
import torch
from torch import nn

from ditkit import DitkitError
from ditkit.metrics.features import InceptionFeatures, digits_features, find_inception_weights
from ditkit.metrics.quality import evaluate, label_accuracy, load_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_reference("digits", 300, resolution=16, seed=0)


def test_digits_score_near_zero_against_themselves_and_far_from_noise(digits, digits_features_path):
    features = digits_features(digits_features_path)
    same = evaluate(digits, digits, features, progress=False)
    assert abs(same["fid"]) < 1e-6 and same["num_reference"] == 300 and not same["comparable_to_papers"]
    other = evaluate(load_reference("digits", 300, resolution=16, seed=1), digits, features, progress=False)
    noise = evaluate(torch.rand(100, 1, 16, 16) * 2 - 1, digits, features, progress=False)
    assert other["fid"] < noise["fid"] / 10 and other["kid_mean"] < noise["kid_mean"]
    assert other["is_mean"] > 2 * noise["is_mean"]  # clear digits of 10 classes vs one blurry guess


def test_label_accuracy_reads_real_digits_at_any_size_and_not_wrong_labels(digits_features_path):
    from ditkit.data import DigitsDataset

    data = DigitsDataset(32)
    images, labels = data.images[:200], data.labels[:200]
    classifier = digits_features(digits_features_path)
    assert label_accuracy(classifier, images, labels) > 0.8  # the test net trains 2 epochs (12: 99%)
    large = nn.functional.interpolate(images, scale_factor=4, mode="bilinear")  # 128 px: resized inside
    assert label_accuracy(classifier, large, labels) > 0.8
    assert label_accuracy(classifier, images, (labels + 1) % 10) < 0.1
    with pytest.raises(DitkitError, match="one label per image"):
        label_accuracy(classifier, images, labels[:5])


def test_any_module_mapping_images_to_features_and_logits_works():
    class Pooled(nn.Module):
        def forward(self, images):
            pooled = nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)
            return pooled, pooled

    a, b = torch.rand(20, 1, 8, 8), torch.rand(20, 1, 8, 8) * 0.5
    result = evaluate(a, b, Pooled(), progress=False)
    assert result["features"] == "Pooled" and result["fid"] > 0 and result["kid_subset_size"] == 20


def test_missing_inception_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DitkitError, match="torch-fidelity/releases.*--inception-weights PATH.*ditkit-digits"):
        find_inception_weights()
    with pytest.raises(DitkitError, match="no InceptionV3 weights at"):
        find_inception_weights(tmp_path / "nope.pth")
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert find_inception_weights() == cached


def test_an_unusable_inception_setup_is_one_clear_error(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not weights")
    # torch-fidelity missing (or a torchvision that does not match torch), or a bad file: either is named.
    with pytest.raises(DitkitError, match="torch-fidelity|not the InceptionV3"):
        InceptionFeatures(weights)


def test_inception_features_feed_its_network_uint8_rgb():
    seen = {}

    class StandIn(nn.Module):
        def forward(self, images):
            seen["dtype"], seen["shape"] = images.dtype, tuple(images.shape)
            return images.float().mean((2, 3)), images.float().amax((2, 3))

    gray = torch.linspace(-1, 1, 16).expand(2, 1, 4, 16)
    features, logits = InceptionFeatures(backbone=StandIn())(gray)
    assert seen == {"dtype": torch.uint8, "shape": (2, 3, 4, 16)}
    assert logits.max() == 255 and features.dtype == torch.float32
