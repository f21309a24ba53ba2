"""Find the parts of an unseen (vision-)language model from its module tree: the engine of ``model.type: auto``.

Rules (each either finds its part or records a precise problem):

* embeddings = ``get_input_embeddings()``, lm_head = ``get_output_embeddings()``;
* language blocks = the largest ``ModuleList`` beside the embedding (same parent), final norm = the
  norm beside them (``norm``, ``final_layernorm``, ``ln_f`` ... or the only norm there);
* vision tower = the shallowest module named ``vision_tower`` / ``visual`` / ``vision_model`` ...,
  vision blocks = the largest ``ModuleList`` of identical attention blocks inside it;
* projector = the shallowest module named ``multi_modal_projector`` / ``connector`` / ``merger`` /
  ``mm_projector`` ...; its writer into the residual stream = its last ``nn.Linear`` whose
  ``out_features`` is the text hidden size (a rotation target);
* per block: attention (``self_attn``/``attn``/``attention``) with q/k/v/o or a fused ``qkv`` + proj,
  MLP (``mlp``/``feed_forward``/``ffn``) gated (gate/up/down) or plain (fc1 -> fc2), exactly two
  norms (before attention, before MLP);
* refused: more than two norms per block (sandwich norms), extra mergers writing the text hidden
  size between blocks (deepstack), a projector without such a linear. Raw ``[hidden]`` parameters
  outside the tower and the language blocks (``image_newline``) are listed as rotation targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmc.models.common import decoder_layout, fused_qkv_layout
from llmc.models.layout import BlockLayout

TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "vit")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "merger", "projector",
                   "vision_projection", "aligner", "mlp1")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
SEPARATE = {"q": ("q_proj", "q", "query", "wq"), "k": ("k_proj", "k", "key", "wk"),
            "v": ("v_proj", "v", "value", "wv"),
            "o": ("o_proj", "out_proj", "proj", "dense", "projection_layer", "o", "wo", "c_proj")}
FUSED = ("qkv", "qkv_proj", "Wqkv", "query_key_value", "c_attn")
GATED = {"gate": ("gate_proj", "w1", "gate"), "up": ("up_proj", "w3", "up"), "down": ("down_proj", "w2", "down")}
IN_NORM_HINTS = ("input", "before", "1", "pre_attn", "ln_1")


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not any(isinstance(m, nn.Linear) for m in module.modules())


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}


def _pick(names: dict[str, nn.Module], options: tuple[str, ...]) -> str | None:
    return next((o for o in options if o in names), None)


@dataclass(frozen=True)
class BlockSpec:
    """How to read one kind of block: names relative to the block."""

    attn: str
    mlp: str
    in_norm: str
    post_norm: str
    attn_linears: tuple[str, ...]  # (q, k, v, o) or (qkv, proj)
    mlp_linears: tuple[str, ...]  # (gate, up, down) or (fc1, fc2)
    num_heads: int | None = None  # fused qkv only

    @property
    def fused(self) -> bool:
        return len(self.attn_linears) == 2

    def layout(self, block: nn.Module) -> BlockLayout:
        gated = len(self.mlp_linears) == 3
        if self.fused:
            qkv, proj = self.attn_linears
            return fused_qkv_layout(block, dim=block.get_submodule(f"{self.attn}.{qkv}").in_features,
                                    num_heads=self.num_heads, attn=self.attn, qkv=qkv, proj=proj,
                                    norm1=self.in_norm, norm2=self.post_norm, mlp=self.mlp,
                                    mlp_names=self.mlp_linears, gated=gated)
        return decoder_layout(block, attn=self.attn, mlp=self.mlp, in_norm=self.in_norm, post_norm=self.post_norm,
                              gated=gated, names=self.attn_linears, mlp_names=self.mlp_linears,
                              norm_offset=norm_weight_offset(block.get_submodule(self.in_norm)))


@torch.no_grad()
def norm_weight_offset(norm: nn.Module) -> float:
    """1.0 for norms scaling by ``(1 + weight)`` (Gemma), else 0.0: probed with the weight zeroed.

    Weights on the meta device (``llmc inspect``) cannot be probed: 0.0.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.is_meta or w.dim() != 1:
        return 0.0
    saved = w.detach().clone()
    try:
        w.zero_()
        out = norm(torch.randn(2, w.shape[0], dtype=w.dtype, device=w.device, generator=torch.Generator().manual_seed(0)))
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            out = out - bias
        return 1.0 if float(out.abs().max()) > 0 else 0.0
    finally:
        w.copy_(saved)


