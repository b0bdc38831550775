"""How each diffusers denoiser is called, class labels, and classifier-free guidance.

Everything that runs a denoiser on (x_t, t) goes through `model_forward` / `predict_eps`, with an
optional conditioning dict `cond` of batch-aligned tensors:
- `{"class_labels": LongTensor(N)}` for class-conditional `UNet2DModel` (class embedding table,
  `num_class_embeds`) and `DiTTransformer2DModel` (adaLN label embedding);
- `{"encoder_hidden_states": Tensor(N, L, D)}` for `UNet2DConditionModel` (cross-attention).

Text-conditioned models take stored encoder states (`--prompt-embeds FILE.safetensors`: tensor
`encoder_hidden_states` (P, L, D), image i uses prompt i mod P, and for guidance
`negative_encoder_hidden_states` (1 or P, L, D), e.g. the empty prompt's states); gacq does not
run text encoders itself.

The null (unconditional) label used by classifier-free guidance is the embedding row after the
real classes: DiT's `LabelEmbedding` has `num_embeds_ada_norm + 1` rows when trained with label
dropout, the last one the null class; gacq's class-conditional UNets follow the same convention
(`num_class_embeds` = classes + 1, the last row the null label).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import GacqError

Cond = dict[str, torch.Tensor]


def _cls(model: nn.Module) -> str:
    return type(getattr(model, "_orig_mod", model)).__name__  # torch.compile wraps the model


def _dit_label_table(model: nn.Module) -> nn.Embedding | None:
    from diffusers.models.embeddings import LabelEmbedding

    return next((m.embedding_table for m in model.modules() if isinstance(m, LabelEmbedding)), None)


def is_class_conditional(model: nn.Module) -> bool:
    model = getattr(model, "_orig_mod", model)
    if _cls(model) == "DiTTransformer2DModel":
        return _dit_label_table(model) is not None
    cfg = getattr(model, "config", None)
    return _cls(model) == "UNet2DModel" and getattr(cfg, "num_class_embeds", None) is not None \
        and getattr(cfg, "class_embed_type", None) is None


def num_classes(model: nn.Module) -> int:
    """Real classes (the null label excluded)."""
    if _cls(model) == "DiTTransformer2DModel":
        return int(model.config.num_embeds_ada_norm)
    if is_class_conditional(model):
        return int(model.config.num_class_embeds) - 1
    raise GacqError(f"{_cls(model)} is not class-conditional")


def null_label(model: nn.Module) -> int:
    """The unconditional label (for classifier-free guidance)."""
    k = num_classes(model)
    rows = _dit_label_table(model).num_embeddings if _cls(model) == "DiTTransformer2DModel" else k + 1
    if rows <= k:
        raise GacqError(f"this {_cls(model)} has no null-class embedding (trained without label dropout), so "
                        "classifier-free guidance is not possible; use --guidance-scale 1")
    return k


def sample_labels(model: nn.Module, indices, class_label: int | None) -> torch.Tensor | None:
    """Labels of the images with these indices: `class_label` for all, or balanced (index mod classes)."""
    if not is_class_conditional(model):
        if class_label is not None:
            raise GacqError(f"--class-label needs a class-conditional model; this {_cls(model)} is unconditional")
        return None
    k = num_classes(model)
    if class_label is not None:
        if not 0 <= class_label < k:
            raise GacqError(f"--class-label {class_label} is out of range: the model has classes 0..{k - 1}")
        return torch.full((len(indices),), class_label, dtype=torch.long)
    return torch.tensor([i % k for i in indices], dtype=torch.long)


def model_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> Any:
    """Call the denoiser the way its class expects; returns its output object."""
    cond = cond or {}
    name = _cls(model)
    if name == "UNet2DConditionModel":
        if "encoder_hidden_states" not in cond:
            raise GacqError("UNet2DConditionModel needs encoder_hidden_states (text or other cross-attention "
                            "conditioning); gacq's sampler does not produce them yet")
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"])
    labels = cond.get("class_labels")
    if labels is None and is_class_conditional(model):
        raise GacqError(f"this {name} is class-conditional: it needs class labels")
    if name in ("DiTTransformer2DModel", "Transformer2DModel"):
        return model(x, timestep=t, class_labels=labels)
    return model(x, t, class_labels=labels) if labels is not None else model(x, t)


def predict_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
    """The noise prediction; learned-variance channels (DiT's out_channels = 2 x in_channels) dropped."""
    out = model_forward(model, x, t, cond).sample
    c = x.shape[1]
    return out[:, :c] if out.shape[1] == 2 * c else out


def guided_eps(fn, x: torch.Tensor, t: torch.Tensor, cond: Cond | None, uncond: Cond | None, scale: float,
               force: bool = False) -> torch.Tensor:
    """eps_u + scale (eps_c - eps_u) with both branches in one batch [conditional; unconditional].

    `fn(x, t, cond)` predicts eps. Without an unconditional branch, or at scale 1 (unless `force`),
    it is the plain conditional prediction.
    """
    if not uncond or (scale == 1.0 and not force):
        return fn(x, t, cond or None)
    n = len(x)
    both = fn(torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([cond[k], uncond[k]]) for k in cond})
    ec, eu = both[:n], both[n:]
    return eu + scale * (ec - eu)


