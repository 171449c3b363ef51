"""Every secret this process knows, and every form of it hidden from what ``coe`` writes.

A backend that holds a credential (an API key read from the environment, the password or the
query string of a ``base_url``) adds it here as soon as it sees it; ``redact(text)`` then
replaces each of its forms by ``***``:

- raw, JSON-escaped and HTML-escaped;
- percent-encoded (``quote`` with and without ``/`` safe, ``quote_plus``; either hex case);
- base64 (standard and URL-safe, with or without padding) of the secret alone, and the part of
  it that any longer base64 text containing the secret must hold, at each of the three byte
  alignments it can take (so ``Basic base64(user:password)`` is hidden whatever comes first);
- for a URL: the password (as written and decoded), ``user:password``, the user when there is
  no password (``https://TOKEN@host``), the query string and each of its longer values.

Strings shorter than ``MIN_SECRET`` are placeholders (``EMPTY``), not secrets. Redact the
*whole* text before cutting it short: a secret cut in half is no longer its own
form. A text that goes out in pieces (a streamed answer) goes through a ``StreamRedactor``:
it holds back the last ``longest form - 1`` characters of what it has seen, so a secret split
across pieces is whole, and hidden, before any of it is let out. Library log records (``OPENAI_LOG=debug``) and uncaught tracebacks are redacted too,
once the first secret is known (a log-record factory and ``sys.excepthook``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import sys
import threading
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

MASK = "***"
MIN_SECRET = 6  # characters: shorter is a placeholder (EMPTY, none, dummy), not a secret, and
# hiding it would garble answers and messages
MIN_FORM = 6  # characters: an encoded form shorter than this is not looked for
MIN_GUESSED = 8  # characters: a query value or a password-less user shorter than this is
# taken for what it usually is (api-version=1, user@host), not for a secret


def _b64_forms(data: bytes) -> set[str]:
    out = set()
    for shift in range(3):  # the secret at each byte alignment inside longer base64
        enc = base64.b64encode(b"\0" * shift + data).decode()
        start = -(-shift * 4 // 3)  # the first character made of the secret's bits only
        end = (shift + len(data)) * 4 // 3  # ... and the last
        out.add(enc[start:end])
    whole = base64.b64encode(data).decode()
    out |= {whole, whole.rstrip("=")}
    return out | {f.translate(str.maketrans("+/", "-_")) for f in out}


def forms(secret: str) -> set[str]:
    """Every form of ``secret`` that is looked for (the raw secret itself always)."""
    out = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
           html.escape(secret), *_b64_forms(secret.encode())}
    for q in (quote(secret, safe=""), quote(secret), quote_plus(secret),
              quote_plus(secret, safe="/")):
        out |= {q, re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), q)}
    return {f for f in out if len(f) >= MIN_FORM} | {secret}


def url_secrets(url: str) -> list[str]:
    """The credentials written into a URL, each as written and percent-decoded: the password,
    user:password, a long user without a password, the query string and its long values."""
    u = urlsplit(url)
    found = []
    if u.password:
        found += [u.password, f"{u.username or ''}:{u.password}"]
    elif u.username and len(u.username) >= MIN_GUESSED:
        found.append(u.username)  # https://TOKEN@host
    if u.query:
        found.append(u.query)
        found += [v for _, v in parse_qsl(u.query) if len(v) >= MIN_GUESSED]
    return [s for x in found for s in {x, unquote(x)} if s]


class Secrets:
    """A set of secrets and one pattern matching every form of each (longest form first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._pattern: re.Pattern | None = None
        self.longest = 0  # characters of the longest form looked for

    def add(self, *secrets: str | None) -> None:
        new = {s for s in secrets if s and len(s) >= MIN_SECRET} - self._secrets
        if not new:
            return
        with self._lock:
            self._secrets |= new
            every = set().union(*(forms(s) for s in self._secrets))
            alternatives = sorted(every, key=lambda f: (-len(f), f))
            self.longest = len(alternatives[0])  # first: a stream's window is never short
            self._pattern = re.compile("|".join(map(re.escape, alternatives)))

    def add_url(self, url: str) -> None:
        self.add(*url_secrets(url))

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def stream(self) -> "StreamRedactor":
        return StreamRedactor(self)


class StreamRedactor:
    """Redaction of a text that arrives in pieces: ``feed(piece)`` returns what may go out
    now, ``flush()`` the rest once the text has ended. What comes out, joined, is exactly
    ``redact`` of the whole text, and no prefix of it holds a form of a secret, however the
    text was cut.

    A form is at most ``longest`` characters, so one that is not yet complete starts within
    the last ``longest - 1`` characters seen: those are held back. A match that starts before
    that tail is complete already (it would otherwise be longer than ``longest``), so
    everything up to its end goes out, masked. With no secret known, nothing is held."""

    def __init__(self, secrets: Secrets) -> None:
        self._secrets = secrets
        self._held = ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        pattern, window = self._secrets._pattern, self._secrets.longest - 1
        if pattern is None:
            self._held = ""
            return text
        cut = max(0, len(text) - window)
        out, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() >= cut:
                break
            out += [text[pos:m.start()], MASK]
            pos = m.end()
            cut = max(cut, pos)
        out.append(text[pos:cut])
        self._held = text[cut:]
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return self._secrets.redact(held)


SECRETS = Secrets()  # this process's
_hooks = threading.Lock()
_hooked = False


def redact(text: str) -> str:
    """``text`` with every form of every secret this process knows hidden."""
    return SECRETS.redact(text)


def stream() -> StreamRedactor:
    """A ``StreamRedactor`` over every secret this process knows (now and later)."""
    return SECRETS.stream()


def add(*secrets: str | None) -> None:
    SECRETS.add(*secrets)
    _install_hooks()


def add_url(url: str) -> None:
    SECRETS.add_url(url)
    if SECRETS:
        _install_hooks()


def _install_hooks() -> None:
    """Redact every log record as it is made (whatever logger or handler writes it, a
    library's debug log included) and every uncaught traceback."""
    global _hooked
    with _hooks:
        if _hooked:
            return
        _hooked = True
        make_record = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # a malformed record: leave it to logging's own error report
                return record
            hidden = redact(message)
            if hidden != message:
                record.msg, record.args = hidden, None
            if record.exc_info and record.exc_info[0] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            return record

        logging.setLogRecordFactory(factory)
        previous = sys.excepthook

        def excepthook(kind, value, tb) -> None:
            import traceback

            if previous is not sys.__excepthook__:
                return previous(kind, value, tb)
            sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

        sys.excepthook = excepthook
