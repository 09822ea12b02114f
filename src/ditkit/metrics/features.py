"""Feature extractors for FID, KID and Inception Score. Each maps a batch of images (B, C, H, W),
float in [-1, 1] (ditkit's convention) or uint8, to (features (B, D), class logits (B, K)): FID
and KID compare the features, IS uses the logits.

- `inception`: the standard FID network (InceptionV3, TF 2015-12-05 weights, as in torch-fidelity
  and pytorch-fid): 2048-d pool features, 1008 logits. Numbers comparable with papers. Needs the
  `torch-fidelity` package and its weights file, which ditkit never downloads by itself.
- `ditkit-digits`: a small CNN that ditkit trains in seconds on the built-in `digits` data and
  caches; 64-d penultimate features, 10 digit logits. Works offline, meant for the built-in flow
  (and any digit-like images). Its numbers are NOT comparable with published FIDs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DigitsDataset
from ..errors import DitkitError
from ..files import atomic_path, check_writable
from .adm import spatial_features

FEATURES = ("ditkit-digits", "inception")

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# The same TF-ported weights under torch-fidelity's name and pytorch-fid's name.
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")


def cache_dir() -> Path:
    """$DITKIT_CACHE, else $XDG_CACHE_HOME/ditkit, else ~/.cache/ditkit."""
    if os.environ.get("DITKIT_CACHE"):
        return Path(os.environ["DITKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ditkit"


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 0..255 or float [-1, 1] -> float [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float() + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- InceptionV3 (standard FID network)

def find_inception_weights(path: str | Path | None = None) -> Path:
    """An explicit weights file, else the torch hub checkpoint cache (where torch-fidelity and
    pytorch-fid download it) or ditkit's cache; a DitkitError saying how to get it otherwise."""
    if path is not None:
        if Path(path).is_file():
            return Path(path)
        raise DitkitError(f"no InceptionV3 weights at {path}: download {INCEPTION_URL} and pass its path "
                          "to --inception-weights")
    folders = [Path(torch.hub.get_dir()) / "checkpoints", cache_dir()]
    for candidate in (folder / name for folder in folders for name in INCEPTION_FILES):
        if candidate.is_file():
            return candidate
    raise DitkitError(f"the InceptionV3 FID weights are not here (looked in {', '.join(map(str, folders))}): "
                      f"download {INCEPTION_URL} into {folders[0]} or pass --inception-weights PATH; "
                      "or use --features ditkit-digits, which works offline")


class InceptionFeatures(nn.Module):
    """The FID InceptionV3 of torch-fidelity: 2048-d pool features and 1008 bias-free logits (the
    evaluator's softmax input), the TF 2015 graph's own bilinear resize to 299 px.

    `backbone` maps uint8 RGB (B, 3, H, W) to (features, logits); it is built from the weights
    file unless given (tests pass a stand-in). `adm_outputs` also reads the spatial features of
    TF's `mixed_6/conv` for sFID, from `SPATIAL_LAYER` of the backbone."""

    name = "inception"
    comparable = True  # with published FID/KID/IS, given the same reference statistics and sample count
    # TF's mixed_6/conv:0 in torch-fidelity's port, which names its blocks after the TF graph's
    # (util_convert_inception_weights.py: mixed, mixed_1, mixed_2 -> Mixed_5b..5d, mixed_3 -> Mixed_6a,
    # mixed_4..mixed_7 -> Mixed_6b..6e): mixed_6 is Mixed_6d, its `conv` the first branch (1x1 conv,
    # batch norm, ReLU; the scope's own op is the unit's ReLU output, its weights sit in conv/conv2d_params
    # and conv/batchnorm).
    SPATIAL_LAYER = "Mixed_6d.branch1x1"

    def __init__(self, weights: str | Path | None = None, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else _inception_backbone(find_inception_weights(weights))

    def _rgb(self, images: Tensor) -> Tensor:
        rgb = (to_unit_float(images) * 255).round().to(torch.uint8)
        return rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.backbone(self._rgb(images))
        return features.float(), logits.float()

    @torch.no_grad()
    def adm_outputs(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pool (B, 2048), spatial (B, 2023), logits (B, 1008)) of a batch: what the ADM evaluator reads."""
        try:
            layer = self.backbone.get_submodule(self.SPATIAL_LAYER)
        except AttributeError:
            raise DitkitError(f"this Inception network has no {self.SPATIAL_LAYER} (TF mixed_6/conv), which sFID "
                              "reads: use torch-fidelity's FeatureExtractorInceptionV3") from None
        seen = []
        hook = layer.register_forward_hook(lambda module, inputs, output: seen.append(output))
        try:
            features, logits = self.backbone(self._rgb(images))
        finally:
            hook.remove()
        return features.float(), spatial_features(seen[-1].float()), logits.float()


def _inception_backbone(weights: Path) -> nn.Module:
    try:  # torch-fidelity's class itself: torchmetrics' subclass resizes with antialiasing, unlike the TF graph
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as error:  # a torchvision built for another torch fails at import
        raise DitkitError(f"--features inception needs torch-fidelity, which did not import ({error}): "
                          "pip install 'ditkit[inception]' (torch-fidelity with a torchvision matching your "
                          "torch), or use --features ditkit-digits") from None
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=str(weights))
    except Exception as error:  # a foreign or damaged file: torch.load and load_state_dict raise many kinds
        raise DitkitError(f"{weights} is not the InceptionV3 FID weights file ({type(error).__name__}: {error}); "
                          f"get it from {INCEPTION_URL}") from None


# ---------------------------------------------------------------- ditkit-digits (offline)

class DigitsNet(nn.Module):
    """Grayscale 16x16 -> 64-d features -> 10 digit logits. Any input size and channel count is
    converted first (channel mean, antialiased resize), so it reads ditkit's digits at any resolution."""

    side = 16
    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, 10)
        # Features are divided by their RMS over the training digits, so that they have the scale of
        # Inception's pool features (order 1) that KID's polynomial kernel (x.y / d + 1)^3 assumes.
        self.register_buffer("feature_scale", torch.ones(()))

    def prepare(self, images: Tensor) -> Tensor:
        gray = to_unit_float(images).mean(dim=1, keepdim=True)
        if gray.shape[-2:] != (self.side, self.side):
            gray = F.interpolate(gray, size=(self.side, self.side), mode="bilinear", antialias=True,
                                 align_corners=False)
        return gray * 2 - 1

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(self.prepare(images))
        return features / self.feature_scale, self.head(features)


