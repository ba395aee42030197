"""What a trained model is looked at with: test-set metrics, predictions, attention maps, exported weights.

    checkpoint ─► model + the run's config ─► the training run's test loader and eval loop ─► logits
               ─► EvalReport: accuracy, top-5 accuracy, loss, per-class accuracy, confusion matrix
    image files ─► preprocess_images, as the test split is ─► model ─► top-k classes | attention rollout
    checkpoint ─► timm-named state dict + config JSON (timm.create_model loads it)

Metrics come from `eval_logits`, the loop training evaluates with too, so `vit-eval` reports
exactly the accuracy the run logged for the checkpoint. Files are written atomically: an error leaves no
half-written JSON, PNG or weights behind.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_collections
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms.v2.functional import pil_to_tensor

from vit_train.checkpoint import folder_write_error, load_checkpoint, save_checkpoint, write_atomically
from vit_train.data import build_loaders, load_rgb, normalization, preprocess_images, saved_data_config
from vit_train.errors import UserError
from vit_train.models.vit import VisionTransformer
from vit_train.pretrained import load_pretrained
from vit_train.runtime import autocast, device_constant, resolve_precision


# ---------------------------------------------------------------------------------------------------------------
# Models to evaluate.

@dataclass
class LoadedModel:
    """A model in eval mode with what it needs to see data as it was trained to: the run's config
    (img_size, data, precision, ...) and its class names, in label order."""
    model: VisionTransformer
    config: ml_collections.ConfigDict
    class_names: list


def load_trained_model(checkpoint_path, device, weights=None) -> LoadedModel:
    """The model of a vit-train checkpoint (a file, or a run directory for its last.pt), on `device`.

    weights: 'ema' for the run's weight average (optim.ema_decay), 'raw' for the optimizer's weights, None for
    the average when the run kept one and the raw weights otherwise.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    config = ml_collections.ConfigDict(checkpoint["config"])
    config.data = saved_data_config(checkpoint["config"]["data"])
    has_ema = bool(checkpoint.get("ema"))
    if weights == "ema" and not has_ema:
        raise UserError(f"{checkpoint_path} holds no EMA weights (the run had optim.ema_decay=0); use --weights raw")
    model = VisionTransformer(config.model, config.img_size, config.num_classes)
    model.load_state_dict(checkpoint["ema"] if has_ema and weights != "raw" else checkpoint["model"])
    return LoadedModel(model.to(device).eval(), config, list(checkpoint["class_names"]))


def load_pretrained_model(config, weights, class_names, device) -> tuple:
    """(LoadedModel, notes on what was adapted) for foreign weights (Google .npz, timm state dict) whose head
    already has one output per class: a model fine-tuned on this dataset elsewhere."""
    model = VisionTransformer(config.model, config.img_size, len(class_names))
    notes = load_pretrained(model, weights, new_head=False)
    return LoadedModel(model.to(device).eval(), config, list(class_names)), notes


def eval_loaders(config, device):
    """Loaders whose .test is the test split exactly as training evaluated it: same data config, image size and
    batch size. The training split is not read (a damaged training image does not stop an evaluation)."""
    return build_loaders(config.data, img_size=config.img_size, batch_size=1, eval_batch_size=config.eval_batch_size,
                         device=device, seed=config.seed, with_train=False)


def check_class_count(loaded: LoadedModel, dataset_class_names: list):
    if len(dataset_class_names) != len(loaded.class_names):
        raise UserError(f"the model has {len(loaded.class_names)} classes and the {loaded.config.data.name} test "
                        f"split {len(dataset_class_names)}; evaluate it on the dataset it was trained on (--dataset)")


# ---------------------------------------------------------------------------------------------------------------
# The evaluation loop, shared by training and vit-eval so that both report the same numbers.

@torch.no_grad()
def eval_logits(model, test_loader, device, precision):
    """(float32 logits, targets) for each batch of this process's part of the test split.

    Deterministic: eval mode (no dropout), unaugmented images in a fixed order. vit-eval's metrics come from
    these too, so its accuracy is the one training logged.
    """
    was_training = model.training
    model.eval()
    try:
        for images, targets in test_loader.batches(0):
            with autocast(device, precision):
                logits = model(images)
            yield logits.float(), targets
    finally:
        model.train(was_training)


