"""PII/PHI detectors for training text, measured on real text (tests/assets/pii_eval) and held-out text (pii_heldout).

    .venv/bin/python bench/bench_pii.py [--heldout]   # P/R/F1 per category (and locale) vs Presidio, the old regexes
                                                     # and plain PhoneNumberMatcher

How a record is scanned (each step is cheap; the expensive library call only runs where a cheap regex fired):
1. Placeholders of an earlier redaction (`[EMAIL]`, ...) are blanked (same length): they never count as context, so
   re-checking a redacted text finds exactly what is still there (tasks/scan.py redacts to that fixed point).
2. Message-IDs (`<...@host>` in Message-ID/References/Content-ID headers, a machine-shaped local part: 8+ digit
   runs, timestamps, hex blobs, `$`, `.fsf`; or an article citation "Larry Wall in <...>", "id <...>" unless the
   local part is how people name a mailbox): their own category, and nothing inside one is reported as an email or
   IP. `Name <name12345@host>` and "Details in <jane.doe@example.com>" are emails.
3. Addresses: dotted-TLD emails anywhere; `user@host` without a dotted TLD only in mail context (a header line such
   as From:/To:/Cc:/Reply-To:/Sender:/Path:/Received:, or right after "by", "of", "for", "to", "from", "(" );
   UUCP bang paths (`host!host!user`, every part starting with a letter) are personal addresses too.
4. Checksummed numbers: cards (Luhn, then the networks' prefix/length rules, or any length 13-19 right after a card
   word; a Luhn-valid EAN-13 is a barcode), SSN (area/group/serial rules), IBAN (country length + mod-97),
   IPv4 (valid octets, not a version: after ==/>=/~=, `pkg-`, "version", "firmware", "section", "rev"...; weaker
   hints, "upgraded ... to", "(...)", "no.", yield to a network word: "the gateway (192.168.1.1)"), IPv6 on its own
   pattern (no digit run needed: `fe80::1`, `::1`).
5. Phones with Google's libphonenumber (`phonenumbers`): a candidate is any run of 6+ digits written as a number
   could be (brackets, dots, dashes incl. en dashes, slashes, spaces incl. no-break and narrow no-break ones, `x`/
   `ext`/`extension` extensions, `+`/`00`/`001` prefixes, trunk zeros); PhoneNumberMatcher decides over every region
   in `validation.phone_regions` (leniency VALID anywhere; POSSIBLE next to a phone word of those regions' languages
   or when written +country). Other categories' spans are blanked first, so a candidate never runs into an email,
   card or IP and values that touch are all found in one pass. Not phones: dates, times, versions, ZIP+4, year
   ranges, ISBN-10s, table columns, money ("612 345 678 €"), decimals ("51.507351"), and any number labelled as
   another identifier in the regions' languages ("Kundennummer", "numéro de commande", "Partita IVA", "NHS number",
   "UPC", "order no."; a phone word nearer the number wins: "Rufnummer"). The span is the whole written number
   (`(201)802-0413`, `+44 (0) 7700 ...`, `..., ext. 45`); numbers written back to back are split and each found.
   7-digit local numbers (`962-7873`) need a phone word; toll-free vanity numbers (`1-800-DOT-6000`) are spelled out.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from functools import cache, lru_cache

CATEGORIES = ("email", "phone", "ssn", "credit_card", "ip_address", "iban", "mrn", "message_id")
PLACEHOLDER = {c: f"[{c.upper()}]" for c in CATEGORIES}
# block fails the run, redact writes a redacted copy, allow only reports. A Message-ID names a message, not a
# person, but it carries the poster's host and a timestamp: redact by default.
DEFAULT_POLICY = {
    "email": "redact",
    "phone": "redact",
    "ssn": "block",
    "credit_card": "block",
    "ip_address": "redact",
    "iban": "block",
    "mrn": "block",
    "message_id": "redact",
}

# ------------------------------------------------------------------------------------------ Message-IDs
MSGID = re.compile(r"<([^<>@\s]{1,250})@([^<>\s]{1,250})(?:>|$)")  # $: a record cut inside the id
MSGID_HEADER = re.compile(
    r"(?i)(?:message-id|references|in-reply-to|content-id|resent-message-id)\s*:?\s*(?:<[^<>\n]*>\s*)*$"
)
# "Larry Wall in <199201.1234@jpl>", "id <...>": a citation, unless the local part is how people name their mailbox
# ("Details in <jane.doe@example.com>" is an address to block, not a Message-ID to allow)
MSGID_CITATION = re.compile(r"(?i)(?:\bid|\bin|article)\s*:?\s*(?:<[^<>\n]*>\s*)*$")
PERSONAL_LOCAL = re.compile(r"^[A-Za-z]+(?:[._'-][A-Za-z]+){0,3}\d{0,4}$")
# A local part no person chooses: a timestamp or counter (8+ digits), only digits/dots, a hex blob, "$", ".fsf".
# "name12345@host" is a person's address (typed email, so `email: block` catches it), not a Message-ID.
ID_SHAPED = re.compile(r"^\d{8,}\.|\$|\.fsf$|^\d+\.[\d.]+$|^\d{4}[A-Z][a-z]{2}\d|^[0-9A-Fa-f]{16,}$|^\d{6,}[A-Z]")
ENVELOPE_ID = re.compile(r"(?im)^original-envelope-id:\s*(\S+@\S+)")

# ------------------------------------------------------------------------------------------ addresses
EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+=-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
NO_TLD = re.compile(r"(?<![\w.%+'/·-])([A-Za-z][\w.+-]*)@([A-Za-z][\w-]*[A-Za-z0-9])(?![\w@:-]|\.\w)")
MAIL_LINE = re.compile(
    r"(?i)(?:from|to|cc|bcc|reply-to|sender|path|received|return-path|delivered-to|"
    r"x-original-to|resent-from|resent-to)\b"
)
MAIL_WORD = re.compile(r"(?i)(?:\bby|\bof|\bfor|\bto|\bfrom|\bmail|\(|<)\s*$")
NOT_HOSTS = {"base", "localhost", "plt", "got", "home"}
BANG = re.compile(r"(?<![\w.-])(?<!\w!)[a-z][\w.-]*(?:![A-Za-z][\w.-]*)+(?![\w!(])")  # "(": C's return!puts(

# ------------------------------------------------------------------------------------------ checksummed numbers
# An SSN written with spaces or none is one only where it is labelled: "SSN: 017 26 6681", "Social Security No.: 423987480"
SSN_LABELLED = re.compile(
    r"(?i)(?:\bssn|social security(?: number| no\.?| #)?)\s*(?:#|no\.?|number)?\s*:?\s*"
    r"((?!000|666|9\d\d)\d{3}([ -]?)(?!00)\d{2}\2(?!0000)\d{4})(?![\w-])"
)
SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
CARD = re.compile(
    r"(?<![\w.-])(?:[2-6]\d{3}|1800|0604)(?:[ -]?\d){8,15}(?![\w-])|(?<![\w.-])[2-6]\d{3}(?:\.\d{4}){3}(?![\w.-])"
)
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
IBAN_LENGTH = {
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BR": 29,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NL": 18,
    "NO": 15,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "SA": 24,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VG": 24,
    "XK": 20,
}
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d|-\d)")
NOT_IP_BEFORE = re.compile(
    r"(?i)(?:version|\bver\.?|\bv|section|sect?\.|§|\brev(?:ision)?\.?|release|\bsee(?: also)?|firmware|\bfw|\bbuild"
    r"|\bkernel|\bbios|chapter|clause|\brfc)\s*$"
)
NOT_IP_WEAK = re.compile(r"(?i)(?:\bno\.|[\w+]\s\()\s*$")  # "Foo (1.2.3.4)", "no. 1.2.3.4": unless a network word
VERSION_ON_LINE = re.compile(r"(?i)version[^\n]*$")  # "Standards-Version updated to 4.6.0.1"
LISTED_NUMBER = re.compile(r"(?:\+|0)\d+(?:-\d+){2,}")
# "libfoo==4.2.6.5", ">= 1.2.3.4", "libfoo-4.2.6.5": a version, whatever its numbers. Phones use only these operators
# ("updated the hotline to 0800..." is a phone); IPs also take "upgraded foo to 4.2.6.5".
_VERSION_OPERATOR = r"[=<>~!]=\s*|[A-Za-z]\w*-"
VERSION_OP = re.compile(rf"(?:{_VERSION_OPERATOR})$")
VERSION_BEFORE = re.compile(
    rf"(?i)(?:{_VERSION_OPERATOR}|\b(?:upgrad|updat|bump|downgrad|pinn?|releas)\w*\b(?:[^\n.;]|\.(?=\w)){{0,40}}?\b(?:to|from)\s+)$"
)
NET_WORD = re.compile(
    r"(?i)\b(?:ip|ipv4|address|addr|host|ping|inet|server|dns|gateway|route|router|nameserver|resolver|subnet|firewall"
    r"|proxy|peer|endpoint|loopback|localhost|vpn|lan|wan|dhcp|ssh|connect\w*|login|listen\w*|bind)\b|\["
)
NETMASK = re.compile(r"255\.(?:0|128|192|224|240|248|252|254|255)\.\d+\.\d+")
IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])"
    r"|(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?(?![\w:])"
    r"|(?<![\w:.])::[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}(?![\w:])"  # "::1", "::ffff:c000:280"
)

# ------------------------------------------------------------------------------------------ phones
# Candidates: any digit run a number could be written as (brackets, dots, dashes, slashes, spaces; a "+", "00" or
# "011" prefix; trunk zeros; an x/ext extension). libphonenumber's PhoneNumberMatcher decides, over every region
# in `validation.phone_regions`; the candidate only says where to ask.
_PHONE_RUN = (
    r"(?:\+\s?)?\(?\d[\d ().\-/\u00a0\u2007\u2009\u202f\u2010-\u2015]{4,}\d"
    r"(?:\s?(?:x|ext\.?|extn?\.?|extension|#)\s?\d{1,6})?(?![\w])"
)
PHONE_CAND = re.compile(
    r"(?=[+(\d])(?:(?<![\w.,\-\u2010-\u2015])|(?<=(?i:tel|tél|fax|mob)\.)|(?<=(?i:ph)\.)|(?<=:-)|(?<=\D,)|(?<=\d,)(?=[0+]))(?<!\d:)(?<!\w/)"
    + _PHONE_RUN
)
PHONE_RUN = re.compile(_PHONE_RUN)  # right after a phone and "/", ",", ";" or ")": the next number of a list
AFTER_PHONE = re.compile(r"[/,;)]\s?(?=[\d(+])")
# Unusual spaces and dashes people (and word processors) put inside numbers, as libphonenumber reads them; same length.
PHONE_PUNCT = str.maketrans(
    {c: " " for c in "\u00a0\u2007\u2009\u202f"} | {c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015"}
)
PHONE_WORD = re.compile(
    r"(?i)\b(?:phone|telephone|tel|fax|call|dial|voice|reached|reach|toll|hot ?line|ring|mobile|cell"
    r"|telefon\w*|ruf\w*|anruf\w*|handy\w*|mobil\w*|fax\w*|erreichbar|rückruf|telefax"  # de
    r"|t[ée]l[ée]phone|t[ée]l|appel\w*|portable|joignable|joindre|t[ée]l[ée]copie"  # fr
    r"|tel[ée]fono|llam\w*|m[óo]vil|telefono|chiam\w*|cellulare|telefoon\w*|mobiel\w*|bel|gsm|msisdn|ph)\b"  # es, it, nl
)
DATE_TIME = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\d{1,2}[-/.]\d{1,2}[-/.]\d{4}\b|\d{1,2}:\d{2}")
# A one-digit dotted group is a version (13.9.5.17, 0.99.30-4), except a leading "1." trunk (1.800.555.1212).
DOTTED_VERSION = re.compile(r"(?<!\d)(?!1\.\d{3}\.)\d\.\d|\d\.\d(?!\d)")
# Not phones, whatever libphonenumber says: ZIP+4, year ranges "(1682-1759)", ISBN-10 "0-596-00027-8"
NOT_PHONE_SHAPE = re.compile(
    r"\(?\d{5}-\d{4}\)?|\(?(?:1[5-9]|20)\d\d\s?[-–]\s?(?:1[5-9]|20)\d\d\)?|\d{1,5}-\d{1,7}-\d{1,7}-[\dX]"
)
CARD_WORD = re.compile(r"(?i)(?:card|karte|carte|tarjeta|carta|kaart|visa|mastercard|amex|cc)\b[^\n\d]{0,25}$")
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IT", "ES", "NL", "CA", "AU", "IN")
WIDE_GAP = re.compile(r"\s\s|[\n\t]")  # a table's columns ("74    424  171"), not one written number
LOCAL7 = re.compile(r"(?<![\w.#/+-])[2-9]\d{2}-\d{4}(?![\w-])")
VANITY = re.compile(
    r"(?<![\w-])(?:1[-. ]?)?\(?8(?:00|88|77|66|55|44|33)\)?[-. ]?"
    r"(?=[A-Z0-9-]*[A-Z])[A-Z0-9]{1,7}(?:-[A-Z0-9]{1,7}){0,3}(?![\w-])"
)
NOT_PHONE_BEFORE = re.compile(
    r"(?i)(?:#|isbn[- ]?(?:1[03])?:?|ean(?:[- ]?13)?:?|cve-|\bdfars|\bfar|clause|patent numbers?|[\w.]@|\bsf|[=<>~!]=|"
    r"\bv)\s*$"
)
# "key=value" / "SEED = 935287179": a phone only when the key is a phone word ("msisdn=+1800...", "phone=...")
# or the value is written +country
KEY_VALUE = re.compile(r"(\w+)\s*=\s*$")
# A number labelled as something else is not a phone, even when libphonenumber would call it valid somewhere (any
# 10-digit number is an Indian or Italian mobile): "Kundennummer 9876543210", "numéro de commande 0612345678",
# "Partita IVA 12345678903", "NHS number 943 476 5919", "UPC 036000291452", "Budget : 612 345 678 €". The label is
# the last words before the number on its line: an identifier noun, optionally with the languages' number words
# before ("numero ordine", "número de pedido") or after ("order no.", "Rechnung Nr.", "Facture n°"). A phone word
# nearer the number wins ("Bestellhotline: 0800 ...", "customer phone 030 ...").
_ID_NOUN = (  # a label on its own: "UPC 036000291452", "Ordine 3471234567", "Timestamp 1712345678"
    r"order|invoice|ticket|reference|ref|serial|sn|s/n|tracking|\bid|sku|upc|gtin|ean|barcode|isbn|issn|imei|imsi"
    r"|iccid|nhs|vat|vat reg|tax|abn|acn|ein|bn|po|case|suivi|seguimiento|localizador|codice(?: \w+)?|referenz"
    r"|referentie|referencia|riferimento|rif|r[ée]f|\w+-nr|routing|aba|sort ?code|account|acct|seed|random seed|roll|receipt"
    r"|transaction|booking|confirmation|batch|shipment|parcel|timestamp|epoch|population|budget|price|model"
    r"|revenue|amount|lat|lon|lng|latitude|longitude|coordinates?|zip|postcode|postal code|companies house|patent"
    r"|rechnung|bestellung|auftrag|vertrag|artikel|sendung|preis|betrag|summe|konto"
    r"|plz|ust-?id\w*|steuer-?id|aktenzeichen"  # de
    r"|commande|facture|siren|siret|tva|prix|montant|colis|dossier|r[ée]f[ée]rence|s[ée]curit[ée] sociale"  # fr
    r"|ordine|fattura|partita iva|iva|codice fiscale|prezzo|importo|pratica"  # it
    r"|pedido|factura|nif|cif|nie|precio|importe|expediente"  # es
    # de/nl compounds: Kundennummer, Bestellnummer, Steuernummer, KvK-nummer, factuurnummer; not the phone ones
    r"|(?!(?:telefon|telefoon|ruf|notruf|handy|fax|mobil|mobiel|service|hotline|kontakt|contact|durchwahl|zentral"
    r"|fest|tel|gsm|bel)\w*nummer)\w+nummer|\w+nr|factuur\w*|kvk[\w-]*|btw[\w-]*|bsn|prijs|bedrag"
    r"|co[öo]rdinate[ns]?"  # nl
)
_ID_NOUN_NUMBERED = (  # only with a number word: "customer no. 0301234567", not "Customer: +1 212 ..."
    r"customer|client|cliente|compte|conto|cuenta|part|item|lot|company|policy|claim"
    r"|registration|reg|member|membre|socio|lid|contract|contrat|contratto|contrato|adh[ée]rent"
)
_NUMBER_WORD = r"number|num|no|nr|n°|nº|n|nummer|numéro|numero|número|#"
_NUMBER_AFTER = rf"(?:\s*(?:{_NUMBER_WORD})(?:\b|(?<=[°º#]))\.?)"
ID_LABEL = re.compile(
    rf"(?i)(?:(?:\b(?:{_NUMBER_WORD})\.?\s*(?:de\s+|d'|del\s+|di\s+|du\s+)?)(?:{_ID_NOUN}|{_ID_NOUN_NUMBERED})\b"
    rf"|\b(?:{_ID_NOUN})\b\.?{_NUMBER_AFTER}?|\b(?:{_ID_NOUN_NUMBERED})\b{_NUMBER_AFTER})"
    r"(?:\s*(?:is|ist|est|es|è|=))?[\s:]*(?:[A-Z]{2}\s?)?(?:[€$£]\s?)?$"  # "VAT Reg No. GB 692 6660 37"
)
# Money and decimals: "612 345 678 €", "€ 1.234.567,89", "51.507351" (one dot, 4+ decimals: a coordinate)
MONEY_AFTER = re.compile(  # and counts with a unit: "639869754 bytes", "49.881.035 abitanti"
    r"(?i)(?:%|[ \u00a0]?(?:,\d\d[ \u00a0]?)?(?:[€$£¥]|eur\b|euros?\b|usd\b|gbp\b|dollars?\b|pounds?\b"
    r"|(?:bytes?|[kmgt]i?b|ms|km|kg|rows|records|users|views|downloads|inhabitants|habitants|einwohner|abitanti"
    r"|habitantes|inwoners|people|votes|copies|units|pcs|stück)\b))"
)
DECIMAL = re.compile(r"[-+]?\d{1,3}\.\d{4,}")
CURRENCY_BEFORE = re.compile(r"[€$£¥]\s?$")  # "€ 1.234.567,89"
NANP_TRUNK = re.compile(r"1[\s.-]?")  # the "1 " before "(687) 138-7880" libphonenumber leaves out
# what libphonenumber may leave in front of the number it matched: "+44 (0) ", "+420/", "+98 21 " (an old number)
COUNTRY_PREFIX = re.compile(r"\(?\+\s?\d{1,3}\)?(?:[\s./-]*\(?\d{1,4}\)?)?[\s./-]*(?:\(0\)\s*)?")
EXTENSION_AFTER = re.compile(r"(?i),?\s?(?:x|ext\.?|extn\.?|extension|durchwahl|poste)\s?\d{1,6}(?!\w)")
NEXT_NUMBER = re.compile(r"(?<=[\s)])(?=[(+0])|(?<=\))(?=\d)")
PHONE_LABEL = re.compile(PHONE_WORD.pattern + r"[^\w\n]*(?:\w{1,3}[^\w\n]+)?$")
NUMBER_GATE = re.compile(r"\d(?:\d\d|\.\d|\d[\s.\-\u2010-\u2015]\d\d[\s.\-\u2010-\u2015]\d\d)|\+ ?\d|\(\d")
LONG_DIGITS = re.compile(r"\d{4}[ .-]?\d{4}")  # cards and IBANs hold at least 8 digits with at most one separator
IPV4_GATE = re.compile(r"\d\.\d{1,3}\.\d")
IPV6_GATE = re.compile(r"[0-9A-Fa-f]?:[0-9A-Fa-f]{0,4}:")
VANITY_GATE = re.compile(r"8(?:00|88|77|66|55|44|33)")
# Placeholders of an earlier redaction pass are blanked (same length) before detection: they never count as context.
PLACEHOLDER_RE = re.compile(r"\[(?:" + "|".join(c.upper() for c in CATEGORIES) + r")\]")
DIGITS = set("0123456789")
KEYPAD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "22233344455566677778889999")


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total, alt = total + d, not alt
    return total % 10 == 0


def iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    if IBAN_LENGTH.get(s[:2]) != len(s):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _overlaps(a: int, b: int, spans) -> bool:
    return any(x < b and a < y for x, y in spans)


def _message_ids(text: str) -> list[tuple[int, int]]:
    out = []
    for m in MSGID.finditer(text):
        local = m.group(1)
        before = text[max(0, m.start() - 60) : m.start()]
        if (
            ID_SHAPED.search(local)
            or MSGID_HEADER.search(before)
            or (MSGID_CITATION.search(before) and not PERSONAL_LOCAL.match(local))
        ):
            out.append(m.span())
    out += [m.span(1) for m in ENVELOPE_ID.finditer(text)]
    return out


def _has_bang_path(text: str) -> bool:
    """`word!word` somewhere: str.find is ~50x cheaper than running BANG over prose full of exclamation marks."""
    i = text.find("!")
    while i != -1:
        if 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalpha():
            return True
        i = text.find("!", i + 1)
    return False


def _emails(text: str, ids) -> list[tuple[int, int]]:
    out = [m.span() for m in EMAIL.finditer(text) if not _overlaps(*m.span(), ids)]
    for m in NO_TLD.finditer(text):
        if m.group(2).lower() in NOT_HOSTS or _overlaps(*m.span(), ids) or _overlaps(*m.span(), out):
            continue
        line_start = text.rfind("\n", 0, m.start()) + 1
        if MAIL_LINE.match(text, line_start) or MAIL_WORD.search(text[max(0, m.start() - 20) : m.start()]):
            out.append(m.span())
    for m in BANG.finditer(text) if _has_bang_path(text) else ():
        parts = m.group().split("!")
        if len(parts) == 2 and not parts[1][0].islower():
            continue  # "fun, fun, fun!Well": one bang before a capital is prose
        if min(map(len, parts)) > 1 and not _overlaps(*m.span(), ids):  # one-letter parts: ASCII art "o!o!o"
            out.append(m.span())
    return out


def _ips(text: str, ids, numbers: bool) -> list[tuple[int, int]]:
    """`numbers`: NUMBER_GATE matched (find_pii asks once); IPv4 needs it, IPv6 has its own gate."""
    out = []
    for m in IPV4.finditer(text) if numbers and IPV4_GATE.search(text) else ():
        s = m.group()
        before = text[max(0, m.start() - 30) : m.start()]
        net = NET_WORD.search(text[max(0, m.start() - 40) : m.start()]) is not None
        if (
            NETMASK.match(s)
            or NOT_IP_BEFORE.search(before[-20:])
            or VERSION_OP.search(before[-20:])
            or (VERSION_ON_LINE.search(before) and not net)
            or (
                not net
                and (
                    NOT_IP_WEAK.search(before[-20:]) or VERSION_BEFORE.search(text[max(0, m.start() - 60) : m.start()])
                )
            )
        ):
            continue  # a version, section or figure; "the gateway (192.168.1.1)", "DNS record to 203.0.113.10" are IPs
        octets = s.split(".")
        if max(map(len, octets)) == 1 and not net:
            continue  # "GCC 2.7.2.3": one-digit quads are versions unless the text talks about hosts
        if all(int(o) <= 255 for o in octets) and not _overlaps(*m.span(), ids):
            out.append(m.span())
    if IPV6_GATE.search(text):
        for m in IPV6.finditer(text):
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            groups = [g for g in m.group().split(":") if g]
            if (len(groups) < 2 or max(map(len, groups)) == 1) and m.group() != "::1":
                continue  # "8::" in ASCII art, "x[2::8]" (a slice) parse as IPv6
            if not _overlaps(*m.span(), ids):
                out.append(m.span())
    return out


@lru_cache(maxsize=1)
def _phonenumbers():
    import phonenumbers  # imported on first use: most records never get this far

    return phonenumbers


def _phones(text: str, regions: tuple[str, ...], taken) -> list[tuple[int, int]]:
    """Phone spans: a candidate digit run is a phone when PhoneNumberMatcher finds it VALID in one of `regions`,
    or POSSIBLE when a phone word (in the regions' languages) is near or it is written internationally (+...).
    Other categories' spans are blanked first: a candidate never runs into them and they are never context."""
    out: list[tuple[int, int]] = []
    if taken:
        chars = list(text)
        for a, b in taken:
            chars[a:b] = "\0" * (b - a)
        text = "".join(chars)

    @cache  # asked for a candidate's start and again for a phone found there
    def labelled_otherwise(a: int) -> bool:
        """The words before `a` name another identifier ("Kundennummer", "UPC", "Budget :") and no phone word is
        nearer the number than that label."""
        before = text[max(0, a - 40) : a]
        if (kv := KEY_VALUE.search(before)) and text[a] != "+" and not PHONE_WORD.search(kv.group(1).replace("_", " ")):
            return True
        label = ID_LABEL.search(before)
        if not label:
            return NOT_PHONE_BEFORE.search(before[-20:]) is not None and not PHONE_WORD.search(before[-12:])
        return not any(w.end() > label.start() for w in PHONE_WORD.finditer(before))

    def keep(a: int, b: int, vanity: bool = False) -> bool:
        digits = set(text[a:b]) & DIGITS  # "888888888" in ASCII art is not a number anyone dials
        if (
            len(digits) > 2
            and (vanity or sum(ch in DIGITS for ch in text[a:b]) >= 7)
            and not (WIDE_GAP.search(text, a, b) and not (text[a] == "+" and "\n" not in text[a:b]))
            and not _overlaps(a, b, out)
            and not labelled_otherwise(a)
            and not text[b : b + 1].isalnum()
            and not MONEY_AFTER.match(text, b)
            and not CURRENCY_BEFORE.search(text, max(0, a - 2), a)
            and not (
                DECIMAL.fullmatch(text, a, b) and text[a] != "0" and not PHONE_LABEL.search(text, max(0, a - 25), a)
            )
        ):
            out.append((a, b))
            return True
        return False

    for m in VANITY.finditer(text) if VANITY_GATE.search(text) else ():
        digits = re.sub(r"\D", "", m.group().translate(KEYPAD))
        if len(digits.removeprefix("1")) >= 10:
            keep(*m.span(), vanity=True)
    cands: deque[tuple[int, int]] = deque()

    def candidate(lo: int, hi: int) -> None:
        part = text[lo:hi].strip(" \t.-/")
        if part.endswith(")") and "(" not in part:
            part = part[:-1].rstrip(" \t.-/")  # "+44 20 7946 0958)06 ...": the bracket closes, it is not the number's
        if sum(ch in DIGITS for ch in part) >= 6:
            start = text.index(part, lo)
            cands.append((start, start + len(part)))

    for m in PHONE_CAND.finditer(text):
        candidate(*m.span())
    if cands:
        pn = _phonenumbers()

        def per_region(window: str, leniency):
            """PhoneNumberMatcher's spans in `window`, one list per region of `regions`, lazily (callers stop early)."""
            for region in regions:
                yield [(pm.start, pm.end) for pm in pn.PhoneNumberMatcher(window, region, leniency=leniency)]

        while cands:
            lo, hi = cands.popleft()
            if _overlaps(lo, hi, out):
                continue
            # "SIRET 462 578 077 33108": a labelled value, whatever part of it libphonenumber likes; only a number
            # that plainly starts anew inside it is tried ("ISBN 978-0-489-99107-5 (361)770-9137")
            labelled = labelled_otherwise(lo)
            near_word = PHONE_WORD.search(text[max(0, lo - 40) : lo]) is not None or (
                # a list of numbers ("800-292-9263 in the USA, or 0800-89-1131 in the UK"): only dashed numbers
                # with a trunk zero or +country, never a figure, coordinate or price that follows a phone
                bool(out) and lo - out[-1][1] < 40 and LISTED_NUMBER.fullmatch(text[lo:hi]) is not None
            )
            window = text[lo:hi].translate(PHONE_PUNCT)
            # "Téléphone : 0.801.61.11.84", "+33 6.11.01.04.59": dotted like a version, but labelled or +country
            dotted_ok = window.startswith("+") or PHONE_LABEL.search(text[max(0, lo - 25) : lo]) is not None
            if (
                DATE_TIME.match(window)
                or text[hi : hi + 1] == ":"
                or ("." in window and not dotted_ok and DOTTED_VERSION.search(window))
                or NOT_PHONE_SHAPE.fullmatch(window.strip())
            ):
                continue  # "2018-09-13 04:00:27", "13.9.5.17": a date/time or a version, not a number to dial
            if VERSION_OP.search(text[max(0, lo - 20) : lo]):
                continue
            if window.isdigit() and len(window) <= 8 and window[0] != "0" and not near_word:
                continue  # a bare "654321" with no phone word is a count or an id (<= 4% are valid anywhere: lax ranges)
            whole = len(window.rstrip(" .-/")) - 1
            found: list[tuple[int, int]] = []
            for leniency in (pn.Leniency.VALID, pn.Leniency.POSSIBLE):
                if leniency is pn.Leniency.POSSIBLE and not (near_word or window.startswith("+")):
                    break
                for spans in per_region(window, leniency):
                    found += spans
                    if any(b - a >= whole for a, b in found):
                        break  # the whole candidate: no other region can do better
                if found:
                    break
            kept = []
            for a, b in sorted(set(found), key=lambda ab: (ab[0] - ab[1], ab[0])):  # longest (earliest) first
                a, b = lo + a, lo + b
                if labelled and (a == lo or text[a] not in "(+"):
                    continue
                if text[a] == "(" and ")" not in text[a:b]:
                    a += 1
                if a > 0 and text[a - 1] == "(" and ")" in text[a:b] and "(" not in text[a:b]:
                    a -= 1  # "(+98) 914 492 1058"
                if a > lo and (
                    text[lo + 1 : a].strip(" ()0") == ""
                    and text[lo] in "+("
                    or COUNTRY_PREFIX.fullmatch(text, lo, a)
                    or (text[a] == "(" and NANP_TRUNK.fullmatch(text, lo, a))  # "1 (687) 138-7880"
                ):
                    a = lo  # "+44(0)...", "(0)", "+44 (0) 7700 ...": the whole written number
                if ext := EXTENSION_AFTER.match(text, b):
                    b = ext.end()  # "212-555-0123, ext. 45"
                if keep(a, b):
                    kept.append((a, b))
                    if (nxt := AFTER_PHONE.match(text, b)) and (run := PHONE_RUN.match(text, nxt.end())):
                        candidate(*run.span())  # "+1-415-555-0132x12/0301234567": the next number of a list
            gaps = [lo, *[x for ab in sorted(kept) for x in ab], hi]
            for a, b in zip(gaps[::2], gaps[1::2]) if kept else ():
                candidate(a, b)  # "Tel. 030 1234567 0301234568": numbers run together; the rest is tried on its own
            if not kept and not labelled and sum(ch in DIGITS for ch in window) >= 14:
                # too many digits for one number and libphonenumber found none: two numbers written back to back
                # ("(212) 555-0123 06 12 34 56 78"); split where a new number starts and try both halves
                cuts = [
                    c.start()
                    for c in NEXT_NUMBER.finditer(window, 1)
                    if min(sum(ch in DIGITS for ch in part) for part in (window[: c.start()], window[c.start() :])) >= 6
                ]
                whole_left = [  # prefer the cut whose left part is one whole valid number
                    c
                    for c in cuts
                    if any(
                        b >= len(left) - 1
                        for left in [window[:c].rstrip(" )")]
                        for spans in per_region(left, pn.Leniency.VALID)
                        for _, b in spans
                    )
                ]
                if cut := (whole_left or cuts)[:1]:
                    candidate(lo, lo + cut[0])
                    candidate(lo + cut[0], hi)
    for m in LOCAL7.finditer(text):
        if PHONE_WORD.search(text[max(0, m.start() - 40) : m.start()]):
            keep(*m.span())
    return sorted(out)


MAESTRO = {"0604", "5018", "5020", "5038", "5893", "6304", "6390", "6759", "6761", "6762", "6763"}


def ean13_ok(d: str) -> bool:
    return sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(d[:12])) * 9 % 10 == int(d[12])