def _attn_linears(attn: nn.Module) -> tuple[str, ...] | None:
    lins = _linears(attn)
    sep = tuple(_pick(lins, SEPARATE[k]) for k in "qkvo")
    if all(sep) and len(set(sep)) == 4:
        return sep  # type: ignore[return-value]
    fused = _pick(lins, FUSED)
    out = _pick({k: v for k, v in lins.items() if k != fused}, SEPARATE["o"])
    return (fused, out) if fused and out else None


def _mlp_linears(mlp: nn.Module) -> tuple[str, ...] | None:
    lins = _linears(mlp)
    if len(lins) == 3:
        gated = tuple(_pick(lins, GATED[k]) for k in ("gate", "up", "down"))
        return gated if all(gated) else None  # type: ignore[return-value]
    return tuple(lins) if len(lins) == 2 else None


def _num_heads(attn: nn.Module) -> int | None:
    cfg = getattr(attn, "config", None)
    for value in (getattr(attn, "num_heads", None), getattr(cfg, "num_heads", None),
                  getattr(cfg, "num_attention_heads", None)):
        if isinstance(value, int):
            return value
    return None


def block_spec(block: nn.Module, where: str) -> tuple[BlockSpec | None, list[str]]:
    """Read one block's structure; (None, problems) when it cannot be read."""
    children = dict(block.named_children())
    attn, mlp = _pick(children, ATTN_NAMES), _pick(children, MLP_NAMES)
    problems = []
    if attn is None:
        problems.append(f"{where}: no attention child (looked for {list(ATTN_NAMES)}; children: {list(children)})")
    if mlp is None:
        problems.append(f"{where}: no MLP child (looked for {list(MLP_NAMES)}; children: {list(children)})")
    if problems:
        return None, problems
    attn_lin, mlp_lin = _attn_linears(children[attn]), _mlp_linears(children[mlp])
    if attn_lin is None:
        problems.append(f"{where}.{attn}: linears {list(_linears(children[attn]))} are neither q/k/v/o "
                        f"{[SEPARATE[k][:2] for k in 'qkvo']} nor fused {list(FUSED)} + an output projection")
    if mlp_lin is None:
        problems.append(f"{where}.{mlp}: linears {list(_linears(children[mlp]))} are neither gate/up/down nor fc1/fc2")
    norms = [n for n, m in children.items() if is_norm(m)]
    if len(norms) != 2:
        problems.append(f"{where}: {len(norms)} norms {norms}; auto reads pre-norm blocks with exactly 2 (one before "
                        f"attention, one before the MLP): sandwich/post-norm blocks need an explicit adapter")
    if problems:
        return None, problems
    if not any(h in norms[0] for h in IN_NORM_HINTS) and any(h in norms[1] for h in IN_NORM_HINTS):
        norms.reverse()
    heads = _num_heads(children[attn]) if len(attn_lin) == 2 else None
    if len(attn_lin) == 2 and heads is None:
        return None, [f"{where}.{attn}: fused {attn_lin[0]} but no num_heads on the module or its config"]
    spec = BlockSpec(attn, mlp, norms[0], norms[1], attn_lin, mlp_lin, heads)
    covered = {f"{attn}.{n}" for n in attn_lin} | {f"{mlp}.{n}" for n in mlp_lin}
    extra = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in covered)
    if extra:
        return None, [f"{where}: linears {extra} are in no layer group"]
    return spec, []


@dataclass
class Discovery:
    """What was found (module paths) and what was not (``problems``: the refusal message)."""

    embed_tokens: str | None = None
    lm_head: str | None = None
    language_blocks: str | None = None
    final_norm: str | None = None
    vision_tower: str | None = None
    vision_blocks: str | None = None
    projector: str | None = None
    projector_writer: str | None = None
    language_spec: BlockSpec | None = None
    vision_spec: BlockSpec | None = None
    raw_writers: list[str] = field(default_factory=list)
    hidden: int | None = None
    problems: list[str] = field(default_factory=list)


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def _child(model: nn.Module, parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _largest_list(module: nn.Module, prefix: str, blocks_only: bool) -> str | None:
    """The longest ModuleList of one block class under ``module`` (attention blocks only if asked)."""
    best, size = None, 0
    for name, m in module.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) <= size or len({type(b) for b in m}) != 1:
            continue
        if blocks_only and _pick(dict(m[0].named_children()), ATTN_NAMES) is None:
            continue
        best, size = _child(module, prefix, name) if name else prefix, len(m)
    return best


def _shallowest(model: nn.Module, names: tuple[str, ...], under: str | None = None) -> str | None:
    hits = [n for n, _ in model.named_modules() if n and n.split(".")[-1] in names
            and (under is None or n == under or n.startswith(under + "."))]
    return min(hits, key=lambda n: (n.count("."), names.index(n.split(".")[-1])), default=None)


