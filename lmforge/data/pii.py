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
  `version`, `release`, `rev`, `build`, `python`, `v` or `==`-style pins is a version, not an address.
- `credit_card`  `<CREDIT_CARD>`: 13-19 digits, plain or grouped by one kind of separator (space or
  `-`) in the groupings cards are printed with, an issuer prefix (Visa, Mastercard, Amex, Discover,
  JCB, Diners, UnionPay, Maestro) and a valid Luhn checksum.
- `iban`  `<IBAN>`: upper-case IBANs, compact or in groups of four, with the right length for their
  country and a valid ISO 7064 mod-97 checksum.
- `secret`  `<SECRET>`: private key blocks (`-----BEGIN ... PRIVATE KEY-----` to its END line, or to
  the end of the key text when END is missing), JWTs, tokens of well-known services (AWS access key
  ids, Google API keys and OAuth tokens/secrets, Azure AD client secrets, GitHub, GitLab, Slack,
  Stripe, OpenAI, Anthropic, Hugging Face, npm, PyPI, SendGrid, Shopify, DigitalOcean), the password
  in `scheme://user:password@host`, and high-entropy values next to a credential key (`password=`,
  `secret:`, `"api_key": "..."`, `TOKEN=`, `AccountKey=` ...). For key/value pairs only the value
  is redacted (`password=<SECRET>`), so the model still learns that configs have passwords.

Placeholders are the same for every value of a kind (`<EMAIL>` for all addresses, no numbering): a
placeholder carries the shape and nothing of the value, not even whether two findings were equal,
and scrubbing is idempotent (a placeholder contains nothing detectable). Overlapping findings are
resolved by a fixed priority (secret, credit_card, iban, email, ip, phone), then by position, so a
URL's password wins over the `password@host` that looks like an e-mail address.

Modes: `redact` replaces findings; `drop` leaves the text as it is and sets `drop=True` when the
document has any finding (the caller drops it); `keep` only counts. The counts are the same in all
three modes. `scrub` is a pure function of (text, mode, kinds, the detector versions in
`DETECTOR_VERSIONS`, the phonenumbers metadata version): no state between calls, no randomness.

Speed: every detector is a linear-time regex over the whole document (no nested unbounded
quantifiers; ambiguous parts are bounded), most with a cheap prefilter (`@` for e-mail, `://` for
URL passwords, a key word for key/value secrets), followed by Python validation of the few
candidates. Measured figures and the labelled test set are in docs/data.md ("PII and secrets") and
`benchmarks/pii.py`.

Why not `detect-secrets`: it scans files line by line with global plugin settings, and its ad-hoc
line scan (`scan_line`) measured 0.023 MB/s on the standard library and flagged 175,677 strings in
1.7 MB (its entropy plugins fire on every hash, base64 blob and long identifier in code), so it
fits neither the per-document in-memory scan nor the precision goal. Its detector list informed
which services are covered here; the patterns are written from the services' documented formats.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers

from lmforge.errors import ConfigError

KINDS: tuple[str, ...] = ("email", "phone", "ip", "credit_card", "iban", "secret")
MODES: tuple[str, ...] = ("redact", "drop", "keep")
# Bump a detector's version whenever its findings can change: the manifest records these, so a
# dataset says which detectors scrubbed it.
DETECTOR_VERSIONS: dict[str, int] = {kind: 1 for kind in KINDS}
# Overlaps between kinds are resolved in this order (the first kind wins).
_PRIORITY: tuple[str, ...] = ("secret", "credit_card", "iban", "email", "ip", "phone")
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


# ----------------------------------------------------------------------------------------- email

# Local part at most 64 characters (RFC 5321) and starting where a run of local characters starts,
# so a long run without `@` is scanned once, not once per position.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}([A-Za-z]{2,24}))(?![A-Za-z0-9\-])"
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


def _emails(text: str) -> Iterable[tuple[int, int]]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        domain, tld = m.group(1).lower(), m.group(2).lower()
        if len(tld) != 2 and tld not in _GENERIC_TLDS:
            continue
        if tld in _RESERVED_TLDS or any(domain == d or domain.endswith("." + d) for d in _RESERVED_DOMAINS):
            continue
        yield m.start(), m.end()


# -------------------------------------------------------------------------------------------- ip

