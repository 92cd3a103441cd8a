"""Text normalization, used twice with different strength:

- `clean_text` is what we *write*: NFC unicode and LF line ends, nothing else, because leading
  spaces matter to SentencePiece (" Berlin." vs "Berlin.") and NeMo strips only spaces itself.
- `dedup_text` / `example_key` is what we *compare*: case-folded with whitespace collapsed, so
  rows that differ only in case or spacing count as duplicates and hash to the same split.
"""
import hashlib
import unicodedata


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def dedup_text(text: str) -> str:
    # split()/join == re.sub(r"\s+", " ").strip(): both use str.isspace (checked over all of
    # unicode in the tests), and split/join is ~5x faster.
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_key(fields, normalized: bool = False) -> bytes:
    """16-byte identity of a normalized example: the exact-dedup key and the split hash input."""
    joined = "\x1f".join(fields if normalized else [dedup_text(f) for f in fields])
    return hashlib.blake2b(joined.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int, normalized: bool = False):
    """Word n-grams of the compare-normalized text, the sets MinHash estimates Jaccard over."""
    words = (text if normalized else dedup_text(text)).split(" ")
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]
