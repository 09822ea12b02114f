"""The ditkit-digits feature cache (issue 16): a full disk leaves no truncated file at the cache
path, and a damaged cache is trained again instead of failing every later eval."""

import errno

import pytest
import torch

import ditkit.metrics.features as features
from ditkit.errors import DitkitError


def test_a_full_disk_leaves_no_cache_file_and_a_damaged_cache_is_retrained(tmp_path, monkeypatch, one_thread):
    path = tmp_path / "features" / "ditkit-digits.pt"
    real_save = torch.save

    def full_disk(obj, file):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.torch, "save", full_disk)
    with pytest.raises(DitkitError, match="could not write .*ditkit-digits.pt: the disk is full"):
        features.digits_features(path, progress=False, epochs=1)
    assert list(path.parent.iterdir()) == []  # neither the target nor a temporary file
    monkeypatch.setattr(features.torch, "save", real_save)
    path.write_bytes(b"PK\x03\x04 truncated")  # as an older ditkit left it
    with pytest.warns(UserWarning, match="feature cache .* is damaged .*training it again"):
        net = features.digits_features(path, progress=False, epochs=1)
    assert 0 <= net.accuracy <= 1 and torch.load(path, weights_only=True)["accuracy"] == net.accuracy


def test_a_file_ditkit_did_not_write_as_the_cache_is_refused_never_replaced(tmp_path):
    """Issue 27.1: an EMA checkpoint or the Inception weights passed as the cache path stay as they were."""
    from safetensors.torch import save_file

    from ditkit import DitkitError

    ema, inception = tmp_path / "ema.safetensors", tmp_path / "inception.pth"
    save_file({"blocks.0.weight": torch.ones(3)}, ema, metadata={"ditkit": "{}"})
    torch.save({"conv.weight": torch.ones(2, 2)}, inception)
    for path in (ema, inception):
        before = path.read_bytes()
        with pytest.raises(DitkitError, match=f"{path} is not a ditkit-digits feature cache .* will not replace it"):
            features.digits_features(path, progress=False, epochs=1)
        assert path.read_bytes() == before


def test_the_cache_says_what_it_is_and_an_older_cache_still_loads(tmp_path, one_thread):
    path = tmp_path / "cache.pt"
    features.digits_features(path, progress=False, epochs=1)
    assert torch.load(path, weights_only=True)["kind"] == features.CACHE_KIND
    older = tmp_path / "older.pt"
    torch.save({"state_dict": features.DigitsNet().state_dict(), "accuracy": 0.25}, older)
    before = older.read_bytes()
    assert features.digits_features(older, progress=False).accuracy == 0.25 and older.read_bytes() == before


def test_an_unreadable_torch_file_at_the_cache_path_is_kept_aside_before_retraining(tmp_path, one_thread):
    path = tmp_path / "cache.pt"
    path.write_bytes(b"PK\x03\x04 someone's truncated file")
    with pytest.warns(UserWarning, match="kept as .*cache.pt.damaged"):
        features.digits_features(path, progress=False, epochs=1)
    assert (tmp_path / "cache.pt.damaged").read_bytes() == b"PK\x03\x04 someone's truncated file"
