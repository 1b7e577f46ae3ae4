"""PII and secret scrubbing for `lmforge prepare`: one document in, the document with every finding
replaced by a typed placeholder out.

    scrubber = Scrubber(mode="redact")            # or "drop" / "keep"; kinds=None means all KINDS
    result = scrubber.scrub(text)                 # ScrubResult(text, counts, drop)
    scrubber.settings()                           # what the dataset manifest records

Kinds and placeholders (`KINDS`; each finding becomes `<KIND>` in upper case):

- `email`  `<EMAIL>`: local@domain with a known top-level domain (any two-letter country code, the
  common generic ones, and internal ones such as `.corp`, `.internal`, `.local`), so that `x@self.w`
  (matrix product) and `user@host` are not addresses. Documentation domains reserved by RFC 2606 /
  6761 (`example.com|net|org`, `*.example`, `*.test`, `*.invalid`, `*.localhost`) are kept: they
  identify nobody, and docs keep their shape.
- `phone`  `<PHONE>`: international numbers written with `+` and a country code (any separators,
  `(0)` allowed), and national numbers in the shapes people write with an area code: North American
  `(415) 555-2671` / `415-555-2671` / `415.555.2671`, and trunk-prefix `0` numbers with separators
  (`020 7946 0958`, `030 1234567`, `089/1234567`, `01 23 45 67 89`). Every candidate must be a valid
  number for its country by Google's libphonenumber metadata (the `phonenumbers` package), national
  ones for one of `NATIONAL_REGIONS`. A bare run of digits is never a phone number (numeric IDs,
  timestamps, line numbers), nor is anything shaped like a date, a time, a version or a hash.
- `ip`  `<IP>`: IPv4 and IPv6, validated by `ipaddress`. Public *and private* unicast addresses are
  redacted (private ones map a company's internal network, which is what a company corpus is full
  of); loopback, unspecified, link-local, multicast, reserved and the documentation ranges
  (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are kept: they identify nothing.
  IPv6 is redacted only inside 2000::/3 (global unicast) and fc00::/7 (unique local), which is where
  real addresses live; `dead::beef` and slices like `x[1::2]` are not addresses. An IPv4 right after
  `version`, `release`, `rev`, `build`, `python`, `section`, `v` or `==`-style pins is a version, not an
  address, and so is one whose octets are all single digits (`1.2.3.4`, `2.7.2.2`, also `8.8.8.8`:
  such strings are versions, OIDs and section numbers far more often than someone's address).
- `credit_card`  `<CREDIT_CARD>`: 13-19 digits, plain or grouped by one kind of separator (space or
  `-`) in the groupings cards are printed with, an issuer prefix (Visa, Mastercard, Amex, Discover,
  JCB, Diners, UnionPay, Maestro) and a valid Luhn checksum.
- `iban`  `<IBAN>`: upper-case IBANs, compact or in groups of four, with the right length for their
  country and a valid ISO 7064 mod-97 checksum.
- `secret`  `<SECRET>`: private key blocks (`-----BEGIN ... PRIVATE KEY-----` to its END line, or to
  the end of the key text when END is missing), JWTs, tokens of well-known services (AWS access key
  ids, Google API keys and OAuth tokens/secrets, Azure AD client secrets, GitHub, GitLab, Slack,
  Stripe, OpenAI, Anthropic, Hugging Face, npm, PyPI, SendGrid, Shopify, DigitalOcean), the password
  in `scheme://user:password@host`, `Authorization: Bearer|Basic` credentials that mix digits or
  cases, and high-entropy values next to a credential key (`password=`,
  `secret:`, `"api_key": "..."`, `TOKEN=`, `AccountKey=` ...). For key/value pairs only the value
  is redacted (`password=<SECRET>`), so the model still learns that configs have passwords.

Placeholders are the same for every value of a kind (`<EMAIL>` for all addresses, no numbering): a
placeholder carries the shape and nothing of the value, not even whether two findings were equal,
and scrubbing is idempotent (a placeholder contains nothing detectable). Overlapping findings are
resolved by a fixed priority (secret, iban, credit_card, email, ip, phone), then by position, so a
URL's password wins over the `password@host` that looks like an e-mail address.

Modes: `redact` replaces findings; `drop` leaves the text as it is and sets `drop=True` when the
document has any finding (the caller drops it); `keep` only counts. The counts are the same in all
three modes. `scrub` is a pure function of (text, mode, kinds, the detector versions in
`DETECTOR_VERSIONS`, the phonenumbers metadata version): no state between calls, no randomness.

Speed: one RE2 pass over the document's UTF-8 bytes (a DFA: linear time, no input can make it
backtrack) finds where a kind could be; the exact `re` patterns, all bounded, run only in small
windows there (see "triggers" below). One core scrubs the standard library at ~20 MB/s and prose at
~60 MB/s on a loaded 2-core machine. `evaluate` scores a scrubber on a labelled set; the committed
one is tests/data/pii (made by scripts/make_pii_testset.py), and `benchmarks/pii.py` prints the
precision/recall table, the throughput and every finding in the standard library (docs/data.md).

Why not `detect-secrets`: it scans files line by line with global plugin settings, and its ad-hoc
line scan (`scan_line`) measured 0.023 MB/s on the standard library and flagged 175,677 strings in
1.7 MB (its entropy plugins fire on every hash, base64 blob and long identifier in code), so it
fits neither the per-document in-memory scan nor the precision goal. Its detector list informed
which services are covered here; the patterns are written from the services' documented formats.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
import re2

from lmforge.errors import ConfigError

KINDS: tuple[str, ...] = ("email", "phone", "ip", "credit_card", "iban", "secret")
MODES: tuple[str, ...] = ("redact", "drop", "keep")
# Bump a detector's version whenever its findings can change: the manifest records these, so a
# dataset says which detectors scrubbed it.
DETECTOR_VERSIONS: dict[str, int] = {kind: 1 for kind in KINDS}
# Overlaps between kinds are resolved in this order (the first kind wins).
_PRIORITY: tuple[str, ...] = ("secret", "iban", "credit_card", "email", "ip", "phone")
# Countries whose national (trunk prefix 0) numbers are recognised without a `+` country code.
NATIONAL_REGIONS: tuple[str, ...] = (
    "GB", "DE", "FR", "NL", "BE", "CH", "AT", "IT", "SE", "AU", "IN", "JP", "BR", "ZA", "NZ",
)


def placeholder(kind: str) -> str:
    return f"<{kind.upper()}>"


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class ScrubResult:
    text: str
    counts: dict[str, int]  # kind -> number of findings (only kinds with at least one)
    drop: bool  # mode "drop" and at least one finding


# --------------------------------------------------------------------------------------- triggers
# Python's `re` scans text at 5-50 MB/s (a leading lookbehind or a long alternation of words is at
# the slow end), so the detailed patterns never run over a whole document. One pass of RE2 (Google's
# linear-time engine: a DFA, so no pattern can backtrack catastrophically) over the UTF-8 bytes finds
# where a kind *could* be: a digit cluster (every IPv4, phone, card number and IBAN contains one), a
# run of hex and colons (IPv6), a credential word, the literal start of a service token. The detailed
# `re` patterns then run only in small windows around those places, or anchored at them; each is
# bounded (no nested unbounded quantifier), so a failing candidate costs a bounded number of steps.
# `@`, `://`, `PRIVATE KEY` and `Q~` are found with str.find, which is faster still.

_TRIGGER = re2.compile(
    rb"(\d[\d .\-()/]{5,}\d)"  # 1: digit cluster, seven characters or more
    rb"|(::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:)"  # 2: IPv6
    # 3: a credential word followed by an assignment, or an HTTP auth scheme followed by a token
    rb"|((?i:pass|pwd|secret|token|key|credential|sig)[A-Za-z0-9_\-]{0,24}[\"']?[ \t]*[:=]"
    rb"|(?i:bearer|basic)[ \t]+[A-Za-z0-9\-._~+/]{12})"
    rb"|(AKIA|ASIA|ABIA|ACCA|A3T|AIza|ya29\.|GOCSPX-|gh[pousr]_|github_pat_|glpat-|xox[abposr]-|[sr]k_live_"
    rb"|[sr]k_test_|whsec_|sk-|hf_|npm_|pypi-|SG\.|shp(?:at|ca|pa|ss)_|do[opr]_v1_|eyJ|hooks\.slack\.com/)"  # 4
)
_MARGIN = 36  # chars around a digit cluster: an IBAN's letters, a `+` or `(`, lookbehind context


def _windows(spans: Iterable[tuple[int, int]], before: int, after: int, n: int) -> list[tuple[int, int]]:
    """Merged windows [start - before, end + after) around sorted spans, clipped to [0, n)."""
    out: list[tuple[int, int]] = []
    for s, e in spans:
        s, e = max(0, s - before), min(n, e + after)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class _Doc:
    """A document and the places its detectors look at (one trigger pass per document)."""

    __slots__ = ("text", "digit_windows", "v6_windows", "words", "tokens")

    def __init__(self, text: str) -> None:
        self.text = text
        data = text.encode("utf-8", "surrogatepass")
        groups: list[list[tuple[int, int]]] = [[], [], [], []]
        for m in _TRIGGER.finditer(data):
            i = m.lastindex
            groups[i - 1].append(m.span(i))
        if not text.isascii():  # byte offsets -> str offsets (every trigger match is ASCII)
            groups = _char_offsets(data, groups)
        n = len(text)
        self.digit_windows = _windows(groups[0], _MARGIN, _MARGIN, n)
        self.v6_windows = _windows(groups[1], 45, 45, n)
        self.words = groups[2]
        self.tokens = groups[3]

    def finditer(self, pattern: re.Pattern[str], windows: list[tuple[int, int]]) -> Iterable[re.Match[str]]:
        for start, end in windows:
            yield from pattern.finditer(self.text, start, end)


def _char_offsets(data: bytes, groups: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
    """Map byte offsets into `data` (UTF-8) to offsets in the decoded str, in one pass."""
    points = sorted({o for spans in groups for span in spans for o in span})
    mapping, chars, prev = {}, 0, 0
    for o in points:
        chars += len(data[prev:o].decode("utf-8", "surrogatepass"))
        mapping[o], prev = chars, o
    return [[(mapping[s], mapping[e]) for s, e in spans] for spans in groups]


# ----------------------------------------------------------------------------------------- email

_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
# The domain after `@`: labels of at most 63 characters, then a top-level domain of letters.
_EMAIL_DOMAIN = re.compile(
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}([A-Za-z]{2,24}))(?![A-Za-z0-9\-])"
)
_GENERIC_TLDS = frozenset(
    """com org net edu gov mil int info biz name pro aero coop museum mobi asia tel travel jobs
    io ai dev app co me tv cc ly sh gg fm xyz online site tech store cloud page blog shop email
    systems solutions company consulting agency digital network media group global world life live
    news finance bank law health care capital partners services support team today works zone
    club design studio software codes tools technology academy center institute foundation
    security legal insurance energy realty money ventures holdings international berlin london
    paris nyc tokyo amsterdam wien swiss eu
    corp internal local lan intranet home localdomain""".split()
)
_RESERVED_DOMAINS = ("example.com", "example.net", "example.org")
_RESERVED_TLDS = frozenset(("example", "test", "invalid", "localhost"))


def _emails(doc: _Doc) -> Iterable[tuple[int, int]]:
    text = doc.text
    at = text.find("@")
    while at != -1:
        m = _EMAIL_DOMAIN.match(text, at)
        if m is not None:
            # The local part: up to 64 local characters back from `@` (RFC 5321), starting with a
            # letter or digit; a longer run is not an address.
            start = at
            while start > at - 65 and start > 0 and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            while start < at and not text[start].isalnum():
                start += 1
            domain, tld = m.group(1).lower(), m.group(2).lower()
            if (
                start < at
                and at - start <= 64
                and (start == 0 or text[start - 1] not in _LOCAL_CHARS)
                and (len(tld) == 2 or tld in _GENERIC_TLDS)
                and tld not in _RESERVED_TLDS
                and not any(domain == d or domain.endswith("." + d) for d in _RESERVED_DOMAINS)
                # user:password@host in a URL is a password (secret), not an address
                and not (start > 0 and text[start - 1] == ":" and "://" in text[max(0, start - 80):start])
            ):
                yield start, m.end()
        at = text.find("@", at + 1)


# -------------------------------------------------------------------------------------------- ip

# (not inside a longer dotted number, and not a reverse-DNS name: 1.0.0.127.in-addr.arpa)
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?!\w|\.\d|\.in-addr\.)")
# What precedes an IPv4-shaped version or section number: "version 1.2.3.4", "==1.2.3.4",
# "section 8.2.4.44", "Python 3.11.0.1", "prior to 1.2.5.3".
_VERSION_CONTEXT = re.compile(
    r"(?i)(?:\b(?:version|ver|release|rel|rev|revision|build|python|firmware|v|sections?|chapter|rfc|prior to"
    r"|since|before|after|until)\W{0,3}|[=<>~!]=\s*|§\s*|section-)$"
)
# Hex groups with at least two colons; bounded everywhere, so failing candidates cost O(1) each.
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}::?[0-9A-Fa-f])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
    r"(?:\.\d{1,3}){0,3}(?![\w:]|\.\d)"
)
_V4_KEPT = [
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "192.0.2.0/24", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")
]
_V6_REDACTED = [ipaddress.ip_network("2000::/3"), ipaddress.ip_network("fc00::/7")]
_V6_DOC = ipaddress.ip_network("2001:db8::/32")


def _v4_redacted(addr: ipaddress.IPv4Address) -> bool:
    return not any(addr in net for net in _V4_KEPT)


def _ips(doc: _Doc) -> Iterable[tuple[int, int]]:
    text = doc.text
    for m in doc.finditer(_IPV4, doc.digit_windows):
        octets = m.groups()
        if any(int(g) > 255 or (len(g) > 1 and g[0] == "0") for g in octets):
            continue
        # Every octet a single digit (1.2.3.4, 2.7.2.2, 8.8.8.8): far more often a version, a
        # section or an OID than a person's address.
        if all(len(g) == 1 for g in octets):
            continue
        if not _v4_redacted(ipaddress.IPv4Address(m.group(0))):
            continue
        if _VERSION_CONTEXT.search(text, max(0, m.start() - 24), m.start()):
            continue
        yield m.start(), m.end()
    for m in doc.finditer(_IPV6, doc.v6_windows):
        try:
            addr = ipaddress.IPv6Address(m.group(0))
        except ValueError:
            continue
        if addr.ipv4_mapped is not None:
            if _v4_redacted(addr.ipv4_mapped):
                yield m.start(), m.end()
            continue
        if addr in _V6_DOC or not any(addr in net for net in _V6_REDACTED):
            continue
        yield m.start(), m.end()


# ----------------------------------------------------------------------------------------- phone

# International: `+` country code, then a run of digits and separators (one character class, so
# linear); trimmed and validated in Python.
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d[\d ().\-/]{6,24}\d")
_SIGNED_DECIMAL = re.compile(r"\+\d+\.\d+")
# North American: (415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671, 1-415-555-2671.
_PHONE_NANP = re.compile(
    r"(?<![\w.+\-/(])(?<!\d )(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w]|[.\-/]\d| \d)"
)
# Trunk prefix 0 with at least one separator: 020 7946 0958, 030 1234567, 089/1234567, (030) 1234567,
# 01 23 45 67 89, 01.23.45.67.89, 06-12345678.
_PHONE_NATIONAL = re.compile(
    r"(?<![\w.+\-/(:])(?<!\d )(?:\(0\d{1,4}\) ?|0\d{1,5}[ \-/.])\d{2,8}(?:[ \-.]\d{2,4}){0,3}(?![\w]|[.\-/:]\d| \d)"
)
_FRENCH_DOTTED = re.compile(r"0\d(?:\.\d\d){4}")
_DATE_LIKE = re.compile(r"\d{1,4}([./\-])\d{1,2}\1\d{1,4}")
_PHONE_SEPARATORS = re.compile(r"[ ().\-/]+")


def _valid_phone(candidate: str, region: str | None) -> bool:
    try:
        number = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(number)


def _phones(doc: _Doc) -> Iterable[tuple[int, int]]:
    windows = doc.digit_windows
    if "+" in doc.text:
        for m in doc.finditer(_PHONE_INTL, windows):
            # The run may have swallowed a following number ("+1 415 555 2671 12 items"): drop
            # trailing groups until the number is valid.
            cand, start = m.group(0), m.start()
            if _SIGNED_DECIMAL.fullmatch(cand):
                continue  # +35236450.6 is a number, not a phone
            for _ in range(4):
                digits = sum(c.isdigit() for c in cand)
                if digits < 8:
                    break
                if digits <= 15 and _valid_phone(cand, None):
                    yield start, start + len(cand)
                    break
                cut = max(cand.rfind(" "), cand.rfind("-"), cand.rfind("."), cand.rfind("/"))
                if cut <= 2:
                    break
                cand = cand[:cut].rstrip(" ().-/")
    for m in doc.finditer(_PHONE_NANP, windows):
        if not _DATE_LIKE.fullmatch(m.group(0)) and _valid_phone(m.group(0), "US"):
            yield m.start(), m.end()
    for m in doc.finditer(_PHONE_NATIONAL, windows):
        cand = m.group(0)
        if _DATE_LIKE.fullmatch(cand) or ("." in cand and not _FRENCH_DOTTED.fullmatch(cand)):
            continue  # dots only in the French 01.23.45.67.89 shape; else versions and dates
        if not 9 <= len(_PHONE_SEPARATORS.sub("", cand)) <= 12:
            continue
        if any(_valid_phone(cand, region) for region in NATIONAL_REGIONS):
            yield m.start(), m.end()


# ----------------------------------------------------------------------------------- credit_card

_CARD = re.compile(r"(?<![\w.\-])\d(?:[ \-]?\d){12,18}(?![\d]|[.\-]\d)")
# Groupings cards are printed with (digits per group).
_CARD_GROUPS = {(4, 4, 4, 4), (4, 6, 5), (4, 6, 4), (4, 4, 4, 4, 3), (4, 4, 4, 4, 2), (4, 4, 4, 4, 1), (4, 4, 4, 1),
                (4, 4, 4, 2), (4, 4, 4, 3), (4, 4, 5), (6, 13)}
_CARD_PREFIX = re.compile(
    r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|30[0-5]|3[689]|35(?:2[89]|[3-8]\d)|6(?:011|5|4[4-9]|2)|5[06-9]"
)
_AMEX, _DINERS = re.compile(r"3[47]"), re.compile(r"3(?:0[0-5]|[689])")


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _plain_card_length_ok(digits: str) -> bool:
    """Lengths of card numbers written without separators (a long bare integer is rarely a card)."""
    n = len(digits)
    return n == 16 or (n == 15 and _AMEX.match(digits) is not None) or (
        n == 14 and _DINERS.match(digits) is not None) or (n == 13 and digits[0] == "4")


def _cards(doc: _Doc) -> Iterable[tuple[int, int]]:
    for m in doc.finditer(_CARD, doc.digit_windows):
        cand = m.group(0)
        seps = {c for c in cand if not c.isdigit()}
        if len(seps) > 1:
            continue
        digits = cand.replace(" ", "").replace("-", "")
        if seps:
            if tuple(len(g) for g in re.split(r"[ \-]", cand)) not in _CARD_GROUPS:
                continue
        elif not _plain_card_length_ok(digits):
            continue
        if len(set(digits)) < 2 or not _CARD_PREFIX.match(digits) or not luhn_ok(digits):
            continue
        yield m.start(), m.end()


# ------------------------------------------------------------------------------------------ iban

# IBAN length per country (ISO 13616 registry).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")


def iban_ok(iban: str) -> bool:
    """Country length and ISO 7064 mod-97 checksum of a compact upper-case IBAN."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(doc: _Doc) -> Iterable[tuple[int, int]]:
    for m in doc.finditer(_IBAN, doc.digit_windows):
        cand = m.group(0)
        compact = cand.replace(" ", "")
        want = IBAN_LENGTHS.get(compact[:2])
        if want is None or len(compact) < want:
            continue
        if len(compact) > want:
            # A following upper-case word was taken as a group: cut back to the country's length.
            end, seen = 0, 0
            while seen < want:
                seen += cand[end] != " "
                end += 1
            if end < len(cand) and cand[end] != " ":
                continue
            cand, compact = cand[:end], compact[:want]
        if iban_ok(compact):
            yield m.start(), m.start() + len(cand)


