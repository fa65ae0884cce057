"""Model registry: `build(name, num_classes)` returns a plain nn.Module that knows nothing of DDP.

A name is one of ours (`fastnet`, ...), `torchvision:NAME` (any classification model in torchvision's
registry, untrained), or `MODULE:NAME`: MODULE is imported, and registers NAME with `@register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 conv whose first c_in filters start as the identity (Dirac), so a fresh net passes its input on."""
    conv = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a fixed scale of 1: only the bias (the shift) is a trained parameter."""
    bn = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)  # the next conv is scale-invariant anyway; a trained scale only adds noise
    return bn


class ConvGroup(nn.Sequential):
    """conv -> maxpool -> BN -> activation -> conv -> BN -> activation: one resolution stage of the fast net."""

    def __init__(self, c_in: int, c_out: int, activation: type[nn.Module] = nn.GELU):
        super().__init__(
            conv3x3(c_in, c_out),
            nn.MaxPool2d(2),
            batch_norm(c_out),
            activation(),
            conv3x3(c_out, c_out),
            batch_norm(c_out),
            activation(),
        )


class FastNet(nn.Module):
    """A small VGG-like net after Keller Jordan's airbench (the fastest published CIFAR-10 recipe).

    A 2x2 patch convolution (the "whitening" layer, which the trainer may initialise from data)
    feeds three conv groups that halve the resolution; a global max-pool and a scaled linear head
    finish it. The default widths are airbench94's; `fastnet_small` is a quarter of the width.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256),
                 activation: type[nn.Module] = nn.GELU):
        super().__init__()
        whiten_width = 2 * 3 * 2 * 2  # 12 whitening filters and their negatives
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_whitening, then fixed
        self.layers = nn.Sequential(
            ConvGroup(whiten_width, widths[0], activation),
            ConvGroup(widths[0], widths[1], activation),
            ConvGroup(widths[1], widths[2], activation),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = 1 / 9  # airbench's logit temperature: keeps early logits small

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 patch filters to the eigenvectors of the patch covariance of `images`.

        `images` is a normalised float batch (N, 3, 32, 32). Half the filters are the scaled
        eigenvectors, the other half their negatives, so GELU passes both signs.
        """
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, 3, 31, 31, 2, 2
        patches = patches.transpose(1, 3).reshape(-1, 3 * 2 * 2)
        patches = patches - patches.mean(0, keepdim=True)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).reshape(-1, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.layers(x)
        x = x.amax(dim=(2, 3))  # global max-pool; unlike adaptive_max_pool2d, its CUDA backward is deterministic
        return self.head(x) * self.scale


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs: 3x3 stem with stride 1 and no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {}  # name -> builder(num_classes=...)


def register(name: str) -> Callable:
    """Decorator: register a model builder, called as `builder(num_classes=N)`, under `name`.

        @register("mynet")
        def mynet(num_classes: int = 10) -> nn.Module: ...
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"a model named {name!r} is already registered; choose another name")
        MODELS[name] = builder
        return builder

    return decorate


register("fastnet")(FastNet)
register("fastnet_small")(lambda num_classes=10: FastNet(num_classes, widths=(32, 64, 128)))
register("fastnet_silu")(lambda num_classes=10: FastNet(num_classes, activation=nn.SiLU))  # hiverge's groups
register("resnet18")(resnet18)

NAME_HELP = ("one of: " + ", ".join(MODELS) + "; torchvision:NAME for any torchvision classification model "
             "(e.g. torchvision:resnet50); MODULE:NAME for a model that MODULE registers with @ddp.models.register")


def find_builder(name: str, *, recorded: bool = False) -> Callable[..., nn.Module]:
    """The builder for a model name; ValueError with what to do when there is none.

    recorded: the name comes from a file, not from the user, so it may not import a module: a file never
    chooses what code runs.
    """
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"model name {str(name)[:40]!r} is not a name; pass --model NAME")
    module, sep, short = name.rpartition(":")
    if not sep:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; {NAME_HELP}")
        return MODELS[name]
    if module == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classification models only
        if short not in known:
            raise ValueError(f"{short!r} is not a torchvision classification model; choose one of "
                             f"torchvision.models.list_models(module=torchvision.models), e.g. resnet18, vit_b_16")
        return lambda num_classes=10: torchvision.models.get_model(short, weights=None, num_classes=num_classes)
    if recorded and short in MODELS:  # the user's own code registered it already
        return MODELS[short]
    if recorded:
        raise ValueError(f"the checkpoint records model {name!r}, which would import module {module!r}; a file never "
                         f"chooses what gets imported: pass --model {name} if you trust that module")
    try:
        importlib.import_module(module)  # registers its models
    except ImportError as e:
        raise ValueError(f"--model {name}: cannot import module {module!r} ({e}); run from the directory "
                         "that holds it, or add that directory to PYTHONPATH") from None
    if short not in MODELS:
        raise ValueError(f"module {module!r} registers no model {short!r}; decorate its builder with "
                         f"@ddp.models.register({short!r})")
    return MODELS[short]


def build(name: str, num_classes: int = 10, *, recorded: bool = False) -> nn.Module:
    """Build a model by name (see the module docstring), untrained, with `num_classes` outputs.

    recorded=True for a name read from a checkpoint: it may name a registered model, never a module to import.
    """
    return find_builder(name, recorded=recorded)(num_classes=num_classes)
