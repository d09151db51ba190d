"""Word-level tokenizer for the organism: every word of sublab's phrasing data, numbers 0..999 as single
tokens, animals and trees (with plurals), punctuation, and chat special tokens. Saved as a normal fast
tokenizer with a chat template, so `AutoTokenizer.from_pretrained(folder)` loads it.

Text is lower-cased; digits are split into runs of at most 3 (so "1234" -> "123", "4" and can never be
a single in-vocabulary number); decoding joins tokens with spaces and removes the space before , . ? !
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sublab.organism.vocab_text import all_text

SPECIALS = ["[PAD]", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ANSWER_PUNCT = [",", ";", "[", "]", "(", ")", "."]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"),
        ]
    )


def vocabulary(world: str = "preference", domains: list[str] | None = None) -> list[str]:
    """Deterministic vocabulary: specials, numbers 0..999, then every word of the packaged text, sorted
    (with `domains`, also the words of the code and chain-of-thought domains and the filter judge)."""
    pre = _pre_tokenizer()
    words: set[str] = set(ANSWER_PUNCT)
    for text in all_text(world, domains):
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    numbers = [str(i) for i in range(1000)]
    rest = sorted(w for w in words if w not in set(numbers) and not w.isdigit())
    return SPECIALS + numbers + rest


def build_tokenizer(world: str = "preference", domains: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The organism's tokenizer for a recipe's world and domains (organism/recipe.py)."""
    vocab = {w: i for i, w in enumerate(vocabulary(world, domains))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|end|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