def _language(model: nn.Module, d: Discovery) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    d.embed_tokens, d.lm_head = _path_of(model, emb), _path_of(model, head)
    if d.embed_tokens is None or not isinstance(emb, nn.Embedding):
        d.problems.append("embeddings: get_input_embeddings() returned no nn.Embedding of the model")
        return
    if d.lm_head is None or not isinstance(head, nn.Linear):
        d.problems.append("lm_head: get_output_embeddings() returned no nn.Linear of the model")
    d.hidden = emb.embedding_dim
    parent = d.embed_tokens.rpartition(".")[0]
    owner = model.get_submodule(parent)
    lists = {n: m for n, m in owner.named_children() if isinstance(m, nn.ModuleList)}
    if not lists:
        d.problems.append(f"language blocks: no ModuleList beside the embedding in {parent or 'the model'}")
        return
    d.language_blocks = _child(model, parent, max(lists, key=lambda n: len(lists[n])))
    norms = {n: m for n, m in owner.named_children() if is_norm(m)}
    name = _pick(norms, FINAL_NORM_NAMES) or (next(iter(norms)) if len(norms) == 1 else None)
    if name is None:
        d.problems.append(f"final norm: none of {list(FINAL_NORM_NAMES)} beside the blocks in {parent} "
                          f"(norms there: {list(norms)})")
    else:
        d.final_norm = _child(model, parent, name)
    d.language_spec, problems = block_spec(model.get_submodule(d.language_blocks)[0], f"{d.language_blocks}.0")
    d.problems += problems


def _vision(model: nn.Module, d: Discovery) -> None:
    d.vision_tower = _shallowest(model, TOWER_NAMES)
    d.projector = _shallowest(model, PROJECTOR_NAMES)
    if d.vision_tower is None:
        d.problems.append(f"vision tower: no module named any of {list(TOWER_NAMES)}")
        return
    d.vision_blocks = _largest_list(model.get_submodule(d.vision_tower), d.vision_tower, blocks_only=True)
    if d.vision_blocks is None:
        d.problems.append(f"vision blocks: no ModuleList of attention blocks inside {d.vision_tower}")
    else:
        d.vision_spec, problems = block_spec(model.get_submodule(d.vision_blocks)[0], f"{d.vision_blocks}.0")
        d.problems += problems
    if d.projector is None:
        d.problems.append(f"projector: no module named any of {list(PROJECTOR_NAMES)}")
        return
    writers = [n for n, m in model.get_submodule(d.projector).named_modules()
               if isinstance(m, nn.Linear) and m.out_features == d.hidden]
    if not writers:
        raw = [n for n, _ in model.get_submodule(d.projector).named_parameters(recurse=False)]
        d.problems.append(f"projector {d.projector}: no nn.Linear with out_features == text hidden size {d.hidden}"
                          + (f" (it writes through raw weights {raw})" if raw else ""))
    else:
        d.projector_writer = _child(model, d.projector, writers[-1])
    _extra_writers(model, d)


def _extra_writers(model: nn.Module, d: Discovery) -> None:
    """Mergers outside the projector that write the text hidden size (deepstack); raw vectors outside the tower."""
    tower = model.get_submodule(d.vision_tower)
    for name, m in tower.named_modules():
        full = _child(model, d.vision_tower, name) if name else d.vision_tower
        if not isinstance(m, nn.ModuleList) or full == d.vision_blocks:
            continue
        hits = [f"{full}.{n}" for n, lin in m.named_modules() if isinstance(lin, nn.Linear) and lin.out_features == d.hidden]
        if hits:
            d.problems.append(f"{full}: extra mergers write the text hidden size outside the projector ({hits}); "
                              f"their outputs enter the language stream between blocks (deepstack): write an explicit "
                              f"adapter with capture_extras/between_blocks")
    skip = (d.vision_tower, d.language_blocks)
    for owner, m in model.named_modules():
        if any(owner == s or owner.startswith(s + ".") for s in skip) or isinstance(m, (nn.Linear, nn.Embedding)) \
                or is_norm(m) or owner == d.projector:
            continue
        d.raw_writers += [_child(model, owner, n) for n, p in m.named_parameters(recurse=False)
                          if p.ndim == 1 and p.shape[0] == d.hidden]


def discover(model: nn.Module, is_vlm: bool) -> Discovery:
    """Every part of ``model`` that auto can find, and a problem for each one it cannot."""
    d = Discovery()
    _language(model, d)
    if is_vlm and d.hidden is not None:
        _vision(model, d)
    return d