def evaluate_model(model, test_loader, device, precision):
    """(mean cross-entropy, accuracy as a fraction) over the whole test split, summed over all processes;
    no label smoothing."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for logits, targets in eval_logits(model, test_loader, device, precision):
        totals[0] += F.cross_entropy(logits, targets, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == targets).sum()
        totals[2] += targets.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count


# ---------------------------------------------------------------------------------------------------------------
# Test-set metrics.

@dataclass
class EvalReport:
    """Metrics over a test split. Fractions in 0..1; confusion_matrix[true][predicted] counts images."""
    accuracy: float
    top5_accuracy: float
    loss: float
    per_class_accuracy: dict  # class name -> fraction, None for a class without test images
    confusion_matrix: list
    num_samples: int
    class_names: list


def evaluate(model, loader, class_names, device, precision="auto") -> EvalReport:
    """Evaluate `model` on every sample of `loader` (a vit_train.data EvalLoader) with training's eval loop."""
    num_classes = len(class_names)
    top_k = min(5, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # accumulated as training accumulates it
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)  # tensors: no GPU sync per batch
    for logits, targets in eval_logits(model, loader, device, resolve_precision(precision, device)):
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        confusion += torch.bincount(targets * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
        top5_correct += (logits.topk(top_k, dim=1).indices == targets[:, None]).any(dim=1).sum()
    return report_from_counts(confusion.view(num_classes, num_classes).cpu(), top5_correct.item(), loss_sum.item(),
                              class_names)


def report_from_counts(confusion, top5_correct, loss_sum, class_names) -> EvalReport:
    per_class_total = confusion.sum(dim=1).tolist()
    correct = confusion.diagonal().tolist()
    num_samples = sum(per_class_total)
    return EvalReport(
        accuracy=sum(correct) / num_samples,
        top5_accuracy=top5_correct / num_samples,
        loss=loss_sum / num_samples,
        per_class_accuracy={name: right / total if total else None
                            for name, right, total in zip(class_names, correct, per_class_total)},
        confusion_matrix=confusion.tolist(),
        num_samples=num_samples,
        class_names=list(class_names),
    )


MAX_PRINTED_CLASSES = 20  # a wider confusion matrix does not fit a terminal; it stays in --json and --plot


def format_report(report: EvalReport) -> str:
    """The report as plain-text tables: the totals, per-class accuracy, and the confusion matrix."""
    counts = report.confusion_matrix
    width = max(len("class"), *(len(name) for name in report.class_names))
    lines = [f"{report.num_samples} test images: accuracy {report.accuracy:.4f}  top-5 accuracy "
             f"{report.top5_accuracy:.4f}  loss {report.loss:.4f}", "",
             f"{'':>3}  {'class':<{width}}  accuracy  images"]
    for i, name in enumerate(report.class_names):
        accuracy = report.per_class_accuracy[name]
        shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
        lines.append(f"{i:>3}  {name:<{width}}  {shown:>8}  {sum(counts[i]):>6}")
    lines.append("")
    if len(counts) > MAX_PRINTED_CLASSES:
        lines.append(f"confusion matrix: {len(counts)}x{len(counts)}, written by --json and drawn by --plot")
        return "\n".join(lines)
    cell = max(4, len(str(max(max(row) for row in counts))) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted class, by number)")
    lines.append(f"{'':>3}  {'':<{width}}" + "".join(f"{j:>{cell}}" for j in range(len(counts))))
    for i, (name, row) in enumerate(zip(report.class_names, counts)):
        lines.append(f"{i:>3}  {name:<{width}}" + "".join(f"{n:>{cell}}" for n in row))
    return "\n".join(lines)


def write_json(report: EvalReport, path):
    write_atomically(path, lambda f: f.write((json.dumps(asdict(report), indent=2) + "\n").encode()))


def require_matplotlib():
    """Fail before any work when a plot is asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("drawing plots needs matplotlib: pip install 'vit-train[plot]'") from None


def plot_confusion_matrix(report: EvalReport, path):
    """A PNG of the confusion matrix, each row coloured by the fraction of its class, counts written in."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    counts = torch.tensor(report.confusion_matrix, dtype=torch.float64)
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(counts)
    side = max(5.0, 0.55 * n + 2) if n <= MAX_PRINTED_CLASSES else 12.0
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.subplots()
    shown = axes.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= MAX_PRINTED_CLASSES:
        axes.set_xticks(range(n), report.class_names, rotation=45, ha="right")
        axes.set_yticks(range(n), report.class_names)
        for (i, j), count in zip(torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), counts.flatten()):
            axes.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8,
                      color="white" if fractions[i, j] > 0.5 else "black")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{report.num_samples} test images, accuracy {report.accuracy:.2%}")
    figure.tight_layout()
    write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=120))


# ---------------------------------------------------------------------------------------------------------------
# Predictions on image files.

def read_image(path) -> torch.Tensor:
    """An image file of any size and format PIL reads, as uint8 (3, H, W) RGB."""
    return pil_to_tensor(load_rgb(str(path)))


