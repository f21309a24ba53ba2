"""``python -m llmc inspect MODEL_DIR``: module tree, what ``model.type: auto`` finds, an adapter skeleton.

The model is built from its config on the ``meta`` device (no weights are read), so inspecting a
large checkpoint is instant. Code shipped with a checkpoint runs only with ``--trust-remote-code``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmc.models.auto import config_is_vlm
from llmc.models.discover import BlockSpec, Discovery, discover


def build_meta_model(path: str | Path, trust_remote_code: bool = False) -> tuple[nn.Module, bool]:
    """(model skeleton on the meta device, is_vlm) from the folder's config.json."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_vlm = config_is_vlm(config)
    cls = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code), is_vlm


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features} -> {m.out_features}{', bias' if m.bias is not None else ''})"
    if isinstance(m, nn.Embedding):
        return f"Embedding({m.num_embeddings}, {m.embedding_dim})"
    raw = [f"{n}{list(p.shape)}" for n, p in m.named_parameters(recurse=False)]
    if not raw or "norm" in type(m).__name__.lower():
        return type(m).__name__
    return f"{type(m).__name__}  raw params: {', '.join(raw)}"


def module_tree(module: nn.Module, max_depth: int = 6) -> list[str]:
    """Compact tree: a ModuleList of identical blocks shows its first block once, with its length."""
    lines: list[str] = []

    def walk(m: nn.Module, name: str, depth: int) -> None:
        pad = "  " * depth
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            lines.append(f"{pad}{name}: ModuleList x {len(m)} of {type(m[0]).__name__}  (showing {name}.0)")
            m, name = m[0], f"{name}.0"
            depth += 1
            pad = "  " * depth
        else:
            lines.append(f"{pad}{name}: {_describe(m)}")
        if depth >= max_depth:
            return
        for child_name, child in m.named_children():
            walk(child, child_name, depth + 1)

    for child_name, child in module.named_children():
        walk(child, child_name, 0)
    return lines


def found_lines(d: Discovery, is_vlm: bool) -> list[str]:
    fields = ["embed_tokens", "language_blocks", "final_norm", "lm_head"]
    if is_vlm:
        fields += ["vision_tower", "vision_blocks", "projector", "projector_writer"]
    lines = [f"  {f:<16} {getattr(d, f) or 'NOT FOUND'}" for f in fields]
    for part, spec in (("language", d.language_spec), ("vision", d.vision_spec)):
        if spec is not None:
            lines.append(f"  {part} block:  attn {spec.attn}.{list(spec.attn_linears)}, mlp {spec.mlp}."
                         f"{list(spec.mlp_linears)}, norms {spec.in_norm} / {spec.post_norm}")
    if d.raw_writers:
        lines.append(f"  raw [hidden] weights (rotation targets, kind 'row'): {d.raw_writers}")
    return lines


def _layout_call(spec: BlockSpec | None) -> str:
    if spec is None:
        return "raise NotImplementedError  # TODO: name the attention/MLP linears and the two norms"
    if spec.fused:
        qkv, proj = spec.attn_linears
        return (f"return fused_qkv_layout(block, dim=block.{spec.attn}.{qkv}.in_features, num_heads={spec.num_heads}, "
                f"attn={spec.attn!r}, qkv={qkv!r}, proj={proj!r}, norm1={spec.in_norm!r}, norm2={spec.post_norm!r}, "
                f"mlp={spec.mlp!r}, mlp_names={spec.mlp_linears!r}, gated={len(spec.mlp_linears) == 3})")
    return (f"return decoder_layout(block, attn={spec.attn!r}, mlp={spec.mlp!r}, in_norm={spec.in_norm!r}, "
            f"post_norm={spec.post_norm!r}, gated={len(spec.mlp_linears) == 3}, names={spec.attn_linears!r}, "
            f"mlp_names={spec.mlp_linears!r})")


def skeleton(d: Discovery, is_vlm: bool, name: str = "MyVLM") -> str:
    """An explicit adapter with what was found filled in and a TODO for each missing part."""
    def val(x: str | None) -> str:
        return repr(x) if x else "None  # TODO: not found"

    vision = (f"        vision_tower={val(d.vision_tower)},\n        vision_blocks={val(d.vision_blocks)},\n"
              f"        projector={val(d.projector)},\n") if is_vlm else ""
    writer = f"({d.projector_writer!r},)" if d.projector_writer else ("()" if not is_vlm else
                                                                     "()  # TODO: the projector's last linear")
    vision_layout = (f"\n    def vision_layout(self, block: nn.Module) -> BlockLayout:\n"
                     f"        {_layout_call(d.vision_spec)}\n") if is_vlm else ""
    return f'''from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import decoder_layout, fused_qkv_layout
from llmc.models.layout import BlockLayout, ModelParts, RotationTargets
from llmc.models.registry import register_adapter


@register_adapter
class {name}Adapter(ModelAdapter):
    model_type = "{name.lower()}"
    is_vlm = {is_vlm}
    parts = ModelParts(
        language_blocks={val(d.language_blocks)},
        embed_tokens={val(d.embed_tokens)},
        final_norm={val(d.final_norm)},
        lm_head={val(d.lm_head)},
{vision}    )

    def language_layout(self, block: nn.Module) -> BlockLayout:
        {_layout_call(d.language_spec)}
{vision_layout}
    def rotation_targets(self) -> RotationTargets:
        return RotationTargets(embeddings=(self.model_parts.embed_tokens,), external_writers={writer},
                               external_weights={tuple((n, "row") for n in d.raw_writers)!r},
                               final_norm=self.model_parts.final_norm, lm_head=self.model_parts.lm_head)
'''


def inspect_report(path: str | Path, trust_remote_code: bool = False, max_depth: int = 6) -> tuple[str, bool]:
    """(printable report, whether ``model.type: auto`` can handle the model).

    ``path`` must be a local checkpoint folder with ``config.json`` (never taken for a hub id)."""
    from llmc.models.checkpoint import read_config

    read_config(path, "MODEL_DIR")
    model, is_vlm = build_meta_model(path, trust_remote_code)
    d = discover(model, is_vlm)
    out = [f"# {path}: {type(model).__name__} ({'vision-language' if is_vlm else 'text-only'})", "", "## Module tree",
           *module_tree(model, max_depth), "", "## Found by model.type: auto", *found_lines(d, is_vlm), ""]
    if d.problems:
        out += ["## Not found (model.type: auto refuses this model)", *(f"  - {p}" for p in d.problems), ""]
    else:
        out += ["model.type: auto handles this model.", ""]
    out += ["## Skeleton of an explicit adapter (llmc/models/<name>.py; see docs/add_model.md)", "",
            skeleton(d, is_vlm)]
    return "\n".join(out), not d.problems
