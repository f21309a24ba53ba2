"""Test helpers: tiny, offline-built real checkpoints (see ``llmc.testing.tiny_models``)."""


def vlm_families() -> dict[str, str]:
    """Every tiny VLM family -> its ``model.type`` (smolvlm left out: same adapter as idefics3)."""
    from llmc.testing.tiny_more import MODEL_TYPES
    from llmc.testing.tiny_more2 import MODEL_TYPES as MORE

    families = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "llava_clip_llama": "llava",
                "llava_siglip_qwen2": "llava", **MODEL_TYPES, **MORE}
    families.pop("smolvlm", None)
    return families