def card_issuer_ok(d: str) -> bool:
    """The issuer's prefix and length (IIN ranges of the networks): a Luhn-valid EAN-13 or ISBN is no card."""
    n, p2, p3, p4, p6 = len(d), int(d[:2]), int(d[:3]), int(d[:4]), int(d[:6])
    if n == 13 and ean13_ok(d):
        return False  # a barcode (1 in 10 Luhn-valid numbers also passes EAN-13; no network issues 13 digits now)
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or 622126 <= p6 <= 622925:
        return 16 <= n <= 19  # Discover
    if p2 == 35:
        return 16 <= n <= 19  # JCB (3528-3589 today)
    if p4 in (2131, 1800):
        return n == 15  # JCB (old 15-digit ranges)
    if 300 <= p3 <= 305 or p4 == 3095 or p2 in (36, 38, 39):
        return 14 <= n <= 19  # Diners Club
    if 2200 <= p4 <= 2204:
        return n == 16  # Mir
    if p2 == 62 or p2 == 81:
        return 16 <= n <= 19  # UnionPay
    if d[:4] in MAESTRO or 56 <= p2 <= 58:
        return 12 <= n <= 19  # Maestro
    if p2 == 60 or p2 == 63 or p2 == 67:
        return 16 <= n <= 19  # other debit ranges
    return False


