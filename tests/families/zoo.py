"""A zoo of small model families (each under 1M parameters, seeded, built in-process, nothing downloaded).

The shapes people bring: a decoder LM whose head is its embedding, a BERT-style encoder (packed QKV),
a ResNet-style CNN with BatchNorm and 1x1 shortcuts, a MobileNet-style depthwise-separable CNN,
multi-layer bidirectional LSTM and GRU, a Conv1d audio stack, a ConvTranspose decoder, one block
shared across depth and an RNN cell shared across time, a ViT with a patch convolution. BatchNorm
statistics are randomised so that folding them is not a no-op.

`FAMILIES[name](batch=2)` returns `(model in eval mode, example inputs)`; `bench/families.py` and
`tests/families/test_families.py` use the same builders.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 1000


def _seeded(build: Callable[[int], tuple[nn.Module, tuple]]) -> Callable[..., tuple[nn.Module, tuple]]:
    def make(batch: int = 2):
        torch.manual_seed(0)
        model, inputs = build(batch)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        return model.eval(), inputs
    make.__name__ = build.__name__
    return make


def _distinct_layers(encoder: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """`nn.TransformerEncoder` deep-copies one layer: give each copy its own initial weights (as training
    would), or the toolkit would rightly store the identical copies once."""
    for layer in encoder.layers:
        for m in layer.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if reset is not None and m is not layer:
                reset()
    return encoder


def _tokens(batch: int = 2, length: int = 16) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, length)),)


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class DecoderLM(nn.Module):
    """GPT-style: token + position embeddings, causal blocks, the head tied to the token embedding."""

    def __init__(self, dim: int = 128, layers: int = 2, context: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim, 4) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Encoder(nn.Module):
    """BERT-style: embeddings, post-norm encoder layers with packed QKV (`in_proj_weight`), a [CLS] head."""

    def __init__(self, dim: int = 128, layers: int = 2, context: int = 64, classes: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(context, dim)
        self.norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = _distinct_layers(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False))
        self.cls = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        return self.cls(self.encoder(x)[:, 0])


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:  # a small 1x1 convolution (cin * cout weights)
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(Residual(32, 32, 1), Residual(32, 64, 2), Residual(64, 96, 2))
        self.fc = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise 3x3 (small: stays dense), pointwise 1x1, BatchNorm, ReLU6."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 128, 256, 256)):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU6()]
        for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
            stride = 2 if i % 2 else 1
            layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                       nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class RecurrentLM(nn.Module):
    """Embedding, a 2-layer bidirectional LSTM or GRU, a linear head."""

    def __init__(self, cell: str = "lstm", dim: int = 64, hidden: int = 96):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out)


class AudioConv1d(nn.Module):
    """A Conv1d stack over a waveform: strided convolutions, BatchNorm1d, GELU, pooled classifier."""

    def __init__(self, classes: int = 12):
        super().__init__()
        chans = (1, 32, 64, 96, 128, 128)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv1d(cin, cout, 5, 2, 2, bias=False), nn.BatchNorm1d(cout), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], classes)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(wave).mean(2))


class ConvTransposeDecoder(nn.Module):
    """A DCGAN-style generator: latent -> linear -> ConvTranspose2d + BatchNorm + ReLU -> image."""

    def __init__(self, latent: int = 64):
        super().__init__()
        self.fc = nn.Linear(latent, 128 * 4 * 4)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(128, 96, 4, 2, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU(),
            nn.ConvTranspose2d(96, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 3, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(z).reshape(-1, 128, 4, 4))


class SharedWeights(nn.Module):
    """One transformer-style block applied at every depth (ALBERT-style) and a GRU cell unrolled over time."""

    def __init__(self, dim: int = 160, depth: int = 4, steps: int = 6, classes: int = 10):
        super().__init__()
        self.steps = steps
        self.inp = nn.Linear(32, dim)
        self.cell = nn.GRUCell(dim, dim)
        self.block = CausalBlock(dim, 4)
        self.depth = depth
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.inp(x)  # [batch, steps, dim]
        h = seq.new_zeros(seq.shape[0], seq.shape[2])
        states = []
        for t in range(self.steps):  # the same cell weights at every time step
            h = self.cell(seq[:, t], h)
            states.append(h)
        y = torch.stack(states, 1)
        for _ in range(self.depth):  # the same block weights at every depth
            y = self.block(y)
        return self.out(y.mean(1))


class ViT(nn.Module):
    """A vision transformer: a patch convolution, a class token, position embeddings, encoder layers."""

    def __init__(self, dim: int = 128, patch: int = 4, image: int = 32, layers: int = 3, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = _distinct_layers(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


@_seeded
def decoder_lm(batch: int):
    return DecoderLM(), _tokens(batch)


@_seeded
def bert_encoder(batch: int):
    return Encoder(), _tokens(batch)


@_seeded
def resnet_bn(batch: int):
    return ResNet(), (torch.rand(batch, 3, 32, 32),)


@_seeded
def depthwise_cnn(batch: int):
    return DepthwiseSeparable(), (torch.rand(batch, 3, 32, 32),)


@_seeded
def lstm_bidir(batch: int):
    return RecurrentLM("lstm"), _tokens(batch)


@_seeded
def gru_bidir(batch: int):
    return RecurrentLM("gru"), _tokens(batch)


@_seeded
def audio_conv1d(batch: int):
    return AudioConv1d(), (torch.rand(batch, 1, 4000) * 2 - 1,)


@_seeded
def convtranspose_decoder(batch: int):
    return ConvTransposeDecoder(), (torch.randn(batch, 64),)


@_seeded
def shared_weights(batch: int):
    return SharedWeights(), (torch.randn(batch, 6, 32),)


@_seeded
def vit_patch(batch: int):
    return ViT(), (torch.rand(batch, 3, 32, 32),)


FAMILIES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    f.__name__: f for f in (decoder_lm, bert_encoder, resnet_bn, depthwise_cnn, lstm_bidir, gru_bidir,
                            audio_conv1d, convtranspose_decoder, shared_weights, vit_patch)
}


def parameters(model: nn.Module) -> int:
    """Parameters, each shared one once."""
    return sum(p.numel() for p in model.parameters())
