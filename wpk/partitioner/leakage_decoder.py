"""A learned reconstruction attack: a small convolutional decoder, trained with the CPU build of
torch from a cut tensor back to the input.

The ridge decoder (`leakage_stats.ridge_reconstruct`) is linear, so it underrates tensors
whose information about the input is there but not linearly readable (after ReLUs, pooling,
many channels). This decoder is what a modest attacker would train instead: for a feature map
[C, h, w] and an image input [Cin, H, W], a 3x3 convolution to DECODER_WIDTH channels, a
bilinear resize to H x W, and two more 3x3 convolutions; for any other shape, a two-layer
perceptron. It is fitted on the training half only (features standardised with that half's
statistics, Adam, a fixed number of steps from a fixed seed) and predicts the held-out half.
"""
from __future__ import annotations

import numpy as np

from wpk.errors import WpkError

DECODER_WIDTH = 32            # channels inside the convolutional decoder
HIDDEN = 256                  # units of the perceptron for non-image tensors
STEPS = 300                   # Adam steps per tensor (about 1-10 s on one core at 64x64)
BATCH = 16
LEARNING_RATE = 2e-3
INSTALL_TORCH = ("pip install torch --index-url https://download.pytorch.org/whl/cpu")


def torch_or_refuse():
    """torch, or a one-line error saying how to get it."""
    try:
        import torch
    except ImportError:
        raise WpkError(f"--attack conv trains a decoder with torch, which is not installed: "
                       f"{INSTALL_TORCH}") from None
    return torch


def conv_reconstruct(features: np.ndarray, inputs: np.ndarray, image: tuple[int, ...] | None,
                     train: np.ndarray, test: np.ndarray, steps: int = STEPS,
                     seed: int = 0) -> np.ndarray:
    """The test rows of `inputs` [n, d] as a decoder trained on the train rows predicts them
    from `features` [n, *tensor shape]; `image`: (Cin, H, W) when the input is one image."""
    torch = torch_or_refuse()
    torch.manual_seed(seed)
    x = features.reshape(len(features), -1).astype(np.float32)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    # values (nearly) constant over the training half carry nothing: left unscaled, so that a
    # saturated unit (a sigmoid at 1) does not become a huge input that derails training
    std = np.where(std > 1e-3 * (float(std.max()) or 1.0), std, 1.0)
    x = ((x - mean) / std).reshape(features.shape)
    y = inputs.astype(np.float32)
    y_mean, y_scale = y[train].mean(axis=0), float(y[train].std()) or 1.0
    y = (y - y_mean) / y_scale
    spatial = image is not None and features.ndim == 4
    net = _conv_decoder(torch, features.shape[1], image) if spatial \
        else _perceptron(torch, x[0].size, y.shape[1])
    xs = torch.from_numpy(np.ascontiguousarray(x if spatial else x.reshape(len(x), -1)))
    ys = torch.from_numpy(np.ascontiguousarray(y if not spatial else y.reshape((len(y),) + image)))
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    generator = np.random.default_rng(seed)
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.from_numpy(generator.choice(train, min(BATCH, len(train)),
                                                      replace=False))
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(net(xs[batch]), ys[batch])
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        guess = net(xs[torch.from_numpy(test)]).reshape(len(test), -1).numpy()
    guess = guess.astype(np.float64) * y_scale + y_mean
    # the attacker knows the inputs' range from the training half
    return np.clip(np.nan_to_num(guess), inputs[train].min(), inputs[train].max())


def _conv_decoder(torch, channels: int, image: tuple[int, ...]):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(channels, DECODER_WIDTH, 3, padding=1), nn.ReLU(),
        nn.Upsample(size=tuple(image[1:]), mode="bilinear", align_corners=False),
        nn.Conv2d(DECODER_WIDTH, DECODER_WIDTH, 3, padding=1), nn.ReLU(),
        nn.Conv2d(DECODER_WIDTH, image[0], 3, padding=1))


def _perceptron(torch, features: int, outputs: int):
    nn = torch.nn
    return nn.Sequential(nn.Linear(features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, outputs))