_IPV4 = re.compile(r"(?<![\w.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?!\w|\.\d)")
# What precedes an IPv4-shaped version: "version 1.2.3.4", "v 1.2.3.4", "==1.2.3.4", "Python 3.11.0.1".
_VERSION_CONTEXT = re.compile(
    r"(?i)(?:\b(?:version|ver|release|rel|rev|revision|build|python|firmware|v)\s*[:=]?|[=<>~!]=|\bv)\s*$"
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


def _ips(text: str) -> Iterable[tuple[int, int]]:
    if "." in text:
        for m in _IPV4.finditer(text):
            if any(int(g) > 255 or (len(g) > 1 and g[0] == "0") for g in m.groups()):
                continue
            if not _v4_redacted(ipaddress.IPv4Address(m.group(0))):
                continue
            if _VERSION_CONTEXT.search(text, max(0, m.start() - 24), m.start()):
                continue
            yield m.start(), m.end()
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
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
# North American: (415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671, 1-415-555-2671.
_PHONE_NANP = re.compile(
    r"(?<![\w.+\-/(])(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}([ .\-]))\d{3}[ .\-]\d{4}(?![\w]|[.\-/]\d)"
)
# Trunk prefix 0 with at least one separator: 020 7946 0958, 030 1234567, 089/1234567, (030) 1234567,
# 01 23 45 67 89, 01.23.45.67.89, 06-12345678.
_PHONE_NATIONAL = re.compile(
    r"(?<![\w.+\-/(:])(?:\(0\d{1,4}\) ?|0\d{1,4}[ \-/.])\d{2,8}(?:[ \-.]\d{2,4}){0,3}(?![\w]|[.\-/:]\d)"
)
_DATE_LIKE = re.compile(r"\d{1,4}([./\-])\d{1,2}\1\d{1,4}")
_PHONE_SEPARATORS = re.compile(r"[ ().\-/]+")


def _valid_phone(candidate: str, region: str | None) -> bool:
    try:
        number = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(number)


def _phones(text: str) -> Iterable[tuple[int, int]]:
    if "+" in text:
        for m in _PHONE_INTL.finditer(text):
            # The run may have swallowed a following number ("+1 415 555 2671 12 items"): drop
            # trailing groups until the number is valid.
            cand, start = m.group(0), m.start()
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
    for m in _PHONE_NANP.finditer(text):
        if _DATE_LIKE.fullmatch(m.group(0)):
            continue
        if _valid_phone(m.group(0), "US"):
            yield m.start(), m.end()
    for m in _PHONE_NATIONAL.finditer(text):
        cand = m.group(0)
        if _DATE_LIKE.fullmatch(cand) or ("." in cand and not re.fullmatch(r"0\d(?:\.\d\d){4}", cand)):
            continue  # dots only in the French 01.23.45.67.89 shape; else versions and dates
        digits = len(_PHONE_SEPARATORS.sub("", cand))
        if not 9 <= digits <= 12:
            continue
        if any(_valid_phone(cand, region) for region in NATIONAL_REGIONS):
            yield m.start(), m.end()


# ----------------------------------------------------------------------------------- credit_card

_CARD = re.compile(r"(?<![\d.\-])\d(?:[ \-]?\d){12,18}(?![\d]|[.\-]\d)")
# Groupings cards are printed with (digits per group).
_CARD_GROUPS = {(4, 4, 4, 4), (4, 6, 5), (4, 6, 4), (4, 4, 4, 4, 3), (4, 4, 4, 4, 2), (4, 4, 4, 4, 1), (4, 4, 4, 1),
                (4, 4, 4, 2), (4, 4, 4, 3), (4, 4, 5), (6, 13)}
_CARD_PREFIX = re.compile(
    r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|30[0-5]|3[689]|35(?:2[89]|[3-8]\d)|6(?:011|5|4[4-9]|2)|5[06-9]"
)


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for m in _CARD.finditer(text):
        cand = m.group(0)
        seps = {c for c in cand if not c.isdigit()}
        if len(seps) > 1:
            continue
        if seps:
            groups = tuple(len(g) for g in re.split(r"[ \-]", cand))
            if groups not in _CARD_GROUPS:
                continue
        digits = cand.replace(" ", "").replace("-", "")
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


def _ibans(text: str) -> Iterable[tuple[int, int]]:
    for m in _IBAN.finditer(text):
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

_B = r"(?<![A-Za-z0-9_\-])"  # a token starts here
_E = r"(?![A-Za-z0-9_\-])"  # and ends here
_TOKEN_PATTERNS = {
    "aws_access_key_id": r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}",
    "google_api_key": r"AIza[0-9A-Za-z_\-]{35}",
    "google_oauth_token": r"ya29\.[0-9A-Za-z_\-]{20,}",
    "google_oauth_secret": r"GOCSPX-[0-9A-Za-z_\-]{28}",
    "azure_client_secret": r"[A-Za-z0-9_~.\-]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}",
    "github_token": r"gh[pousr]_[A-Za-z0-9]{36,255}",
    "github_pat": r"github_pat_[A-Za-z0-9_]{22,255}",
    "gitlab_token": r"glpat-[A-Za-z0-9_\-]{20,}",
    "slack_token": r"xox[abposr]-[A-Za-z0-9\-]{10,}",
    "slack_webhook": r"(?<=hooks\.slack\.com/services/)T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+",
    "stripe_key": r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
    "stripe_webhook_secret": r"whsec_[A-Za-z0-9]{24,}",
    "anthropic_key": r"sk-ant-[a-z0-9]+-[A-Za-z0-9_\-]{40,}",
    "openai_key": r"sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_\-]{32,}",
    "huggingface_token": r"hf_[A-Za-z0-9]{30,}",
    "npm_token": r"npm_[A-Za-z0-9]{36}",
    "pypi_token": r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}",
    "sendgrid_key": r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}",
    "shopify_token": r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}",
    "digitalocean_token": r"do[opr]_v1_[a-f0-9]{64}",
    "jwt": r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
}
_TOKENS = re.compile(_B + "(?:" + "|".join(_TOKEN_PATTERNS.values()) + ")" + _E)
_PRIVATE_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PRIVATE_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_KEY_BODY = re.compile(r"(?:[A-Za-z0-9+/=:, \t\r\n\-]|\\n)*")  # when END is missing: the key text
_MAX_KEY_BLOCK = 65536