def find_pii(
    text: str, mrn_patterns: list[re.Pattern], phone_regions: str | tuple[str, ...] | list[str] = DEFAULT_PHONE_REGIONS
) -> dict[str, list[tuple[int, int]]]:
    """Spans of each category in `text` (checksums and context rules applied; see the module docstring).

    Placeholders of an earlier redaction (`[EMAIL]`, ...) are blanked first, so they never count as context: a
    redacted text is re-checked exactly like text that never held the value."""
    regions = (phone_regions,) if isinstance(phone_regions, str) else tuple(phone_regions)
    if "[" in text:
        text = PLACEHOLDER_RE.sub(lambda m: " " * len(m.group()), text)
    spans: dict[str, list[tuple[int, int]]] = {}
    ids = _message_ids(text) if "@" in text else []
    if ids:
        spans["message_id"] = ids
    if "@" in text or _has_bang_path(text):
        if found := _emails(text, ids):
            spans["email"] = found
    numbers = NUMBER_GATE.search(text) is not None  # no number category but IPv6 can match without one of these
    if numbers:
        ssn = [m.span() for m in SSN.finditer(text) if not _overlaps(*m.span(), ids)] if "-" in text else []
        if ssn_word := [m.span(1) for m in SSN_LABELLED.finditer(text) if not _overlaps(*m.span(1), ssn)]:
            ssn = sorted(ssn + ssn_word)
        if ssn:
            spans["ssn"] = ssn
        if LONG_DIGITS.search(text):  # IBANs first: the digits of an IBAN can pass Luhn (held-out split, id 1250)
            iban = []
            for m in IBAN.finditer(text):
                if _overlaps(*m.span(), ids):
                    continue
                value = m.group()
                while value and not iban_ok(value):  # "IBAN: ES33 0333 ... 0959 BIC": the word after is no group
                    value = value[: max(value.rfind(" "), 0)] if " " in value else ""
                if value:
                    iban.append((m.start(), m.start() + len(value)))
            if iban:
                spans["iban"] = iban
            cards = []
            pos = 0
            while m := CARD.search(text, pos):
                pos = m.end()
                if _overlaps(*m.span(), iban + ids):
                    continue
                near_word = CARD_WORD.search(text[max(0, m.start() - 40) : m.start()]) is not None
                groups = re.split(r"(?<=\d)(?=[ -])", m.group())  # "4111 1111 1111 1111 123": try without the CVV
                while groups:
                    d = re.sub(r"\D", "", "".join(groups))
                    if (
                        12 <= len(d) <= 19
                        and luhn_ok(d)
                        and len(set(d)) > 1
                        and (card_issuer_ok(d) or (13 <= len(d) and near_word))
                    ):
                        cards.append((m.start(), m.start() + len("".join(groups))))
                        pos = cards[-1][1]  # what the card did not take is scanned again (a second card after it)
                        break
                    if len(groups) == 1 or len(d) < 12:
                        break
                    groups.pop()
            if cards:
                spans["credit_card"] = cards
    if ips := _ips(text, ids, numbers):  # IPv6 has its own gate: "fe80::1" holds no run of three digits
        spans["ip_address"] = ips
    if numbers:
        taken = [
            s for cat in ("ssn", "credit_card", "iban", "ip_address", "message_id", "email") for s in spans.get(cat, [])
        ]
        if phones := _phones(text, regions, taken):
            spans["phone"] = phones
    for pat in mrn_patterns:
        if mrn := [m.span() for m in pat.finditer(text)]:
            spans.setdefault("mrn", []).extend(mrn)
    return spans


def redact(text: str, spans: dict[str, list[tuple[int, int]]], categories: set[str]) -> str:
    """Replace the spans of `categories` by typed placeholders (`[EMAIL]`, `[MESSAGE_ID]`, ...)."""
    cuts = sorted(((a, b, c) for c, ss in spans.items() if c in categories for a, b in ss), reverse=True)
    last = len(text) + 1
    for a, b, cat in cuts:  # right to left; overlapping spans keep the outer-most replacement
        if b <= last:
            text = text[:a] + PLACEHOLDER[cat] + text[b:]
            last = a
    return text


def pii_categories() -> tuple[str, ...]:
    """The categories the PII detectors report: config, scan and report all read them from here."""
    return tuple(PLACEHOLDER)