def train_digits_net(epochs: int = 12, seed: int = 0, progress: bool = False) -> tuple[DigitsNet, float]:
    """Train on 1,500 of sklearn's digits (random 1 px shifts), return the net and its accuracy
    on the other 297. A few seconds on one CPU core."""
    generator = torch.Generator().manual_seed(seed)
    data = DigitsDataset(DigitsNet.side)
    order = torch.randperm(len(data), generator=generator)
    train_idx, test_idx = order[:1500], order[1500:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small runs 10-25x slower with threads on a busy CPU
    try:
        _train(net, optimizer, data, train_idx, epochs, generator, progress)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        net.feature_scale.fill_(net(data.images[train_idx])[0].pow(2).mean().sqrt())
        accuracy = (net(data.images[test_idx])[1].argmax(1) == data.labels[test_idx]).float().mean().item()
    return net, accuracy


def _train(net, optimizer, data, train_idx, epochs, generator, progress) -> None:
    from tqdm.auto import tqdm

    for _ in tqdm(range(epochs), desc="training ditkit-digits features", disable=not progress):
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(64):
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(data.images[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(images)[1], data.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


CACHE_KIND = "ditkit-digits feature cache"  # what a cache file says it is (files from before this: see _is_cache)


def digits_features(path: str | Path | None = None, progress: bool = True, epochs: int = 12) -> DigitsNet:
    """The cached ditkit-digits net (default: <cache>/features/ditkit-digits-v1.pt), trained on first use.

    The cache is written atomically (a full disk leaves no truncated file for later runs to trip on)
    and says what it is (`CACHE_KIND`). A file at `path` that is not such a cache (a checkpoint, other
    weights: anything ditkit did not write there as this cache) is refused, never replaced. A damaged
    cache is trained again, with a warning; a torch file that cannot be read is first set aside as
    PATH.damaged, since nothing shows who wrote it."""
    path = Path(path) if path else cache_dir() / "features" / "ditkit-digits-v1.pt"
    if path.exists() and not path.is_file():
        raise DitkitError(f"the ditkit-digits feature cache path {path} is a folder: give a file path")
    net = _cached_digits_net(path) if path.is_file() else None
    if net is None:
        check_writable(path.parent, "ditkit-digits feature cache")  # before the training, not after
        net, accuracy = train_digits_net(epochs=epochs, progress=progress)
        net.accuracy = accuracy
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"kind": CACHE_KIND, "state_dict": net.state_dict(), "accuracy": net.accuracy}, tmp)
    net.name, net.comparable = "ditkit-digits", False
    return net.eval().requires_grad_(False)


def _cached_digits_net(path: Path) -> DigitsNet | None:
    """The net saved at `path`, or None (with a warning) when the cache is damaged; a DitkitError
    when the file is not a ditkit-digits cache."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save's zip: a safetensors or other file is someone else's
            raise _not_a_cache(path, "it is not a torch file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, refused pickle: damage, but nothing says it is ours
        damaged = path.with_name(path.name + ".damaged")
        path.replace(damaged)
        warnings.warn(f"the ditkit-digits feature cache {path} is damaged ({type(error).__name__}; kept as "
                      f"{damaged}): training it again", stacklevel=3)
        return None
    if not _is_cache(saved):
        raise _not_a_cache(path, "it holds other tensors")
    net = DigitsNet()
    try:
        net.load_state_dict(saved["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:  # ditkit's cache, with the wrong tensors
        warnings.warn(f"the ditkit-digits feature cache {path} is damaged ({type(error).__name__}): training it "
                      "again", stacklevel=3)
        return None
    net.accuracy = saved["accuracy"]
    return net


def _is_cache(saved: object) -> bool:
    """Whether a loaded file is a ditkit-digits cache: it says so, or (written before it did) holds
    exactly the net's state and accuracy."""
    if not isinstance(saved, dict):
        return False
    return saved.get("kind") == CACHE_KIND or set(saved) == {"state_dict", "accuracy"}


def _not_a_cache(path: Path, why: str) -> DitkitError:
    return DitkitError(f"{path} is not a ditkit-digits feature cache ({why}), so ditkit will not replace it: give "
                       "--features-path a new file (the cache is trained there) or the cache ditkit wrote")


def build_features(name: str, inception_weights: str | Path | None = None, features_path: str | Path | None = None,
                   progress: bool = True) -> nn.Module:
    if name == "inception":
        return InceptionFeatures(inception_weights).eval()
    if name == "ditkit-digits":
        return digits_features(features_path, progress=progress)
    raise DitkitError(f"unknown feature extractor {name!r}: choose one of {', '.join(FEATURES)}")
