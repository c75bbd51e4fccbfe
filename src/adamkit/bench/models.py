"""Networks used by the workloads (plain ``torch.nn``; no torchvision)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network with optional dropout after every hidden layer."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits: conv16-conv32 (3x3, ReLU), 2x2 max pool, linear 512 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


class BagOfWords(nn.Module):
    """Linear bag-of-words classifier: the logits are the sum of the tokens' rows of one table.

    The table (``embedding``, vocab x classes, zero-initialised) is the only parameter, so with
    ``sparse=True`` every gradient is sparse (only the rows of the batch's tokens), which SparseAdam,
    Adagrad and plain SGD accept; ``set_sparse`` switches an existing model.
    """

    def __init__(self, vocab_size: int, num_classes: int, sparse: bool = False):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, num_classes, mode="sum", sparse=sparse)
        nn.init.zeros_(self.embedding.weight)

    def set_sparse(self, sparse: bool) -> None:
        self.embedding.sparse = sparse

    def forward(self, tokens):
        return self.embedding(tokens)


class KingmaBaCNN(nn.Module):
    """Kingma & Ba (2015) §6.3 CIFAR-10 network c64-c64-c128-1000.

    Three stages of 5x5 convolution (64, 64, 128 filters, ReLU) each followed by 3x3 max pooling
    with stride 2, then a fully connected layer of 1000 ReLU units and the 10-way output. The paper
    applies dropout to the input and the fully connected layer; the rates are not given, so this uses
    0.2 on the input and 0.5 on the fully connected layer. (The paper also whitens the inputs; here
    inputs are normalised per channel.)
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.input_dropout = nn.Dropout(0.2)
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.conv3 = nn.Conv2d(64, 128, 5, padding=2)
        self.fc = nn.Linear(128 * 4 * 4, 1000)
        self.fc_dropout = nn.Dropout(0.5)
        self.head = nn.Linear(1000, num_classes)

    def forward(self, x):
        x = self.input_dropout(x)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), kernel_size=3, stride=2, padding=1)  # 32 -> 16 -> 8 -> 4
        x = self.fc_dropout(F.relu(self.fc(x.flatten(1))))
        return self.head(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) in its CIFAR form: 3x3 stem, no stem pooling, stages 64-128-256-512."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Small decoder-only character language model (GPT-style, learned positions, untied head)."""

    def __init__(self, vocab_size: int, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * layers))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        return self.head(self.ln(self.blocks(x)))


INITS = ("default", "xavier", "kaiming", "orthogonal")


def apply_init(model: nn.Module, scheme: str, generator: torch.Generator | None = None) -> int:
    """Re-initialise the weights of every Linear and Conv layer; biases become zero.

    ``default`` keeps the model's own initialisation. ``xavier`` is Glorot-uniform, ``kaiming`` is
    He-normal for ReLU (fan-in), ``orthogonal`` is an orthogonal matrix (of the weight flattened to
    2-D). Embeddings and normalisation layers keep their initialisation. Returns the number of layers
    re-initialised.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "default":
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        weight = module.weight
        with torch.no_grad():  # drawn on the CPU from ``generator``, then copied to the weight's device
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
            if scheme == "xavier":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                values = torch.empty(weight.shape).uniform_(-bound, bound, generator=generator)
            elif scheme == "kaiming":
                values = torch.empty(weight.shape).normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            else:
                rows, columns = weight.shape[0], weight.numel() // weight.shape[0]
                flat = torch.randn(max(rows, columns), min(rows, columns), generator=generator)
                q, r = torch.linalg.qr(flat)  # orthonormal columns
                q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
                values = (q if rows >= columns else q.T).reshape(weight.shape)
            weight.copy_(values)
            if module.bias is not None:
                module.bias.zero_()
        count += 1
    return count
