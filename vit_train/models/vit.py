"""The Vision Transformer of Dosovitskiy et al. 2020, equations 1–4.

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos                  (1)  PatchEmbedding, cls_token, pos_embed
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                                 (2)  Block: norm1, attn
    z_l  = MLP(LN(z'_l)) + z'_l                                       (3)  Block: norm2, mlp
    y    = LN(z_L^0)                                                  (4)  norm, then the classifier head

Parameter names follow timm's `VisionTransformer` (`patch_embed.proj`, `blocks.N.attn.qkv`, ...) so that a
state dict moves between the two without renaming. Query, key and value share one Linear: one GEMM instead of
three, which matters on every device.
"""
import math

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from vit_train.models.configs import apply_overrides, check_config, get_config
from vit_train.models.resnet import ResNetV2

LAYER_NORM_EPS = 1e-6  # as in the original Flax code (HF's 1e-12 default differs)


class Dropout(nn.Module):
    """Inverted dropout whose mask is cheap to draw on the CPU.

    On the CPU `F.dropout` draws one Bernoulli sample per element from a serial generator, and in a small ViT
    that costs more than the matmuls. Here one 64-bit draw gives four 16-bit integers, each compared with a
    threshold: `p` is rounded to a multiple of 1/65536 (off by < 1e-5) and kept values are scaled by
    1/(1 - rounded p), so the expectation is exactly the input's. The comparison writes the scaled mask
    (0 or 1/(1-p)) directly, so applying it forwards and backwards is one multiplication each. Other devices use
    `F.dropout`, whose fused kernels are already fast.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536)  # drop where a uniform 16-bit integer (0..65535) falls below this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        uniform16 = words.view(torch.int16)[: x.numel()].view(x.shape)  # -32768..32767, uniform
        # 0-dim tensors of x's dtype, so that a bf16 activation stays bf16
        dropped, kept = x.new_zeros(()), x.new_full((), 65536 / (65536 - self.threshold))
        return x * torch.where(uniform16 < self.threshold - 32768, dropped, kept)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016), as DeiT trains ViTs: in training, each sample skips the residual
    branch with probability p, and the kept branches are scaled by 1/(1 - p) so the expectation is unchanged;
    in evaluation the branch always counts, unscaled. One draw per sample, from torch's generator (which
    checkpoints save, so a resumed run draws the same)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return branch
        keep = torch.rand((branch.shape[0],) + (1,) * (branch.ndim - 1), device=branch.device) >= self.p
        return branch * keep.to(branch.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbedding(nn.Module):
    """Cut the image into P×P patches and project each linearly to D dims: a convolution with kernel = stride = P."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D), patches in raster order


