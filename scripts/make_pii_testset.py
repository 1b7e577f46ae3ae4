"""Build the labelled PII test set in tests/data/pii/ (committed; rerun only to change it).

    python scripts/make_pii_testset.py [--shakespeare PATH] [--out tests/data/pii]

Writes two JSONL files, one document a line: {"id", "source", "text", "planted", "lookalikes"},
where `planted` and `lookalikes` are lists of {"start", "end", "kind", "what"} spans into `text`.

- planted.jsonl: a snippet of real text (Python standard library source, or tinyshakespeare) with
  synthetic PII inserted in a context of the snippet's kind (code or prose); `planted` holds the
  exact span of every inserted value and its kind (one of lmforge.data.pii.KINDS). Every value is
  valid for its kind: Luhn-valid card numbers with issuer prefixes, IBANs with correct length and
  checksum, phone numbers valid for their country (phonenumbers), routable or private addresses.
- lookalikes.jsonl: real snippets with look-alikes inserted that must survive: version numbers,
  git SHAs and sha256 digests, UUIDs, dates, times, ports, numeric literals, line numbers, ISBNs,
  OIDs, documentation addresses (example.com, 192.0.2.0/24, 2001:db8::/32, loopback), card and
  IBAN numbers with a wrong checksum, credential keys bound to code, public certificates.

The snippets come only from places with no real PII (no `@domain`, no dotted quad, no `+digits`,
no URL credentials, no credential assignment), so any finding that is not a planted span is a
false positive. Generation is deterministic (a fixed seed; the stdlib of the running Python).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import re
import string
import sysconfig
import uuid
from collections.abc import Callable
from pathlib import Path

import phonenumbers

from lmforge.data.pii import IBAN_LENGTHS, luhn_ok

SEED = 19
N_PLANTED_PER_KIND = 100
N_LOOKALIKE_DOCS = 300

# A snippet holding any of these may contain real PII: it is not used.
_MAYBE_PII = re.compile(
    r"@[A-Za-z0-9\-]+\.[A-Za-z]|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\+\d|://[^\s/]*@|PRIVATE KEY|[0-9a-fA-F]{1,4}::"
    r"|(?i:pass(?:word|wd)?|secret|token|api_?key|pwd)\W{0,3}[=:]|\d{9,}|\d{3}[ \-.]\d{3}[ \-.]\d{4}"
)


def _snippets(rng: random.Random, shakespeare: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(code snippets, prose snippets) as (source, text), free of anything that may be real PII."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    code: list[tuple[str, str]] = []
    while len(code) < 1200:
        path = rng.choice(files)
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) < 12:
            continue
        i = rng.randrange(len(lines) - 10)
        text = "\n".join(lines[i:i + rng.randint(4, 9)])[:420]
        if len(text) > 80 and not _MAYBE_PII.search(text):
            code.append((f"stdlib:{path.relative_to(root)}:{i + 1}", text))
    plines = shakespeare.read_text(encoding="utf-8").splitlines()
    prose: list[tuple[str, str]] = []
    while len(prose) < 800:
        i = rng.randrange(len(plines) - 10)
        text = "\n".join(plines[i:i + rng.randint(3, 7)])[:420]
        if len(text) > 80 and not _MAYBE_PII.search(text):
            prose.append((f"tinyshakespeare:{i + 1}", text))
    return code, prose


# ---------------------------------------------------------------------------------------- values

FIRST = ["anna", "john", "maria", "wei", "fatima", "lars", "sofia", "omar", "yuki", "pierre", "olga", "raj",
         "lucia", "kwame", "ingrid", "mateo", "chloe", "dmitri", "amara", "hans"]
LAST = ["schmidt", "nguyen", "garcia", "okafor", "smith", "kowalski", "rossi", "tanaka", "dubois", "patel",
        "johansson", "silva", "murphy", "kim", "novak", "haddad", "fischer", "moreau", "costa", "berg"]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.uk", "acme-corp.com", "mail.globex.de", "corp.internal",
           "initech.io", "umbrella-health.org", "contoso.fr", "fastmail.fm", "uni-heidelberg.de", "bank.co.jp"]


def email(rng: random.Random) -> tuple[str, str]:
    f, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice([f"{f}.{last}", f"{f[0]}{last}", f"{f}_{last}+{rng.choice(['news', 'tix', 'x'])}",
                        f"{f}{rng.randint(1, 99)}", f"{f.capitalize()}.{last.capitalize()}", f"{last}-{f}"])
    return f"{local}@{rng.choice(DOMAINS)}", "email"


PHONE_REGIONS = ["US", "GB", "DE", "FR", "NL", "IN", "BR", "JP", "AU", "ES", "IT", "CH", "SE", "ZA", "MX", "PL"]
NATIONAL_OK = {"US", "GB", "DE", "FR", "NL", "BR", "JP", "AU", "IT", "CH", "SE", "ZA", "IN"}


def phone(rng: random.Random) -> tuple[str, str]:
    while True:
        region = rng.choice(PHONE_REGIONS)
        kind = rng.choice([phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE])
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        nsn = str(example.national_number)
        nsn = nsn[:-4] + "".join(rng.choice(string.digits) for _ in range(4))
        number = phonenumbers.parse(f"+{example.country_code}{nsn}")
        if not phonenumbers.is_valid_number(number):
            continue
        fmt = rng.choice(["intl", "intl", "e164", "national", "intl-dash"])
        if fmt == "national" and region not in NATIONAL_OK:
            fmt = "intl"
        if fmt == "e164":
            text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        elif fmt == "national":
            text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
            if region == "US":
                text = rng.choice([text, text.replace("(", "").replace(") ", "-"), text.replace("(", "")
                                   .replace(") ", ".").replace("-", ".")])
            if not (text.startswith("0") or region == "US"):
                continue
        else:
            text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            if fmt == "intl-dash":
                text = text.replace(" ", "-", 1) if region == "US" else text.replace(" ", "-")
        return text, f"phone:{region}:{fmt}"


def ip(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.55:  # public IPv4
        while True:
            a = ipaddress.IPv4Address(rng.randrange(1 << 32))
            if a.is_global and not a.is_multicast and max(a.packed) >= 10:
                return str(a), "ipv4:public"
    if r < 0.75:  # private IPv4
        net = ipaddress.ip_network(rng.choice(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]))
        return str(net[rng.randrange(2, net.num_addresses - 1)]), "ipv4:private"
    while True:  # global unicast or unique local IPv6, compressed or exploded
        if r < 0.92:
            a = ipaddress.IPv6Address((0x2 << 124) | rng.getrandbits(125) if rng.random() < 0.5 else
                                      (rng.choice([0x2001, 0x2400, 0x2a00, 0x2606]) << 112) | rng.getrandbits(64))
        else:
            a = ipaddress.IPv6Address((0xfd << 120) | rng.getrandbits(80))
        if a in ipaddress.ip_network("2001:db8::/32") or not (a in ipaddress.ip_network("2000::/3") or a.is_private):
            continue
        return (a.exploded if rng.random() < 0.2 else str(a)), "ipv6"


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        if luhn_ok(body + check):
            return body + check
    raise AssertionError("unreachable")


def card(rng: random.Random) -> tuple[str, str]:
    brand, prefix, length = rng.choice([("visa", "4", 16), ("mastercard", str(rng.randint(51, 55)), 16),
                                        ("mastercard2", str(rng.randint(2221, 2720)), 16), ("amex", rng.choice(["34", "37"]), 15),
                                        ("discover", "6011", 16), ("visa13", "4", 13), ("jcb", "35" + str(rng.randint(28, 89)), 16)])
    digits = _luhn_complete(prefix, length, rng)
    sep = rng.choice(["", " ", "-"]) if length != 13 else ""
    if sep and length == 15:
        text = sep.join((digits[:4], digits[4:10], digits[10:]))
    elif sep:
        text = sep.join(digits[i:i + 4] for i in range(0, length, 4))
    else:
        text = digits
    return text, f"card:{brand}"


IBAN_BANKS = {"GB": "WEST", "NL": "ABNA", "IE": "AIBK"}


def iban_checksum(country: str, bban: str) -> str:
    moved = bban + country + "00"
    return f"{98 - int(''.join(str(int(c, 36)) for c in moved)) % 97:02d}"


def iban(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(["DE", "GB", "FR", "NL", "ES", "IT", "CH", "BE", "AT", "PL", "SE", "IE", "NO", "PT", "DK"])
    n = IBAN_LENGTHS[country] - 4
    bank = IBAN_BANKS.get(country, "")
    if country == "IT":
        bank = rng.choice(string.ascii_uppercase)
    bban = bank + "".join(rng.choice(string.digits) for _ in range(n - len(bank)))
    compact = country + iban_checksum(country, bban) + bban
    text = compact if rng.random() < 0.4 else " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return text, f"iban:{country}"


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def secret(rng: random.Random) -> tuple[str, str]:
    what = rng.choice(["aws", "github", "slack", "stripe", "openai", "google", "jwt", "private_key", "password",
                       "api_key", "gitlab", "hf"])
    if what == "aws":
        return "AKIA" + _rand(rng, string.ascii_uppercase + "234567", 16), what
    if what == "github":
        return rng.choice(["ghp_", "gho_", "ghs_"]) + _rand(rng, ALNUM, 36), what
    if what == "slack":
        return f"xoxb-{rng.randint(10**10, 10**11)}-{rng.randint(10**12, 10**13)}-{_rand(rng, ALNUM, 24)}", what
    if what == "stripe":
        return "sk_live_" + _rand(rng, ALNUM, 24), what
    if what == "openai":
        body = _rand(rng, ALNUM + "_-", 44) + rng.choice(string.digits) + rng.choice(string.ascii_uppercase)
        return "sk-proj-" + body, what
    if what == "google":
        return "AIza" + _rand(rng, ALNUM + "_-", 35), what
    if what == "gitlab":
        return "glpat-" + _rand(rng, ALNUM + "_-", 20), what
    if what == "hf":
        return "hf_" + _rand(rng, string.ascii_letters, 34), what
    if what == "jwt":
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps({"sub": str(rng.randint(1, 10**9)), "name": rng.choice(FIRST),
                                      "iat": rng.randint(1.5e9, 1.8e9)}).encode())
        return f"{header}.{payload}.{_b64url(rng.randbytes(32))}", what
    if what == "private_key":
        label = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
        body = base64.b64encode(rng.randbytes(rng.randint(120, 400))).decode()
        lines = [body[i:i + 64] for i in range(0, len(body), 64)]
        return f"-----BEGIN {label}PRIVATE KEY-----\n" + "\n".join(lines) + f"\n-----END {label}PRIVATE KEY-----", what
    if what == "password":
        while True:
            pw = _rand(rng, ALNUM + "!#%&*+-_=?", rng.randint(10, 20))
            if any(c.isdigit() for c in pw):
                return pw, what
    return _rand(rng, "0123456789abcdef", 32) if rng.random() < 0.5 else _rand(rng, ALNUM, 40), what


# Contexts: {v} is the value. Secrets of the key/value kind get their key here.
CONTEXTS = {
    "code": {
        "email": ["# Maintainer: {v}", "    author_email = \"{v}\"", "    notify(\"{v}\")", "# Report bugs to <{v}>."],
        "phone": ["# On call: {v}", "    phone = \"{v}\"", "    contact = {{\"tel\": \"{v}\"}}", "# questions: call {v}"],
        "ip": ["    host = \"{v}\"", "# deployed on {v} (prod)", "    servers = [\"{v}\"]", "    log.info(\"login from %s\", \"{v}\")"],
        "credit_card": ["    card_number = \"{v}\"", "# test charge on {v}", "    charge(\"{v}\", amount=12)"],
        "iban": ["    iban = \"{v}\"", "# refund to {v}", "    account = {{\"iban\": \"{v}\"}}"],
        "secret": ["    client = connect(token=\"{v}\")", "    headers = {{\"Authorization\": \"Bearer {v}\"}}", "# key: {v}",
                   "    KEY = \"{v}\""],
    },
    "prose": {
        "email": ["Write to {v} if thou wilt.", "mail {v}", "Contact: {v}", "(reply to {v})"],
        "phone": ["Call me on {v} tomorrow.", "Tel. {v}", "ring {v} or write", "my number is {v}."],
        "ip": ["The server at {v} is down.", "blocked {v}", "From {v}, a login."],
        "credit_card": ["Paid with {v}.", "card no. {v}", "Charge {v} for the wine."],
        "iban": ["Send the gold to {v}.", "IBAN: {v}", "Account {v}, thank you."],
        "secret": ["the key is {v}", "Use {v} to log in."],
    },
}
KEYED = {  # key/value secrets: only the value is the secret
    "password": ["    password = \"{v}\"", "DB_PASSWORD={v}", "password: {v}", "  \"passwd\": \"{v}\",",
                 "DATABASE_URL=postgres://app:{v}@db.internal:5432/prod"],
    "api_key": ["API_KEY={v}", "    api_key = \"{v}\"", "  \"client_secret\": \"{v}\",", "export ACCESS_TOKEN={v}",
                "secret_key: {v}"],
}
GENERATORS = {"email": email, "phone": phone, "ip": ip, "credit_card": card, "iban": iban, "secret": secret}


def _insert(rng: random.Random, text: str, line: str, where_end: bool = False) -> tuple[str, int]:
    """Insert `line` as a new line at a random line boundary of `text`; return (new text, offset of line)."""
    lines = text.split("\n")
    i = len(lines) if where_end else rng.randint(0, len(lines))
    before = "\n".join(lines[:i])
    prefix = before + ("\n" if i > 0 else "")
    return prefix + line + ("\n" if i < len(lines) else "") + "\n".join(lines[i:]), len(prefix)


def _plant(rng: random.Random, text: str, template: str, value: str) -> tuple[str, int, int, int]:
    """(new text, offset of the inserted line, start and end of the value)."""
    line = template.replace("{v}", "\x00").replace("{{", "{").replace("}}", "}")
    at = line.index("\x00")
    line = line.replace("\x00", value)
    new, offset = _insert(rng, text, line)
    return new, offset, offset + at, offset + at + len(value)


def planted_docs(rng: random.Random, code: list, prose: list) -> list[dict]:
    docs = []
    for kind, gen in GENERATORS.items():
        for n in range(N_PLANTED_PER_KIND):
            style = "code" if n % 3 else "prose"
            source, text = rng.choice(code if style == "code" else prose)
            spans = []
            for _ in range(rng.choice([1, 1, 2])):
                value, what = gen(rng)
                if kind == "secret" and what in KEYED:
                    template = rng.choice(KEYED[what])
                elif kind == "secret" and what == "private_key":
                    template = "{v}"
                else:
                    template = rng.choice(CONTEXTS[style][kind])
                new, offset, start, end = _plant(rng, text, template, value)
                # spans planted earlier move when the new line lands before them
                shift = len(new) - len(text)
                spans = [dict(s, start=s["start"] + shift, end=s["end"] + shift) if s["start"] >= offset else s
                         for s in spans]
                spans.append({"start": start, "end": end, "kind": kind, "what": what})
                text = new
            docs.append({"id": f"planted-{kind}-{n:03d}", "source": source, "text": text,
                         "planted": sorted(spans, key=lambda s: s["start"]), "lookalikes": []})
    return docs


def lookalike(rng: random.Random) -> tuple[str, str]:
    """A line holding one look-alike that must survive, and its name."""
    hexs = lambda n: _rand(rng, "0123456789abcdef", n)  # noqa: E731
    bad_iban = bad_iban_factory(rng)
    d = lambda a, b: rng.randint(a, b)  # noqa: E731
    choices = [
        ("version", lambda: rng.choice([f"# requires setuptools>={d(40, 70)}.{d(0, 9)}.{d(0, 9)}",
                                        f"__version__ = \"{d(0, 9)}.{d(0, 30)}.{d(0, 30)}\"",
                                        f"Version {d(1, 12)}.{d(0, 20)}.{d(0, 50)}.{d(1, 99)} released",
                                        f"    pin = \"pkg=={d(1, 9)}.{d(0, 40)}.{d(0, 9)}.{d(10, 99)}\"",
                                        f"# since v{d(1, 9)}.{d(10, 99)}.{d(0, 9)}.{d(0, 9)}",
                                        f"    VERSION = ({d(1, 9)}, {d(0, 20)}, {d(0, 9)})"])),
        ("git_sha", lambda: rng.choice([f"# fixed in commit {hexs(40)}", f"    rev = \"{hexs(12)}\"",
                                        f"Merge {hexs(7)} into {hexs(7)}"])),
        ("sha256", lambda: rng.choice([f"    sha256 = \"{hexs(64)}\"", f"# md5 {hexs(32)}",
                                       f"    digest = bytes.fromhex(\"{hexs(64)}\")"])),
        ("uuid", lambda: rng.choice([f"    request_id = \"{uuid.UUID(int=rng.getrandbits(128), version=4)}\"",
                                     f"# trace {uuid.UUID(int=rng.getrandbits(128), version=4)}"])),
        ("date", lambda: rng.choice([f"# {d(1990, 2030)}-{d(1, 12):02d}-{d(1, 28):02d}",
                                     f"    when = \"{d(1, 28):02d}.{d(1, 12):02d}.{d(1990, 2030)}\"",
                                     f"dated {d(1, 12):02d}/{d(1, 28):02d}/{d(1990, 2030)}",
                                     f"    ts = \"{d(1990, 2030)}-{d(1, 12):02d}-{d(1, 28):02d}T{d(0, 23):02d}:{d(0, 59):02d}:{d(0, 59):02d}Z\"",
                                     f"Date: Mon, {d(1, 28)} Jan {d(1990, 2030)} {d(0, 23):02d}:{d(0, 59):02d}:{d(0, 59):02d} +0000"])),
        ("time", lambda: rng.choice([f"    elapsed = \"{d(0, 23):02d}:{d(0, 59):02d}:{d(0, 59):02d}.{d(0, 999999):06d}\"",
                                     f"at {d(0, 23):02d}:{d(0, 59):02d}:{d(0, 59):02d} the bell"])),
        ("port", lambda: rng.choice([f"    url = \"http://localhost:{d(1024, 65535)}/api\"", f"    port = {d(1, 65535)}",
                                     f"listen 0.0.0.0:{d(1024, 65535)}"])),
        ("number", lambda: rng.choice([f"    n = {d(10**9, 10**19)}", f"    x = {rng.random() * 1e6!r}",
                                       f"    big = {d(10**15, 10**16 - 1)}  # not a card", f"    mask = 0x{hexs(16).upper()}",
                                       f"    values = [{d(100, 999)}, {d(100, 999)}, {d(1000, 9999)}]",
                                       f"    avogadro = {d(1, 9)}.{d(10**7, 10**8)}e23", f"    t_ns = {d(1.6e18, 1.8e18)}"])),
        ("line_number", lambda: rng.choice([f"  File \"/srv/app/{rng.choice(LAST)}.py\", line {d(1, 9999)}, in run",
                                            f"{rng.choice(LAST)}.py:{d(1, 9999)}:{d(1, 120)}: E501 line too long"])),
        ("isbn", lambda: rng.choice(["ISBN 978-3-16-148410-0", "ISBN-10: 0-306-40615-2", "isbn = \"9780306406157\""])),
        ("oid", lambda: rng.choice(["    OID = \"1.3.6.1.4.1.311.21.8\"", "# 2.5.4.3 is commonName",
                                    "    oid = \"1.2.840.113549.1.1.11\""])),
        ("doc_address", lambda: rng.choice(["    host = \"127.0.0.1\"", "    bind = \"0.0.0.0\"",
                                            f"    addr = \"192.0.2.{d(1, 254)}\"", f"    addr = \"203.0.113.{d(1, 254)}\"",
                                            "    netmask = \"255.255.255.0\"", "    host = \"::1\"",
                                            f"    addr6 = \"2001:db8::{hexs(4)}\"", "    link = \"fe80::1\"",
                                            f"    email = \"{rng.choice(FIRST)}@example.com\"",
                                            "# see https://docs.example.org/guide", "    s = arr[::2]"])),
        ("bad_checksum", lambda: rng.choice([f"    card = \"4{d(10**14, 10**15 - 1)}\"".replace("\"4", "\"4", 1),
                                             "    iban = \"DE00 1234 5678 9012 3456 78\"",
                                             f"    ref = \"{bad_iban()}\""])),
        ("code_credential", lambda: rng.choice(["    password = getpass.getpass()", "    token = tokens[i]",
                                                "    api_key = os.environ[\"API_KEY\"]", "    password: str | None = None",
                                                "    secret = self._secret", "    if token == TOKEN_END:",
                                                "    auth_token = load_token(path)", "-----BEGIN CERTIFICATE-----",
                                                "-----BEGIN PUBLIC KEY-----", "    task-runner-for-something-long",
                                                "    password = \"\"", "    passwd = \"password\""])),
    ]
    name, make = rng.choice(choices)
    return make(), name


def bad_iban_factory(rng: random.Random) -> Callable[[], str]:
    def bad_iban() -> str:
        bban = "WEST" + _rand(rng, string.digits, 14)
        good = int(iban_checksum("GB", bban))
        return f"GB{(good + rng.randint(1, 90)) % 97 + 2:02d}{bban}"
    return bad_iban


def lookalike_docs(rng: random.Random, code: list, prose: list) -> list[dict]:
    docs = []
    for n in range(N_LOOKALIKE_DOCS):
        source, text = rng.choice(code if n % 4 else prose)
        spans = []
        for _ in range(rng.randint(1, 3)):
            line, what = lookalike(rng)
            if what == "bad_checksum" and "card" in line:
                digits = re.search(r"\d{15,16}", line).group(0)
                if luhn_ok(digits):  # make sure it fails Luhn
                    line = line.replace(digits, digits[:-1] + str((int(digits[-1]) + 1) % 10))
            new, offset = _insert(rng, text, line)
            shift = len(new) - len(text)
            spans = [dict(s, start=s["start"] + shift, end=s["end"] + shift) if s["start"] >= offset else s
                     for s in spans]
            spans.append({"start": offset, "end": offset + len(line), "kind": "none", "what": what})
            text = new
        docs.append({"id": f"lookalike-{n:03d}", "source": source, "text": text, "planted": [],
                     "lookalikes": sorted(spans, key=lambda s: s["start"])})
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shakespeare", type=Path, default=Path("/work/shared/data/tinyshakespeare.txt"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data" / "pii")
    args = parser.parse_args()
    rng = random.Random(SEED)
    code, prose = _snippets(rng, args.shakespeare)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("planted.jsonl", planted_docs(rng, code, prose)),
                       ("lookalikes.jsonl", lookalike_docs(rng, code, prose))):
        for doc in docs:  # the spans say what they cover
            for span in doc["planted"]:
                assert doc["text"][span["start"]:span["end"]].strip(), (doc["id"], span)
        with open(args.out / name, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        print(f"{args.out / name}: {len(docs)} documents, {(args.out / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