_URL_PASSWORD = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]{1,15}://[^\s:/@\"'<>]{1,64}:([^\s:/@\"'<>]{1,128})@[A-Za-z0-9\[]")
# A credential key (possibly inside a longer identifier: DB_PASSWORD, dbPassword, "api-key"), an
# assignment (= : := => == and quotes around the key), then a quoted or bare value.
_CRED_KEY = (
    r"(?:pass(?:word|wd|phrase)?|pwd|secret|token|api[_\-]?key|apikey|access[_\-]?key|auth[_\-]?key"
    r"|private[_\-]?key|account[_\-]?key|client[_\-]?secret|credentials?|sig)"
)
_KEY_VALUE = re.compile(
    r"(?:(?<![A-Za-z0-9])|(?<=[a-z])(?=[A-Z]))(?i:" + _CRED_KEY + r")"
    r"(?i:[_\-]?(?:key|value|str|string|hash))?(?![A-Za-z0-9])[\"']?[ \t]*(?::=|=>|==?|:)[ \t]*"
    r"(?:[bru]?([\"'])(?P<q>[^\"'\n]{1,256})\1|(?P<bare>[^\s\"'`,;]{1,256}))"
)
# Values that are code, templates or placeholders, not secrets.
_NOT_A_VALUE = re.compile(
    r"(?i)^(?:none|null|nil|true|false|undefined|required|optional|string|str|bytes|int)$|\$\{|\{\{|%\(|%s"
    r"|^<.*>$|xxx|\*\*\*|\.\.\.|example|placeholder|your[_\-]|changeme|dummy"
)
_CODE_EXPRESSION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\(.*|\[.*)?$")
_URL_PASSWORD_PLACEHOLDERS = frozenset(
    ("password", "pass", "passwd", "pwd", "secret", "pw", "p", "x", "xxx", "***", "****", "token")
)


def entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _secret_value(value: str, quoted: bool) -> bool:
    """A value next to a credential key that looks like a real secret (not code, not a dummy)."""
    if len(value) < 8 or _NOT_A_VALUE.search(value) or len(set(value)) < 5:
        return False
    if not quoted:
        if "(" in value or _CODE_EXPRESSION.match(value) and not any(c.isdigit() for c in value):
            return False
        if value.startswith(("/", "./", "~", "http://", "https://")):
            return False
    return entropy(value) >= 3.0 and (any(c.isdigit() for c in value) or not value.isalpha() or len(value) >= 16)


def _secrets(text: str) -> Iterable[tuple[int, int]]:
    pos = 0
    if "PRIVATE KEY" in text:
        while (m := _PRIVATE_KEY_BEGIN.search(text, pos)) is not None:
            end_m = _PRIVATE_KEY_END.search(text, m.end(), m.end() + _MAX_KEY_BLOCK)
            end = end_m.end() if end_m else _KEY_BODY.match(text, m.end(), m.end() + _MAX_KEY_BLOCK).end()
            yield m.start(), end
            pos = end
    for m in _TOKENS.finditer(text):
        token = m.group(0)
        if token.startswith("sk-") and not (any(c.isdigit() for c in token) and any(c.isupper() for c in token)):
            continue  # OpenAI keys mix digits and upper case; sk-some-long-identifier-name does not
        yield m.start(), m.end()
    if "://" in text:
        for m in _URL_PASSWORD.finditer(text):
            pw = m.group(1)
            if pw.lower() in _URL_PASSWORD_PLACEHOLDERS or _NOT_A_VALUE.search(pw) or pw.startswith(("$", "%", "{")):
                continue
            yield m.start(1), m.end(1)
    for m in _KEY_VALUE.finditer(text):
        quoted = m.group("q") is not None
        group = "q" if quoted else "bare"
        if _secret_value(m.group(group), quoted):
            yield m.start(group), m.end(group)


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
        taken: list[Finding] = []
        for kind in self.kinds:
            for start, end in _DETECTORS[kind](text):
                if start < end and not any(start < f.end and f.start < end for f in taken):
                    taken.append(Finding(start, end, kind))
        return sorted(taken, key=lambda f: f.start)

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
            "libraries": {"phonenumbers": phonenumbers.__version__},
        }
