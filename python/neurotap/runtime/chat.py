"""Chat templates rendered with Jinja from the GGUF's `tokenizer.chat_template`, as
llama-cpp-python's Jinja2ChatFormatter and llama-server render them.

The template and the special-token ids are read from the file's metadata by a small GGUF reader
(header and key/value section only, every length bounds-checked): importing llama_cpp here would
install its Python log callback in the decode thread, and the native model exposes no metadata.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from datetime import datetime
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

#: How Model renders chat messages: "jinja" (the GGUF's template, the default) or "builtin"
#: (llama.cpp's llama_chat_apply_template, which recognizes known template families).
CHAT_TEMPLATES = ("jinja", "builtin")
TEMPLATE_KEY = "tokenizer.chat_template"
# Names the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED = frozenset({"messages", "add_generation_prompt", "raise_exception"})

# GGUF value types: struct format of the fixed-size ones (little-endian by default).
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20
_MAX_DEPTH = 4


class GGUFMetadataError(ValueError):
    """The file is not a GGUF whose key/value section can be read."""


def check_chat_template(mode: str) -> str:
    if mode not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {mode!r}")
    return mode


class _Reader:
    def __init__(self, buf: Any, size: int, path: str):
        self.buf, self.size, self.path, self.pos, self.endian = buf, size, path, 0, "<"

    def bad(self, what: str) -> GGUFMetadataError:
        return GGUFMetadataError(f"{self.path}: not a readable GGUF file ({what} at byte {self.pos})")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.bad(f"truncated: {n} bytes wanted, {self.size - self.pos} left")
        at, self.pos = self.pos, self.pos + n
        return at

    def fixed(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        return struct.unpack_from(self.endian + fmt, self.buf, self.take(n))[0]

    def string(self, keep: bool = True) -> Optional[str]:
        n = self.fixed("Q")
        at = self.take(n)
        if not keep:
            return None
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("a string that is not UTF-8") from None

    def value(self, vtype: int, keep: bool, depth: int = 0) -> Any:
        if vtype in _FIXED:
            return self.fixed(_FIXED[vtype])
        if vtype == _STRING:
            return self.string(keep)
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise self.bad("arrays nested too deeply")
            itype, count = self.fixed("I"), self.fixed("Q")
            if itype in _FIXED:  # skipped in one step; only scalars are ever kept
                self.take(count * struct.calcsize(_FIXED[itype]))
                return None
            if itype not in (_STRING, _ARRAY):
                raise self.bad(f"unknown array item type {itype}")
            if count * 8 > self.size - self.pos:  # each item holds at least an 8-byte length
                raise self.bad(f"array of {count} items longer than the file")
            for _ in range(count):
                self.value(itype, False, depth + 1)
            return None
        raise self.bad(f"unknown value type {vtype}")


def read_metadata(path: str, keys: Iterable[str]) -> Dict[str, Any]:
    """The scalar metadata values of `keys` present in a GGUF file (arrays are skipped). Reads
    the header and the key/value section only; raises GGUFMetadataError for anything malformed."""
    want = set(keys)
    out: Dict[str, Any] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFMetadataError(f"{path}: not a GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf, size, str(path))
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFMetadataError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
            r.take(4)
            version = r.fixed("I")
            if version not in (2, 3):
                swapped = struct.unpack(">I", struct.pack("<I", version))[0]
                if swapped not in (2, 3):
                    raise r.bad(f"unsupported GGUF version {version}")
                r.endian = ">"
            r.fixed("Q")  # tensor count
            n_kv = r.fixed("Q")
            if n_kv > _MAX_KV:
                raise r.bad(f"implausible key count {n_kv}")
            for _ in range(n_kv):
                key = r.string()
                vtype = r.fixed("I")
                keep = key in want and vtype != _ARRAY
                v = r.value(vtype, keep)
                if keep:
                    out[key] = v
                    if len(out) == len(want):
                        break
    return out


# llama.cpp's vocabulary defaults when the file names no bos/eos id (src/llama-vocab.cpp).
_DEFAULT_SPECIAL = {"llama": (1, 2), "gpt2": (11, 11), "t5": (None, 1)}


def special_ids(meta: Mapping[str, Any], n_vocab: int) -> Tuple[Optional[int], Optional[int]]:
    """(bos, eos) token ids as llama.cpp's vocabulary resolves them: the metadata's, where in range,
    else the tokenizer type's default."""
    bos, eos = _DEFAULT_SPECIAL.get(str(meta.get("tokenizer.ggml.model", "")), (None, None))
    ids = []
    for key, default in (("tokenizer.ggml.bos_token_id", bos), ("tokenizer.ggml.eos_token_id", eos)):
        v = meta.get(key)
        ids.append(int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_vocab else default)
    return ids[0], ids[1]


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[Tuple[str, str]] = None, sort_keys: bool = False) -> str:
    # Transformers' (and llama-cpp-python's) tojson: unicode kept, no HTML escaping.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


class ChatTemplate:
    """One compiled Jinja chat template with the model's bos/eos token texts, configured as
    llama-cpp-python's Jinja2ChatFormatter (sandboxed, trim_blocks, lstrip_blocks, loop controls,
    `{% generation %}` ignored, Transformers' tojson, strftime_now)."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class IgnoreGenerationTags(jinja2.ext.Extension):
            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                parser.stream.skip(1)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               kwargs: Optional[Mapping[str, Any]] = None) -> str:
        """The prompt text; kwargs are extra template variables (chat_template_kwargs)."""
        import jinja2

        kwargs = dict(kwargs or {})
        clash = RESERVED & set(kwargs)
        if clash:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(clash))}")
        ctx: Dict[str, Any] = {"eos_token": self.eos_token, "bos_token": self.bos_token, "functions": None,
                               "function_call": None, "tools": None, "tool_choice": None,
                               "strftime_now": lambda f: datetime.now().strftime(f)}
        ctx.update(kwargs)
        try:
            return self._template.render(messages=[dict(m) for m in messages], raise_exception=_raise_exception,
                                         add_generation_prompt=add_generation_prompt, **ctx)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None


def load_template(path: str, n_vocab: int, token_text: Any, fallback: Optional[str] = None) -> Optional[ChatTemplate]:
    """The GGUF's default chat template with its bos/eos texts; `fallback` (the registry's template
    of a known model whose file carries none) where the file has none; else None.
    token_text(id) -> str gives a vocabulary entry, as llama_vocab_get_text."""
    meta = read_metadata(path, (TEMPLATE_KEY, "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                                "tokenizer.ggml.eos_token_id"))
    source = meta.get(TEMPLATE_KEY)
    if not isinstance(source, str) or not source:
        source = fallback
    if not source:
        return None
    bos, eos = special_ids(meta, n_vocab)
    return ChatTemplate(source, bos_token=token_text(bos) if bos is not None else "",
                        eos_token=token_text(eos) if eos is not None else "")


def check_messages(messages: Sequence[Any]) -> List[Mapping[str, Any]]:
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError("messages must be dicts with 'role' and 'content'")
        out.append(m)
    if not out:
        raise ValueError("messages is empty")
    return out
