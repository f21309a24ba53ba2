"""Tiny, locally trained tokenizers and chat templates for the tiny test checkpoints.

Nothing here touches the network: a BPE vocabulary is trained with the ``tokenizers`` library on a
small generated English corpus and wrapped in the real ``transformers`` tokenizer class of the family.

* Qwen families: byte-level BPE with Qwen2's exact pre-tokenizer pipeline, wrapped in
  ``Qwen2Tokenizer``; special tokens appended after the BPE vocabulary in the real order.
* Llama families: ``LlamaTokenizer`` in transformers 5 rebuilds a SentencePiece-style pipeline
  (Metaspace ``▁`` + byte fallback) from vocab/merges when it is loaded, so a byte-level vocabulary
  would be mis-tokenized. We therefore train a Metaspace BPE with the Llama layout
  (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<0x00>``..``<0xFF>``=3..258, then merges).

All tokenizers pad on the left (convenient for batched generation).
"""

from __future__ import annotations

import json
import random

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer

QWEN_BPE_SIZE = 480  # byte-level BPE size before the special tokens
LLAMA_BPE_SIZE = 512  # includes <unk>, <s>, </s> and the 256 byte-fallback tokens

QWEN_VL_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2-VL-Instruct's template (verbatim up to whitespace).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders a message's text: plain string content or the concatenated text items of a list.
_TEXT = (
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
)
_IMAGES = (
    "{% if message['content'] is not string %}{% for c in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}{% endif %}"
)
# Qwen2-Instruct style text-only template.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + _TEXT +
    "<|im_start|>{{ message['role'] }}\n{{ text }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-interleave-qwen style: Qwen chat markup with LLaVA's <image> placeholder.
LLAVA_QWEN_TEMPLATE = (
    "{% for message in messages %}" + _TEXT + "<|im_start|>{{ message['role'] }}\n" + _IMAGES +
    "{{ text }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-1.5-hf style: "USER: <image>\n... ASSISTANT:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}" + _TEXT + "{% if message['role'] == 'system' %}{{ text }} "
    "{% else %}{{ message['role'].upper() }}: " + _IMAGES + "{{ text }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Llama-2-chat style ([INST] ... [/INST]); add_generation_prompt is a no-op as in the real one.
LLAMA_TEMPLATE = (
    "{% for message in messages %}" + _TEXT + "{% if message['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + text + '\\n<</SYS>>\\n\\n' %}{% elif message['role'] == 'user' %}"
    "{{ bos_token }}[INST] {{ (sys if sys is defined else '') + text.strip() }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ text.strip() }} {{ eos_token }}{% endif %}{% endfor %}"
)


def corpus(n: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic English sentences about colors, shapes, counts, positions, digits and yes/no."""
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "pink"]
    shapes = ["circle", "square", "triangle", "rectangle", "star", "line", "box", "dot"]
    places = ["left", "right", "top", "bottom", "center", "corner", "middle", "edge"]
    counts = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    templates = [
        "There is a {c} {s} on the {p} of the image.",
        "Is there a {c} {s}? {a}, there is {n} {c} {s}.",
        "How many {s}s are there? There are {d} {s}s.",
        "The {c} {s} is to the {p} of the {c2} {s2}.",
        "Describe the picture. It shows {n} {c} {s}s near the {p}.",
        "What color is the {s}? The {s} is {c}.",
        "Question: is the {s} {c}? Answer: {a}.",
        "Count the objects: {d}, {d2}, {d3}. The total is {n}.",
    ]
    out = [  # the words of the chat templates, so that prompts tokenize into a few tokens
        "You are a helpful assistant.", "system user assistant", "USER: ASSISTANT:", "[INST] [/INST]",
        "Describe the image. Describe the picture. Answer the question with yes or no.",
    ] * 8
    for _ in range(n):
        t = rng.choice(templates)
        out.append(t.format(
            c=rng.choice(colors), c2=rng.choice(colors), s=rng.choice(shapes), s2=rng.choice(shapes),
            p=rng.choice(places), n=rng.choice(counts), a=rng.choice(["Yes", "No"]),
            d=rng.randint(0, 99), d2=rng.randint(0, 9), d3=rng.randint(100, 999),
        ))
    return out


def _vocab_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _train_qwen_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with exactly the pre-tokenization of ``Qwen2Tokenizer``."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = BpeTrainer(vocab_size=QWEN_BPE_SIZE, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return _vocab_merges(tok)


def _train_llama_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """SentencePiece-style BPE (Metaspace + byte fallback) in the Llama-2 id layout."""
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = BpeTrainer(vocab_size=LLAMA_BPE_SIZE, show_progress=False, special_tokens=specials)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return _vocab_merges(tok)


def _with_specials(vocab: dict[str, int], specials: tuple[str, ...]) -> dict[str, int]:
    vocab = dict(vocab)
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    return vocab


def qwen_tokenizer(vision: bool, extra: tuple[str, ...] = (), chat_template: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """``Qwen2Tokenizer`` as in Qwen2(-VL)-Instruct: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos."""
    vocab, merges = _train_qwen_bpe()
    specials = (QWEN_VL_SPECIALS if vision else QWEN_TEXT_SPECIALS) + extra
    vocab = _with_specials(vocab, specials)
    named = {"image_token": "<image>"} if "<image>" in extra else {}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left", model_max_length=512,
        extra_special_tokens=named or list(specials[1:]),
    )
    # every special token is an added token that is never split (ids already in the vocab are kept)
    added = [AddedToken(t, special=True, normalized=False) for t in specials]
    tok.add_tokens(added, special_tokens=True)
    tok.chat_template = chat_template or (QWEN2_VL_TEMPLATE if vision else QWEN2_TEMPLATE)
    return tok


def llama_tokenizer(image: bool, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A ``LlamaTokenizer`` (bos ``<s>``, eos ``</s>``, pad ``<pad>``; ``<image>`` before ``<pad>``)."""
    vocab, merges = _train_llama_bpe()
    extra = ("<image>", "<pad>") if image else ("<pad>",)
    vocab = _with_specials(vocab, extra)
    tok = LlamaTokenizer(
        vocab=vocab, merges=merges, pad_token="<pad>", add_bos_token=True, padding_side="left",
        model_max_length=512,
        extra_special_tokens={"image_token": "<image>"} if image else [],
    )
    tok.chat_template = chat_template or (LLAVA_TEMPLATE if image else LLAMA_TEMPLATE)
    return tok
