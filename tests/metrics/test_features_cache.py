"""The ditkit-digits feature cache (issue 16): a full disk leaves no truncated file at the cache
path, and a damaged cache is trained again instead of failing every later eval."""

import errno

import pytest
import torch

import ditkit.metrics.features as features


def test_a_full_disk_leaves_no_cache_file_and_a_damaged_cache_is_retrained(tmp_path, monkeypatch, one_thread):
    path = tmp_path / "features" / "ditkit-digits.pt"
    real_save = torch.save

    def full_disk(obj, file):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        features.digits_features(path, progress=False, epochs=1)
    assert list(path.parent.iterdir()) == []  # neither the target nor a temporary file
    monkeypatch.setattr(features.torch, "save", real_save)
    path.write_bytes(b"PK\x03\x04 truncated")  # as an older ditkit left it
    with pytest.warns(UserWarning, match="feature cache .* is damaged .*training it again"):
        net = features.digits_features(path, progress=False, epochs=1)
    assert 0 <= net.accuracy <= 1 and torch.load(path, weights_only=True)["accuracy"] == net.accuracy