def model_input(loaded: LoadedModel, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> the normalised (1, 3, S, S) batch the model takes, resized and normalised as the
    test split is."""
    device = next(loaded.model.parameters()).device
    return preprocess_images(image[None].to(device), loaded.config.data, loaded.config.img_size)


@torch.no_grad()
def predict(loaded: LoadedModel, image: torch.Tensor, top_k=5) -> list:
    """[(class name, probability), ...] for the top_k classes of one uint8 (3, H, W) image, most likely first."""
    return top_classes(loaded.model(model_input(loaded, image))[0], loaded.class_names, top_k)


def top_classes(logits: torch.Tensor, class_names: list, k: int) -> list:
    """[(class name, probability), ...] for the k most likely classes of one image's logits."""
    values, indices = logits.float().softmax(dim=0).topk(min(k, len(class_names)))
    return [(class_names[i], p) for i, p in zip(indices.tolist(), values.tolist())]


# ---------------------------------------------------------------------------------------------------------------
# Attention rollout (Abnar & Zuidema 2020): how much each input patch flows into the classifier's token.

def attention_rollout(attentions: list) -> torch.Tensor:
    """Per-layer attention probabilities [(B, heads, T, T), ...] -> rolled-out attention (B, T, T).

    Each layer's heads are averaged and the identity added for the residual connection (half of what reaches a
    token is the token itself), rows renormalised; the layers' matrices multiplied, first layer rightmost.
    """
    rollout = None
    for probs in attentions:
        layer = probs.float().mean(dim=1)
        layer = layer + torch.eye(layer.shape[-1], device=layer.device)
        layer = layer / layer.sum(dim=-1, keepdim=True)
        rollout = layer if rollout is None else layer @ rollout
    return rollout


@torch.no_grad()
def attention_map(model, images: torch.Tensor) -> tuple:
    """(logits, heat (B, grid, grid) in 0..1): the rollout from the classifier's input over the patches.

    The classifier reads the CLS token, or with classifier='gap' the mean of all tokens, so the heat is the CLS
    row, or the mean of the rows. Each map is stretched to 0..1: rollout values differ little between patches.
    """
    logits, attentions = model(images, return_attention=True)
    rollout = attention_rollout(attentions)
    rows = rollout[:, 0] if model.use_cls_token else rollout.mean(dim=1)
    heat = rows[:, model.num_prefix_tokens:].reshape(-1, model.grid_size, model.grid_size)
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    return logits, (heat - low) / (high - low).clamp(min=1e-12)


def jet(heat: torch.Tensor) -> torch.Tensor:
    """The 'jet' colour map, blue (0) to red (1), for a (H, W) map in 0..1 -> (3, H, W)."""
    centres = torch.tensor([3.0, 2.0, 1.0], device=heat.device).view(3, 1, 1)  # red, green and blue peaks
    return (1.5 - (4 * heat - centres).abs()).clamp(0, 1)


def attention_panel(image: torch.Tensor, heat: torch.Tensor, longer_side: int) -> torch.Tensor:
    """[image | image with the heat map blended over it], float (3, h, 2w) in 0..1, the image scaled so that its
    longer side is `longer_side` pixels. `image` is float (3, H, W) in 0..1; `heat` the (grid, grid) map, which
    covers the whole image, as the model saw it squeezed into its square input."""
    height, width = image.shape[-2:]
    scale = longer_side / max(height, width)
    size = (round(height * scale), round(width * scale))
    # Small images (CIFAR's 32 px) are enlarged pixel by pixel, so they look like what the model saw.
    mode = "nearest-exact" if scale > 1 else "bilinear"
    shown = F.interpolate(image[None], size, mode=mode, antialias=scale < 1)[0]
    heat = F.interpolate(heat[None, None], size, mode="bilinear", align_corners=False)[0, 0]
    return torch.cat([shown, 0.5 * shown + 0.5 * jet(heat)], dim=2)


def attention_figure(loaded: LoadedModel, image: torch.Tensor, longer_side=384) -> tuple:
    """(panel (3, h, 2w) float in 0..1, [(class, probability)] top 3) for one uint8 (3, H, W) image."""
    logits, heat = attention_map(loaded.model, model_input(loaded, image))
    panel = attention_panel(image.float().div(255).to(heat.device), heat[0], longer_side)
    return panel.cpu(), top_classes(logits[0], loaded.class_names, 3)


def attention_image(model, images: torch.Tensor, data_cfg, longer_side=96) -> torch.Tensor:
    """For TensorBoard: normalised test images (B, 3, S, S) -> one float (3, H, W) image in 0..1 with a row
    [image | attention rollout] per image. `SummaryWriter.add_image(tag, attention_image(...), step)`."""
    mean, std = (device_constant(v, images.device).view(1, 3, 1, 1) for v in normalization(data_cfg))
    was_training = model.training
    model.eval()
    try:
        _, heat = attention_map(model, images)
    finally:
        model.train(was_training)
    originals = (images * std + mean).clamp(0, 1)
    return torch.cat([attention_panel(x, h, longer_side) for x, h in zip(originals, heat)], dim=1).cpu()


def save_png(image: torch.Tensor, path):
    """Write a float (3, H, W) image in 0..1 as a PNG."""
    from PIL import Image

    pixels = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    write_atomically(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------------------------
# Export for inference: the state dict in timm's names, and our config beside it.

TIMM_ARCHITECTURE = "vit_base_patch16_224"  # any timm ViT name: the keyword arguments replace its sizes


def timm_arguments(loaded: LoadedModel) -> dict:
    """`timm.create_model` keyword arguments that build the same network, or a UserError saying why timm's
    VisionTransformer cannot: it has no ResNet stem of ours and no pre-logits layer."""
    model_cfg = loaded.config.model
    name = loaded.config.model_name
    if model_cfg.resnet is not None:
        raise UserError(f"{name} has a ResNet stem, which timm's VisionTransformer cannot hold; export a plain ViT")
    if model_cfg.representation_size:
        raise UserError(f"{name} has a pre-logits layer (representation_size), which timm's VisionTransformer "
                        "lacks; export a model trained with representation_size=None")
    mlp_ratio = model_cfg.transformer.mlp_dim / model_cfg.hidden_size
    if int(model_cfg.hidden_size * mlp_ratio) != model_cfg.transformer.mlp_dim:
        raise UserError(f"{name}: timm derives the MLP width as int(hidden_size x mlp_ratio), which cannot give "
                        f"mlp_dim {model_cfg.transformer.mlp_dim} exactly; export a model with another mlp_dim")
    token = model_cfg.classifier == "token"
    return {
        "img_size": loaded.config.img_size, "patch_size": model_cfg.patches.size[0],
        "num_classes": len(loaded.class_names), "embed_dim": model_cfg.hidden_size,
        "depth": model_cfg.transformer.num_layers, "num_heads": model_cfg.transformer.num_heads,
        "mlp_ratio": mlp_ratio, "qkv_bias": True, "class_token": token, "global_pool": "token" if token else "avg",
        # With global_pool='avg' timm would pool before its final LayerNorm; ours normalises, then pools.
        "fc_norm": False,
    }


def export(loaded: LoadedModel, out) -> Path:
    """Write the weights to `out` (a timm-loadable state dict) and our config to `out` with suffix .json.

    The JSON's "timm" entry is the `timm.create_model(**entry)` call that builds the network and loads `out`.
    It names the weights by their file name, relative to the JSON, so that the pair can move together; timm opens
    that name from the working directory (from elsewhere, prefix the JSON's folder: docs/evaluate.md). Its
    preprocessing keys make timm's resolve_data_config + create_transform feed the model what vit-train does
    (preprocess_images): the whole image squashed to img_size x img_size (crop_pct 1, crop_mode 'squash'),
    bilinear, normalised. Returns the JSON's path.
    """
    out = Path(out)
    config_path = out.with_suffix(".json")
    if config_path == out:
        raise UserError(f"--out {out} would hold both the weights and their config; give the weights a .pth name")
    for path in (out, config_path):
        check_writable(path)
    mean, std = normalization(loaded.config.data)
    size = loaded.config.img_size
    card = {
        "model_name": loaded.config.model_name,
        "model": loaded.config.model.to_dict(),
        "img_size": size,
        "class_names": loaded.class_names,
        "normalization": {"mean": list(mean), "std": list(std)},
        "timm": {"model_name": TIMM_ARCHITECTURE, "pretrained": True,
                 # timm reads the file named here; num_classes stops it from dropping the head as foreign
                 "pretrained_cfg_overlay": {"file": out.name, "num_classes": len(loaded.class_names),
                                            "mean": list(mean), "std": list(std), "input_size": [3, size, size],
                                            "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"},
                 **timm_arguments(loaded)},
    }
    state_dict = {key: value.detach().cpu().contiguous() for key, value in loaded.model.state_dict().items()}
    # The pair changes together: the small card first, put back as it was if the weights cannot be written.
    previous_card = config_path.read_bytes() if config_path.exists() else None
    write_atomically(config_path, lambda f: f.write((json.dumps(card, indent=2) + "\n").encode()))
    try:
        save_checkpoint(state_dict, out)
    except UserError:
        if previous_card is None:
            config_path.unlink()
        else:
            write_atomically(config_path, lambda f: f.write(previous_card))
        raise
    return config_path


# ---------------------------------------------------------------------------------------------------------------

def check_writable(path):
    """Fail before any work is done when `path` cannot be written: its folder is missing or read-only, or it is a
    folder itself."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: the folder {folder} does not exist; create it or choose another path")
    if Path(path).is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    if why := folder_write_error(folder):
        raise UserError(f"cannot write {path}: the folder {folder} is not writable ({why}); choose another path")
