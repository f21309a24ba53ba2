"""Tokenizers and chat templates of the extra tiny VLM families (see :mod:`llmc.testing.tiny_more`).

Same BPE training as :mod:`llmc.testing.tiny_tokenizers` (offline, deterministic); only the special
tokens, their names (``tok.<name>`` / ``tok.<name>_id`` as the real processors expect) and the chat
templates differ per family.
"""
from __future__ import annotations

from tokenizers import AddedToken
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer

from llmc.testing import tiny_tokenizers as tt

_TEXT = tt._TEXT  # renders a message's text (string content or the text items of a list)


def _content_loop(image: str, text_strip: bool = False) -> str:
    """Jinja: each content item of a message; images render as ``image``, text verbatim."""
    text = "{{ c['text'] | trim }}" if text_strip else "{{ c['text'] }}"
    return (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image +
        "{% elif c['type'] == 'text' %}" + text + "{% endif %}{% endfor %}{% endif %}"
    )


# InternVL3-hf: ChatML, "<IMG_CONTEXT>\n" per image (expanded by the processor into <img>...</img>).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _content_loop("{{ '<IMG_CONTEXT>\\n' }}") +
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen3-VL-Instruct: ChatML, <|vision_start|><|image_pad|><|vision_end|> per image, no default system turn.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _content_loop("<|vision_start|><|image_pad|><|vision_end|>") +
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Idefics3 / SmolVLM: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    + _content_loop("{{ '<image>' }}") +
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Gemma 3: <start_of_turn>user\n<start_of_image>question<end_of_turn>\n<start_of_turn>model\n
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}" + _content_loop("{{ '<start_of_image>' }}", True) +
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# llava-1.6 / llava-onevision-qwen: ChatML with LLaVA's <image> placeholder.
LLAVA_CHATML_TEMPLATE = tt.LLAVA_QWEN_TEMPLATE
# Llama-3.2-Vision: header ids, <|image|> before the text, <|eot_id|> ends each turn.
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    + _content_loop("{{ '<|image|>' }}", True) +
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def qwen_style(specials: tuple[str, ...], named: dict[str, str], template: str, eos: str = "<|im_end|>",
               pad: str = "<|endoftext|>", bos: str | None = None) -> PreTrainedTokenizerBase:
    """A ``Qwen2Tokenizer`` (byte-level BPE) with ``specials`` appended and ``named`` special attributes."""
    vocab, merges = tt._train_qwen_bpe()
    vocab = tt._with_specials(vocab, specials)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=bos, eos_token=eos, pad_token=pad,
        padding_side="left", model_max_length=4096, extra_special_tokens=named,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.chat_template = template
    return tok


def llama_style(extra: tuple[str, ...], named: dict[str, str], template: str, pad: str = "<pad>",
                bos: str = "<s>", eos: str = "</s>") -> PreTrainedTokenizerBase:
    """A ``LlamaTokenizer`` (Metaspace BPE + byte fallback) with ``extra`` special tokens appended."""
    vocab, merges = tt._train_llama_bpe()
    vocab = tt._with_specials(vocab, extra)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, pad_token=pad, bos_token=bos, eos_token=eos,
                         add_bos_token=True, padding_side="left", model_max_length=4096,
                         extra_special_tokens=named)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    tok.chat_template = template
    return tok


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def _train_gemma_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma layout: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, 256 byte-fallback tokens, then merges.

    Spaces become ``▁`` (as ``GemmaTokenizer``'s normalizer does); words are pre-split only for
    training so merges stay inside words.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    specials = list(GEMMA_SPECIALS) + [f"<0x{i:02X}>" for i in range(256)]
    trainer = BpeTrainer(vocab_size=tt.LLAMA_BPE_SIZE + 2, show_progress=False, special_tokens=specials)
    tok.train_from_iterator(tt.corpus(), trainer=trainer)
    return tt._vocab_merges(tok)


def gemma_style(extra: tuple[str, ...], named: dict[str, str], template: str,
                eos: str = "<eos>") -> PreTrainedTokenizerBase:
    """A ``GemmaTokenizer`` (bos ``<bos>``, pad ``<pad>``) with ``extra`` special tokens appended."""
    from transformers import GemmaTokenizer

    vocab, merges = _train_gemma_bpe()
    vocab = tt._with_specials(vocab, extra)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, eos_token=eos, add_bos_token=True, padding_side="left",
                         model_max_length=4096, extra_special_tokens=named)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    tok.chat_template = template
    return tok