# ---------------------------------------------------------------------------------------- secret

# Tokens of well-known services, each starting with a literal (so the scan is fast) and bounded by
# non-token characters (checked in Python: a leading lookbehind would make the scan slow).
_TOKEN_PATTERNS = {
    "aws_access_key_id": r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}",
    "google_api_key": r"AIza[0-9A-Za-z_\-]{35}",
    "google_oauth_token": r"ya29\.[0-9A-Za-z_\-]{20,}",
    "google_oauth_secret": r"GOCSPX-[0-9A-Za-z_\-]{28}",
    "github_token": r"gh[pousr]_[A-Za-z0-9]{36,255}",
    "github_pat": r"github_pat_[A-Za-z0-9_]{22,255}",
    "gitlab_token": r"glpat-[A-Za-z0-9_\-]{20,}",
    "slack_token": r"xox[abposr]-[A-Za-z0-9\-]{10,}",
    "slack_webhook": r"hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+",
    "stripe_key": r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",
    "stripe_webhook_secret": r"whsec_[A-Za-z0-9]{24,}",
    "anthropic_key": r"sk-ant-[a-z0-9]+-[A-Za-z0-9_\-]{40,}",
    "openai_key": r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{32,}",
    "huggingface_token": r"hf_[A-Za-z0-9]{30,}",
    "npm_token": r"npm_[A-Za-z0-9]{36}",
    "pypi_token": r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}",
    "sendgrid_key": r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}",
    "shopify_token": r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}",
    "digitalocean_token": r"do[opr]_v1_[a-f0-9]{64}",
    "jwt": r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
}
_TOKENS = re.compile("|".join(_TOKEN_PATTERNS.values()))
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
# Azure AD client secrets (3 characters, a digit, `Q~`, 31-34 more) have no literal prefix: found
# from their `Q~`.
_AZURE_SECRET = re.compile(r"(?<![A-Za-z0-9_~.\-])[A-Za-z0-9_~.\-]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}(?![A-Za-z0-9_~.\-])")
_PRIVATE_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PRIVATE_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")
# When END is missing (a truncated paste): the lines of base64 (or PEM headers) after BEGIN, real or
# escaped (\\n in JSON) newlines, up to the first line that is neither.
_KEY_BODY = re.compile(r"(?:(?:\r?\n|\\n)(?:[A-Za-z0-9+/=]{1,128}|[A-Za-z\-]{1,30}: [^\n\\]{0,128}))*")
_MAX_KEY_BLOCK = 65536

