"""Test-set evaluation and its report, and the trained model every tool looks at.

    checkpoint ─► model + the run's config ─► the training run's test loader and eval loop ─► logits
               ─► EvalReport: accuracy, top-5 accuracy, loss, per-class accuracy, confusion matrix

Metrics come from `eval_logits`, the loop training evaluates with too, so `vit-eval` reports
exactly the accuracy the run logged for the checkpoint. Files are written atomically: an error leaves no
half-written JSON or PNG behind. The per-image tools (predictions, attention) are in vit_train/predict.py, the
export for timm in vit_train/export.py.
"""
import json
import unicodedata
from dataclasses import asdict, dataclass

import ml_collections
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vit_train.checkpoint import load_checkpoint, write_atomically
from vit_train.data import build_loaders, saved_data_config
from vit_train.errors import UserError
from vit_train.models.vit import VisionTransformer
from vit_train.pretrained import load_pretrained
from vit_train.runtime import autocast, resolve_precision


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


def eval_loaders(config, device, split="test"):
    """Loaders whose .test is the test split exactly as training evaluated it: same data config, image size and
    batch size. The training split is not read (a damaged training image does not stop an evaluation), unless
    `split` is 'train': then .test holds the training images instead, unaugmented, seen as the test split is."""
    return build_loaders(config.data, img_size=config.img_size, batch_size=1, eval_batch_size=config.eval_batch_size,
                         device=device, seed=config.seed, with_train=False, eval_split=split)


def check_class_count(loaded: LoadedModel, dataset_class_names: list):
    if len(dataset_class_names) != len(loaded.class_names):
        raise UserError(f"the model has {len(loaded.class_names)} classes and the {loaded.config.data.name} test "
                        f"split {len(dataset_class_names)}; evaluate it on the dataset it was trained on (--dataset)")


# ---------------------------------------------------------------------------------------------------------------
# The evaluation loop, shared by training and vit-eval so that both report the same numbers.

@torch.no_grad()
def eval_logits(model, test_loader, device, precision, flip_average=False):
    """(float32 logits, targets) for each batch of this process's part of the test split.

    Deterministic: eval mode (no dropout), unaugmented images in a fixed order. vit-eval's metrics come from
    these too, so its accuracy is the one training logged. flip_average: the mean of the logits of each image and
    of its mirror image (test-time augmentation, twice the work; never what training logs).
    """
    was_training = model.training
    model.eval()
    try:
        for images, targets in test_loader.batches(0):
            with autocast(device, precision):
                logits = model(images)
                if flip_average:
                    logits = (logits + model(images.flip(-1))) / 2
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
    """Metrics over a split (the test split, or the training images: vit-eval --split train). Fractions in 0..1;
    confusion_matrix[true][predicted] counts images."""
    accuracy: float
    top5_accuracy: float
    loss: float
    per_class_accuracy: dict  # class name -> fraction, None for a class without test images
    confusion_matrix: list
    num_samples: int
    class_names: list
    flip_average: bool = False  # each image's logits averaged with its mirror image's
    split: str = "test"


def evaluate(model, loader, class_names, device, precision="auto", flip_average=False) -> EvalReport:
    """Evaluate `model` on every sample of `loader` (a vit_train.data EvalLoader) with training's eval loop;
    flip_average as eval_logits's."""
    num_classes = len(class_names)
    top_k = min(5, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # accumulated as training accumulates it
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)  # tensors: no GPU sync per batch
    for logits, targets in eval_logits(model, loader, device, resolve_precision(precision, device), flip_average):
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        confusion += torch.bincount(targets * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
        top5_correct += (logits.topk(top_k, dim=1).indices == targets[:, None]).any(dim=1).sum()
    report = report_from_counts(confusion.view(num_classes, num_classes).cpu(), top5_correct.item(),
                                loss_sum.item(), class_names)
    report.flip_average, report.split = flip_average, loader.split
    return report


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


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal: East Asian wide and full-width characters take two, combining marks
    none. len() counts characters, so a CJK class name would shift every column after it."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int) -> str:
    """`text` left-aligned in `width` terminal columns."""
    return text + " " * (width - display_width(text))


def format_report(report: EvalReport) -> str:
    """The report as plain-text tables: the totals, per-class accuracy, and the confusion matrix."""
    counts = report.confusion_matrix
    width = max(display_width(name) for name in ["class", *report.class_names])
    views = " (each image averaged with its mirror image: --flip-average)" if report.flip_average else ""
    split = "test" if report.split == "test" else "training (unaugmented)"
    lines = [f"{report.num_samples} {split} images: accuracy {report.accuracy:.4f}  top-5 accuracy "
             f"{report.top5_accuracy:.4f}  loss {report.loss:.4f}{views}", "",
             f"{'':>3}  {pad('class', width)}  accuracy  images"]
    for i, name in enumerate(report.class_names):
        accuracy = report.per_class_accuracy[name]
        shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
        lines.append(f"{i:>3}  {pad(name, width)}  {shown:>8}  {sum(counts[i]):>6}")
    lines.append("")
    if len(counts) > MAX_PRINTED_CLASSES:
        lines.append(f"confusion matrix: {len(counts)}x{len(counts)}, written by --json and drawn by --plot")
        return "\n".join(lines)
    cell = max(4, len(str(max(max(row) for row in counts))) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted class, by number)")
    lines.append(f"{'':>3}  {pad('', width)}" + "".join(f"{j:>{cell}}" for j in range(len(counts))))
    for i, (name, row) in enumerate(zip(report.class_names, counts)):
        lines.append(f"{i:>3}  {pad(name, width)}" + "".join(f"{n:>{cell}}" for n in row))
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