def load_prompt_embeds(path) -> dict[str, torch.Tensor]:
    """Stored encoder states for text-conditioned models (see the module docstring)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise GacqError(f"prompt embeddings file {path} does not exist")
    try:
        d = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise GacqError(f"{path} is not a readable safetensors file: {e}") from e
    e = d.get("encoder_hidden_states")
    if e is None or e.dim() != 3:
        raise GacqError(f"{path} needs a tensor 'encoder_hidden_states' of shape (prompts, tokens, dim)")
    neg = d.get("negative_encoder_hidden_states")
    if neg is not None and (neg.dim() != 3 or neg.shape[1:] != e.shape[1:] or len(neg) not in (1, len(e))):
        raise GacqError(f"{path}: 'negative_encoder_hidden_states' must be (1 or {len(e)}, {e.shape[1]}, "
                        f"{e.shape[2]}), got {tuple(neg.shape)}")
    return {"encoder_hidden_states": e.float(), **({"negative": neg.float()} if neg is not None else {})}


def sample_conditioning(model: nn.Module, indices, class_label: int | None, prompt_embeds: str | None,
                        guidance_scale: float) -> tuple[Cond | None, Cond | None]:
    """(conditional, unconditional) conditioning of the images with these indices; (None, None) for
    unconditional models. The unconditional branch is None unless guidance is on."""
    if _cls(model) == "UNet2DConditionModel":
        if class_label is not None:
            raise GacqError("--class-label does not apply to text-conditioned models; give --prompt-embeds")
        if prompt_embeds is None:
            raise GacqError("this UNet2DConditionModel needs encoder states: give --prompt-embeds FILE.safetensors "
                            "(tensor 'encoder_hidden_states' of shape (prompts, tokens, dim))")
        pe = load_prompt_embeds(prompt_embeds)
        e = pe["encoder_hidden_states"]
        want = getattr(model.config, "cross_attention_dim", None)
        if want is not None and e.shape[-1] != want:
            raise GacqError(f"--prompt-embeds has dimension {e.shape[-1]}, the model's cross-attention wants {want}")
        rows = torch.tensor([i % len(e) for i in indices])
        cond = {"encoder_hidden_states": e[rows]}
        if guidance_scale == 1.0:
            return cond, None
        if "negative" not in pe:
            raise GacqError("--guidance-scale needs 'negative_encoder_hidden_states' (e.g. the empty prompt's "
                            "states) in the --prompt-embeds file")
        neg = pe["negative"]
        return cond, {"encoder_hidden_states": neg[rows % len(neg)]}
    if prompt_embeds is not None:
        raise GacqError(f"--prompt-embeds applies to text-conditioned models (UNet2DConditionModel), not {_cls(model)}")
    labels = sample_labels(model, indices, class_label)
    if labels is None:
        if guidance_scale != 1.0:
            raise GacqError("--guidance-scale needs a class-conditional or text-conditioned model")
        return None, None
    cond = {"class_labels": labels}
    if guidance_scale == 1.0:
        return cond, None
    return cond, {"class_labels": torch.full_like(labels, null_label(model))}


def slice_cond(cond: Cond | None, index, device=None) -> Cond | None:
    if not cond:
        return None
    return {k: v[index].to(device) if device is not None else v[index] for k, v in cond.items()}
