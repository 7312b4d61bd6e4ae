"""LoRA adapters through `peft` (pip install 'cairn-lm[finetune]'): add them, count them, merge them.

Adapters are put into the model in place (`peft.inject_adapter_in_model`): the model stays a cairn
`Transformer`, each targeted linear becomes peft's LoRA linear, whose frozen weight is
`<layer>.base_layer.weight` and whose adapters are `<layer>.lora_A.default.weight` and
`.lora_B.default.weight`. Checkpoints hold that state dict (frozen weights and adapters), so a
LoRA run loads, resumes, evaluates and generates as any run. `merge` folds the adapters into the
plain linears (W + alpha/r * B A): the model is then a plain `Transformer` that needs no peft.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TypeVar

import torch.nn as nn

from cairn.util.errors import CairnError, option

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)  # adapters go in and out in place: the model keeps its class


def _peft() -> ModuleType:
    try:
        import peft
    except ImportError:
        raise CairnError("LoRA needs the peft library: pip install 'cairn-lm[finetune]'") from None
    return peft


def linear_names(model: nn.Module) -> list[str]:
    """The names a LoRA target can match: each linear layer's last name, once."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def targets(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def add_adapters(model: M, rank: int, alpha: float, target_spec: str) -> M:
    """Put rank-`rank` adapters on the named linears of `model` (in place) and freeze the rest;
    a target that matches no layer is refused, listing the layers' names."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    # by default every linear of the blocks (attention and MLP), not the embedding or the head
    wanted = targets(target_spec) or [n for n in linears if n.startswith("blocks.")]
    unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linears)]
    if unmatched:
        raise CairnError(f"{option('lora.lora_targets')} {', '.join(unmatched)}: no linear layer of this model is "
                         "named so; its "
                         f"layers are named {', '.join(linear_names(model))}")
    peft = _peft()
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=wanted, bias="none")
    model = peft.inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge(model: M) -> M:
    """The adapters folded into their linears, which become plain nn.Linear again (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