class MultiHeadSelfAttention(nn.Module):
    """softmax(Q Kᵀ / √d_head) V for each head, then the output projection."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout_rate: float, dropout_rate: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout_rate = attention_dropout_rate
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj_drop = Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        probs = None
        # Written out when the probabilities are returned (the fused kernel never materialises them), and in bf16 on
        # a CPU, where torch's fused kernel is slower than in fp32 and than these two products (docs/results.md,
        # "bf16 on a CPU: the attention written out").
        if return_attention or (q.device.type == "cpu" and q.dtype == torch.bfloat16):
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)   # the softmax in fp32
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out = F.dropout(probs, dropout_p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj_drop(self.proj(out)), probs if return_attention else None


class MLP(nn.Module):
    """Two layers with a GELU between: Linear → GELU → Dropout → Linear → Dropout."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout_rate)
        self.fc2 = nn.Linear(mlp_dim, hidden_size)
        self.drop2 = Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One encoder layer: pre-LayerNorm attention and MLP, each with a residual (equations 2 and 3)."""

    def __init__(self, config: ml_collections.ConfigDict, drop_path_rate: float = 0.0):
        super().__init__()
        t = config.transformer
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = MultiHeadSelfAttention(config.hidden_size, t.num_heads, t.attention_dropout_rate, t.dropout_rate)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = MLP(config.hidden_size, t.mlp_dim, t.dropout_rate)
        self.drop_path = DropPath(drop_path_rate)  # no parameters: state dicts stay timm's and the original's

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        attended, probs = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, probs


class VisionTransformer(nn.Module):
    """ViT classifier for `img_size`×`img_size` images; `model(images)` returns logits (B, num_classes).

    `model(images, return_attention=True)` also returns each layer's attention probabilities,
    a list of (B, heads, tokens, tokens) tensors, with the same logits.
    """

    def __init__(self, config: ml_collections.ConfigDict, img_size: int = 32, num_classes: int = 10):
        super().__init__()
        check_config(config, img_size)
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        hidden_size = config.hidden_size
        patch_size = config.patches.size[0]

        if config.resnet is not None:
            self.stem = ResNetV2(config.resnet.num_layers, config.resnet.width_factor)
            in_channels, feature_size = self.stem.out_channels, img_size // self.stem.downsample
        else:
            self.stem = nn.Identity()
            in_channels, feature_size = 3, img_size
        self.patch_size = patch_size
        self.grid_size = feature_size // patch_size
        num_patches = self.grid_size**2
        self.patch_embed = PatchEmbedding(in_channels, hidden_size, patch_size)
        self.use_cls_token = config.classifier == "token"
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if self.use_cls_token else None
        self.num_prefix_tokens = int(self.use_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, hidden_size))
        # Configs saved before the key existed have learned position embeddings, as the paper.
        self.fixed_position_embedding = config.get("position_embedding", "learned") == "sincos2d"
        # A fixed embedding stays a (frozen) parameter named pos_embed: the state dict is the same as ever, and
        # an exported model loads into timm, which learns its copy from there if trained further.
        self.pos_embed.requires_grad_(not self.fixed_position_embedding)
        self.pos_drop = Dropout(config.transformer.dropout_rate)
        self.patch_dropout = config.get("patch_dropout", 0.0)  # absent from configs saved before it existed
        depth = config.transformer.num_layers
        # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last (DeiT, timm).
        # Configs saved before the key existed have none: no stochastic depth.
        top_rate = config.transformer.get("drop_path_rate", 0.0)
        self.blocks = nn.ModuleList(Block(config, top_rate * i / max(depth - 1, 1)) for i in range(depth))
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        if config.representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(hidden_size, config.representation_size), nn.Tanh())
            head_in = config.representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = hidden_size
        self.head = nn.Linear(head_in, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The original Flax initialisation: Xavier-uniform Linear layers, LeCun-normal patch projection,
        N(0, 0.02) position embeddings, zero CLS token and a zero head (so a fresh model predicts uniformly).
        Fixed position embeddings are the sine-cosine grid (zero for the CLS token); mimetic attention replaces
        the Xavier query, key, value and projection weights."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("attn.qkv"):
                    for third in module.weight.chunk(3):  # q, k and v are separate D×D maps in the original
                        nn.init.xavier_uniform_(third)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if ".mlp." in name:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
        fan_in = self.patch_embed.proj.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1 / fan_in) / 0.87962566103423978)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.fixed_position_embedding:
            self.pos_embed[:, self.num_prefix_tokens:] = sincos_position_grid(self.grid_size, self.pos_embed.shape[2])
        else:
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.config.get("attention_init", "xavier") == "mimetic":  # configs saved before the key: xavier
            for block in self.blocks:
                mimetic_attention_init_(block.attn)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Equation 1: patch embeddings, the CLS token in front, plus position embeddings.

        Images of another size than img_size (training at a lower resolution first, as a time-budget recipe
        may) get the position embeddings resized to their grid, as the paper does for fine-tuning at a higher
        resolution; at img_size they are used as they are."""
        features = self.stem(images)
        x = self.patch_embed(features)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        grid = features.shape[-1] // self.patch_size
        pos_embed = self.pos_embed
        if grid != self.grid_size:
            pos_embed = resize_position_grid(pos_embed, self.num_prefix_tokens, grid)
        return self.pos_drop(self.drop_patches(x + pos_embed))

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch dropout (Liu et al. 2023, "PatchDropout"): in training, each image keeps a random subset of its
        patch tokens, each with its own position embedding, and the CLS token. Attention and MLP costs shrink
        with the sequence, so a step is that much cheaper; evaluation sees every patch, and the network is the
        plain ViT."""
        if not self.training or self.patch_dropout == 0:
            return x
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        keep = max(1, round(patches.shape[1] * (1.0 - self.patch_dropout)))
        kept = torch.rand(patches.shape[:2], device=x.device).argsort(dim=1)[:, :keep]
        patches = patches.gather(1, kept[:, :, None].expand(-1, -1, patches.shape[2]))
        return torch.cat([prefix, patches], dim=1)

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        x = self.embed(images)
        attention = []
        for block in self.blocks:
            x, probs = block(x, return_attention)
            attention.append(probs)
        x = self.norm(x)
        features = x[:, 0] if self.use_cls_token else x.mean(dim=1)
        logits = self.head(self.pre_logits(features))
        return (logits, attention) if return_attention else logits


@torch.no_grad()
def mimetic_attention_init_(attention: MultiHeadSelfAttention, qk=(0.7, 0.7), vo=(0.4, 0.4)):
    """Mimetic initialisation (Trockman & Kolter 2023): each head's W_q W_kᵀ ≈ a·Z + b·I and the layer's
    W_v W_proj ≈ a·Z - b·I, with Z ~ N(0, 1/D) and (a, b) as the paper. Trained ViTs have these products; started
    there, a head attends to tokens like its own, so with position embeddings that are alike for neighbouring
    patches (sincos2d) attention begins local, like a convolution, and learns faster on small datasets. Each
    product is factored by SVD (truncated to the head's rank for W_q W_kᵀ); biases stay zero."""
    width, head_dim = attention.proj.weight.shape[0], attention.head_dim
    query, key, value = attention.qkv.weight.chunk(3)  # (D, D) views; row r computes output feature r

    def factors(scale, identity, rank):
        """L (D, rank), R (rank, D) with L @ R the best rank-`rank` approximation of scale·Z + identity·I."""
        target = scale * torch.randn(width, width) / math.sqrt(width) + identity * torch.eye(width)
        u, s, vh = torch.linalg.svd(target)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]

    for head in range(attention.num_heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        left, right = factors(qk[0], qk[1], head_dim)  # scores: x W_qᵀ (x W_kᵀ)ᵀ = x (W_qᵀ W_k) xᵀ
        query[rows] = left.T
        key[rows] = right
    left, right = factors(vo[0], -vo[1], width)  # the value path: x W_vᵀ W_projᵀ
    value.copy_(left.T)
    attention.proj.weight.copy_(right.T)


def sincos_position_grid(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (grid*grid, width), as "Better plain ViT baselines for
    ImageNet-1k" (Beyer et al. 2022) uses: a quarter of the channels each for sin and cos of the column and of
    the row, at frequencies 1/temperature^(k/(width/4 - 1)), so nearby patches get similar embeddings from the
    first step, where learned ones start as noise."""
    quarter = width // 4
    frequencies = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                   indexing="ij")
    angles_x = columns.flatten()[:, None] * frequencies[None]
    angles_y = rows.flatten()[:, None] * frequencies[None]
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1).float()


def resize_position_grid(pos_embed: torch.Tensor, num_prefix_tokens: int, grid: int) -> torch.Tensor:
    """Position embeddings (1, prefix + g*g, D) for a grid x grid patch grid: the g x g patch rows resampled
    bilinearly (no antialias, as timm's loader of Google's checkpoints), the prefix (CLS) rows unchanged."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(patches.shape[1] ** 0.5))
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def create_model(name: str, img_size: int = 32, num_classes: int = 10, **overrides) -> nn.Module:
    """A freshly initialised ViT for the named config, with flat overrides such as `patch_size=4`."""
    return VisionTransformer(apply_overrides(get_config(name), **overrides), img_size, num_classes)