# scheme://user:password@host (the `://` is found first; this matches from there).
_URL_PASSWORD = re.compile(r"://[^\s:/@\"'<>]{1,64}:([^\s:/@\"'<>]{1,128})@[A-Za-z0-9\[]")
_URL_PASSWORD_PLACEHOLDERS = frozenset(
    ("password", "pass", "passwd", "pwd", "secret", "pw", "p", "x", "xxx", "***", "****", "token")
)


# A credential word (inside a longer identifier too: DB_PASSWORD, dbPassword, "api-key"), an optional
# suffix, an assignment (= : := => == and quotes around the key), then a quoted or a bare value.
# Matched anchored at the word the trigger pass found.
_KEY_VALUE = re.compile(
    r"(?P<word>(?i:password|passwd|passphrase|pass|pwd|secret|token|key|credentials?|sig))"
    r"(?i:[_\-]?(?:key|value|str|string|hash))?(?![A-Za-z0-9])[\"']?[ \t]*(?P<op>:=|=>|==?|:)[ \t]*"
    r"(?:[bru]?(?P<quote>[\"'])(?P<q>[^\"'\n]{1,256})(?P=quote)|(?P<bare>[^\s\"'`,;()\[\]{}<>]{1,256})(?P<after>.?))"
)
_CRED_WORD = re.compile(r"(?i:pass|pwd|secret|token|key|credential|sig)")
# An HTTP Authorization scheme and its credentials (RFC 6750 / 7617 token characters).
_AUTH_SCHEME = re.compile(r"(?i:bearer|basic)[ \t]+([A-Za-z0-9\-._~+/]{12,512}=*)(?![A-Za-z0-9\-._~+/=])")
# `key` alone is not a credential word (dict keys are everywhere); api_key, accessKey, ... are.
_KEY_PREFIX = re.compile(r"(?i:api|access|auth|private|account|secret|signing|encryption|master|client)[_\-]?$")
# Values that are code, templates or placeholders, not secrets.
_NOT_A_VALUE = re.compile(
    r"(?i)^(?:none|null|nil|true|false|undefined|required|optional|string|str|bytes|int)$|\$\{|\{\{|%\(|%s"
    r"|^<.*>$|xxx|\*\*\*|\.\.\.|example|placeholder|your[_\-]|changeme|dummy"
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _secret_value(value: str, bare: bool) -> bool:
    """A value next to a credential key that looks like a real secret (not code, not a dummy)."""
    if len(value) < 8 or len(set(value)) < 5 or _NOT_A_VALUE.search(value):
        return False
    if bare and _IDENTIFIER.fullmatch(value) and ("_" in value or "." in value or not any(c.isdigit() for c in value)):
        return False  # a name in code (self.password, KEY_PASSWORD, getpass_bytes), not a value
    if bare and value.startswith(("/", "./", "~", "http://", "https://")):
        return False
    # 3 bits per character, or less for short values (a 10-character password cannot reach 3.3)
    return entropy(value) >= min(3.0, 0.85 * math.log2(len(value))) and (any(c.isdigit() for c in value) or not value.isalpha() or len(value) >= 16)


def _token_like(value: str) -> bool:
    """A credential after `Bearer`/`Basic`: mixes digits or both cases (not "basic customization.")."""
    mixed = any(c.isdigit() for c in value) or (sum(c.isupper() for c in value) >= 2 and sum(c.islower() for c in value) >= 2)
    return mixed and _secret_value(value, bare=False)


def _secrets(doc: _Doc) -> Iterable[tuple[int, int]]:
    text = doc.text
    pos = 0
    if "PRIVATE KEY" in text:
        while (m := _PRIVATE_KEY_BEGIN.search(text, pos)) is not None:
            end_m = _PRIVATE_KEY_END.search(text, m.end(), m.end() + _MAX_KEY_BLOCK)
            end = end_m.end() if end_m else _KEY_BODY.match(text, m.end(), m.end() + _MAX_KEY_BLOCK).end()
            yield m.start(), end
            pos = end
    for start, _ in doc.tokens:
        m = _TOKENS.match(text, start)
        if m is None:
            continue
        end = m.end()
        if (start > 0 and text[start - 1] in _TOKEN_CHARS) or (end < len(text) and text[end] in _TOKEN_CHARS):
            continue
        token = m.group(0)
        if token.startswith("sk-") and not (any(c.isdigit() for c in token) and any(c.isupper() for c in token)):
            continue  # OpenAI keys mix digits and upper case; sk-some-long-identifier-name does not
        if token.startswith("hooks."):
            start += len("hooks.slack.com/services/")
        yield start, end
    if "Q~" in text:
        yield from (m.span() for m in _AZURE_SECRET.finditer(text))
    at = text.find("://")
    while at != -1:
        m = _URL_PASSWORD.match(text, at)
        if m is not None:
            pw = m.group(1)
            if not (pw.lower() in _URL_PASSWORD_PLACEHOLDERS or _NOT_A_VALUE.search(pw) or pw[0] in "$%{"):
                yield m.span(1)
        at = text.find("://", at + 3)
    for trigger_start, trigger_end in doc.words:
        if text[trigger_start] in "bB":  # Authorization: Bearer <token> / Basic <base64 of user:password>
            m = _AUTH_SCHEME.match(text, trigger_start)
            if m is not None and (trigger_start == 0 or not text[trigger_start - 1].isalnum()) and _token_like(m.group(1)):
                yield m.span(1)
                continue
        # The trigger spans "word...=": the key may be any credential word in it (aws_secret_access_key
        # is a key, not a secret).
        for word in _CRED_WORD.finditer(text, trigger_start, trigger_end):
            span = _key_value_at(text, word.start())
            if span is not None:
                yield span
                break


def _key_value_at(text: str, start: int) -> tuple[int, int] | None:
    """The span of a secret value assigned to the credential word at `start`, if there is one."""
    m = _KEY_VALUE.match(text, start)
    if m is None:
        return None
    if m.group("word").lower() == "key":
        prefix = _KEY_PREFIX.search(text, max(0, start - 12), start)
        if prefix is None:
            return None
        start = prefix.start()
    # The key starts an identifier part: after a non-letter (DB_PASSWORD, "password") or at a
    # camelCase boundary (dbPassword); not inside a word (bypass, mysig).
    if start > 0 and text[start - 1].isalnum() and not (text[start - 1].islower() and text[start].isupper()):
        return None
    if m.group("q") is not None:
        return m.span("q") if _secret_value(m.group("q"), bare=False) else None
    if m.group("op") != "==" and m.group("after") not in ("(", "[") and _secret_value(m.group("bare"), bare=True):
        return m.span("bare")
    return None


_DETECTORS = {
    "email": _emails,
    "phone": _phones,
    "ip": _ips,
    "credit_card": _cards,
    "iban": _ibans,
    "secret": _secrets,
}


# -------------------------------------------------------------------------------------- scrubber


class Scrubber:
    """Finds PII and secrets in a document and redacts, drops or only counts them (see module doc)."""

    def __init__(self, mode: str = "redact", kinds: Iterable[str] | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"PII mode {mode!r} is not one of {', '.join(MODES)}")
        chosen = set(KINDS) if kinds is None else set(kinds)
        unknown = sorted(chosen - set(KINDS))
        if unknown:
            raise ConfigError(f"unknown PII kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
        self.mode = mode
        self.kinds = tuple(k for k in _PRIORITY if k in chosen)  # in priority order

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings sorted by start; overlaps resolved by kind priority, then position."""
        starts: list[int] = []  # accepted spans, sorted and disjoint
        ends: list[int] = []
        kinds: list[str] = []
        doc = _Doc(text)
        for kind in self.kinds:
            for start, end in _DETECTORS[kind](doc):
                i = bisect.bisect_right(starts, start)
                # disjoint from the accepted span before (i - 1) and the one after (i)
                if start < end and (i == 0 or ends[i - 1] <= start) and (i == len(starts) or end <= starts[i]):
                    starts.insert(i, start)
                    ends.insert(i, end)
                    kinds.insert(i, kind)
        return [Finding(s, e, k) for s, e, k in zip(starts, ends, kinds)]

    def scrub(self, text: str) -> ScrubResult:
        findings = self.find(text)
        counts = dict(sorted(Counter(f.kind for f in findings).items()))
        if self.mode != "redact" or not findings:
            return ScrubResult(text, counts, drop=self.mode == "drop" and bool(findings))
        parts, pos = [], 0
        for f in findings:
            parts.append(text[pos:f.start])
            parts.append(placeholder(f.kind))
            pos = f.end
        parts.append(text[pos:])
        return ScrubResult("".join(parts), counts, drop=False)

    def settings(self) -> dict:
        """What a dataset manifest records about this scrubber: enough to say what was scrubbed how."""
        return {
            "mode": self.mode,
            "kinds": sorted(self.kinds),
            "placeholders": {k: placeholder(k) for k in sorted(self.kinds)},
            "detector_versions": {k: DETECTOR_VERSIONS[k] for k in sorted(self.kinds)},
            "national_phone_regions": list(NATIONAL_REGIONS),
            "libraries": {"phonenumbers": phonenumbers.__version__, "google-re2": importlib.metadata.version("google-re2")},
        }


# ------------------------------------------------------------------------------------ evaluation


def evaluate(docs: Iterable[dict], scrubber: Scrubber | None = None) -> dict:
    """Score a scrubber on labelled documents ({"id", "text", "planted": [{"start", "end", "kind"}]},
    the format of tests/data/pii/*.jsonl).

    A planted span is *recalled* when a finding of its kind covers it; a finding is *true* when it
    overlaps a planted span of its kind, else it is a false positive (listed in "false_positives").
    Returns {"kinds": {kind: {"planted", "recalled", "recall", "findings", "true", "precision"}},
    "documents", "documents_with_false_positive", "false_positives"}.
    """
    scrubber = scrubber or Scrubber()
    per = {k: {"planted": 0, "recalled": 0, "findings": 0, "true": 0} for k in scrubber.kinds}
    false: list[dict] = []
    n_docs, docs_false = 0, set()
    for doc in docs:
        n_docs += 1
        text, planted = doc["text"], [p for p in doc["planted"] if p["kind"] in per]
        findings = scrubber.find(text)
        for p in planted:
            per[p["kind"]]["planted"] += 1
            per[p["kind"]]["recalled"] += any(
                f.kind == p["kind"] and f.start <= p["start"] and p["end"] <= f.end for f in findings)
        for f in findings:
            per[f.kind]["findings"] += 1
            if any(p["kind"] == f.kind and f.start < p["end"] and p["start"] < f.end for p in planted):
                per[f.kind]["true"] += 1
            else:
                docs_false.add(doc["id"])
                false.append({"id": doc["id"], "kind": f.kind, "text": text[f.start:f.end],
                              "context": text[max(0, f.start - 30):f.end + 30]})
    for row in per.values():
        row["recall"] = row["recalled"] / row["planted"] if row["planted"] else None
        row["precision"] = row["true"] / row["findings"] if row["findings"] else None
    return {"kinds": per, "documents": n_docs, "documents_with_false_positive": len(docs_false),
            "false_positives": false}
