"""PII detectors (llmops/text/pii.py): regression on the labelled real-text set (tests/assets/pii_eval) and the cases the
issue found on real mail/Usenet text (Message-IDs, UUCP addresses, section numbers, 7-digit and vanity phones)."""

import re

import pytest

from bench.bench_pii import SCORED, load, score
from llmops.text.pii import CATEGORIES, DEFAULT_POLICY, PLACEHOLDER, find_pii, redact

MRN = [re.compile(r"\bMRN[:#\s]*\d{6,10}\b")]

# Measured when the set was committed (bench/bench_pii.py); a change that lowers one of these is a regression.
# (precision, recall) per category on all records; the issue's goal is >= 0.95 / 0.95 (email, phone) and
# recall >= 0.99 for the checksummed categories.
FLOOR = {
    "email": (1.0, 1.0),
    "message_id": (1.0, 1.0),
    "phone": (1.0, 1.0),
    "ssn": (1.0, 1.0),
    "credit_card": (1.0, 1.0),
    "ip_address": (1.0, 1.0),
    "iban": (1.0, 1.0),
}


@pytest.fixture(scope="module")
def measured():
    out = {}
    for split in ("all", "real", "test"):
        recs = load(split)
        out[split] = score(recs, [find_pii(r["text"], MRN) for r in recs])
    return out


@pytest.mark.parametrize("cat", SCORED)
def test_labelled_set_stays_at_or_above_the_measured_floor(measured, cat):
    p, r = FLOOR[cat]
    got = measured["all"][cat]
    assert got["precision"] >= p - 1e-9 and got["recall"] >= r - 1e-9, (cat, got)


def test_real_records_and_held_out_split_meet_the_issue_goals(measured):
    for split in ("real", "test"):
        s = measured[split]
        for cat in ("email", "phone"):
            assert s[cat]["precision"] >= 0.95 and s[cat]["recall"] >= 0.95, (split, cat, s[cat])
        for cat in ("ssn", "credit_card", "iban"):
            assert s[cat]["recall"] >= 0.99, (split, cat, s[cat])


def test_the_set_is_real_text_with_a_marked_synthetic_minority():
    recs = load("all")
    real = [r for r in recs if not r.get("synthetic")]
    assert len(real) >= 1000 and len(recs) - len(real) < 0.1 * len(recs)
    assert all(r["source"].startswith("debian:") for r in real)
    for r in recs:  # every label is a valid span of its text, in a known category
        for cat, spans in r["labels"].items():
            assert cat in CATEGORIES and all(0 <= a < b <= len(r["text"]) for a, b in spans)


@pytest.mark.parametrize(
    "text,cat,span",
    [
        ("Message-ID: <15090.61304.110929.45684@aaa.zzz.org>", "message_id", "<15090.61304.110929.45684@aaa.zzz.org>"),
        ("\t\t-- Larry Wall in <199710221718.KAA24299@wall.org>", "message_id", "<199710221718.KAA24299@wall.org>"),
        ("From: Barry Warsaw <barry@python.org>", "email", "barry@python.org"),
        ("This feature is courtesy of crl@purdue.", "email", "crl@purdue"),
        ("\t\t-- R. W. F. Clark (RWC102@PSUVM)", "email", "RWC102@PSUVM"),
        ("--\n-- uunet!sugar!karl", "email", "uunet!sugar!karl"),
        ("the path ...!bigsite!foovax!barbox!me directs", "email", "bigsite!foovax!barbox!me"),
        ("Received: from xcar [192.168.0.2] by jeeves", "ip_address", "192.168.0.2"),
        ("in her boudoir, lying beside her little Princess phone, 962-7873?", "phone", "962-7873"),
        ("Call 1-800-DOT-6000.  Operators are standing by.", "phone", "1-800-DOT-6000"),
        ("at 800-29-29-AMD (800-292-9263) in the USA", "phone", "800-29-29-AMD"),
        ("by phone at +1 617 621 7084, or by snail-mail", "phone", "+1 617 621 7084"),
        ("(412) 268-4387, fax: (412) 268-7395", "phone", "(412) 268-7395"),
    ],
)
def test_detects_real_world_shapes(text, cat, span):
    a = text.index(span)
    assert (a, a + len(span)) in [tuple(s) for s in find_pii(text, MRN).get(cat, [])]


@pytest.mark.parametrize(
    "text,cat",
    [
        ("Message-ID: <15090.61304.110929.45684@aaa.zzz.org>", "email"),  # a Message-ID is not an address
        ("Section 2.4.3.5 AWNS (Acceptor Will Not Send)", "ip_address"),
        ("alsa-lib (1.2.7.2-1) unstable; urgency=medium", "ip_address"),
        ("it is reportedly solved in version 6.2.0.16 and later", "ip_address"),
        ("CVS revision 1.17.2.7 of the file", "ip_address"),
        ('boundary="192.168.1.2.889.32614.987812255.500.21814"', "ip_address"),
        ("inet addr:10.0.3.2  P-t-P:10.0.3.1  Mask:255.255.255.255", "ip_address:mask"),
        ("vegard@gyversalen:~$ /sbin/ifconfig", "email"),  # a shell prompt, not mail
        ("Update d/liblz4-1.symbols. Add LZ4F_headerSize@Base 1.9.3.", "email"),
        ("Closes: #1022232. ISBN 0-262-18154-1, CVE-2026-118331, DFARS 227-7202", "phone"),
        ("The order number is 4111111111111112; quote it", "credit_card"),  # fails Luhn
        ("ISBN 978-0-596-00492-7 and 9780596004927", "credit_card"),
        ("ssn 000-12-3456 and 666-45-1234 are invalid", "ssn"),
        ("iban GB82 WEST 1234 5698 7654 33 fails mod-97", "iban"),
        ("the 1.5 release on 2024-01-15 fixed 1599 bugs", "phone"),
        ("merged in lintian/lintian!452, no longer necessary", "email"),
        ('#define q(k)main(){return!puts(#k"\\nq("#k")")', "email"),  # found on the wider 25k corpus
        ("Most likely you are using GCC 2.7.2.3 (or earlier)", "ip_address"),
        ("without patching.  To run GCC 2.7.2.3 on Solaris 2.6", "ip_address"),
        ("  * Standards-Version updated to 4.6.0.1", "ip_address"),  # the wider checks: changelogs, ASCII art, mail
        ("88oooooo.  :(jj(,;,,,         [8::   <", "ip_address"),
        ("fun, fun, fun!Well, 'bout the", "email"),
        ("In-Reply-To: <20110813065417.GV2324@audi.shelbyville.oz>", "credit_card"),
        ("_/oo OOOOO oo`  ooo   ooo  'o!o!o    o!o!o` 'o!o", "email"),  # ASCII art (fortunes-mario)
    ],
)
def test_hard_negatives(text, cat):
    found = find_pii(text, MRN)
    if cat == "ip_address:mask":
        assert [text[a:b] for a, b in found.get("ip_address", [])] == ["10.0.3.2", "10.0.3.1"]
    else:
        assert cat not in found, [text[a:b] for a, b in found.get(cat, [])]


def test_phone_regions_are_a_list():
    text = "the London office, 020 7946 0958, opens at nine"  # no phone word: a national number of a listed region
    assert "phone" in find_pii(text, MRN)  # GB is in the default list
    assert "phone" not in find_pii(text, MRN, phone_regions=("US",))
    assert "phone" in find_pii(text, MRN, phone_regions=("US", "GB"))  # adding a region never loses US numbers
    assert "phone" in find_pii("call (201) 802-0413", MRN, phone_regions=("GB", "DE", "US"))
    assert "phone" in find_pii("call +1 617 621 7084", MRN, phone_regions=("FR",))  # +country: any list
    assert "phone" not in find_pii("The order number is 666-45-1234; quote it", MRN)


def _only(text: str, cat: str, **kw) -> list[str]:
    return [text[a:b] for a, b in find_pii(text, MRN, **kw).get(cat, [])]


@pytest.mark.parametrize(
    "text, number",
    [
        ("Contact 9004035990 for the keys.", "9004035990"),  # no separators
        ("reach the office on (854)519-9678x008 today", "(854)519-9678x008"),  # x extension, no space after ")"
        ("fax 856.245.1507x341", "856.245.1507x341"),
        ("Call me at (201)802-0413.", "(201)802-0413"),  # the whole number, area code included
        ("Die Zentrale: (06201) 495608", "(06201) 495608"),  # German trunk zero in brackets
        ("Le standard : 0144222433", "0144222433"),  # French national number, trunk zero, no separators
        ("Ruf mich an: 030 12345678", "030 12345678"),
        ("Appelle-moi au 06 12 34 56 78", "06 12 34 56 78"),
        ("Tel: +44(0)20 7946 0958", "+44(0)20 7946 0958"),
        ("dial 0044 20 7946 0958 from abroad", "0044 20 7946 0958"),
        ("US office 001-617-621-7084", "001-617-621-7084"),
    ],
)
def test_phones_in_every_format_and_locale_are_found_whole(text, number):
    assert _only(text, "phone") == [number]


@pytest.mark.parametrize(
    "text",
    [
        "Date: 2018-09-13 04:00:27 -0400",
        "We upgraded focus to 13.10.6.0 last week",
        "Boston, MA 02110-1301 USA",
        "John Warburton (1682-1759) who had",
        "2000, 0-596-00027-8, adding a chapter",
        "software-properties (0.99.30-4) unstable",
        "140    447   74    408  165   1648  57",
        "Order #11991409 shipped.",
        "EAN 4006381333931 in stock.",
    ],
)
def test_phone_hard_negatives(text):
    assert "phone" not in find_pii(text, MRN), text


def test_a_person_address_with_digits_is_email_not_message_id():
    text = "Maintainer: Ann <ann12345@example.org>"
    assert _only(text, "email") == ["ann12345@example.org"] and "message_id" not in find_pii(text, MRN)
    header = "Message-ID: <ann12345@example.org>"  # header context still makes it a Message-ID
    assert "message_id" in find_pii(header, MRN) and "email" not in find_pii(header, MRN)
    assert "message_id" in find_pii("see <20240101123456.GA1234@mail.example.org>", MRN)  # machine-shaped


@pytest.mark.parametrize(
    "text", ["Requires libfoo==4.2.6.5", "pip install foo>=10.2.6.5", "libfoo-4.2.6.5", "we upgraded foo to 4.2.6.5"]
)
def test_version_context_beats_ip(text):
    assert "ip_address" not in find_pii(text, MRN)
    assert "ip_address" in find_pii("Login from 10.2.6.5 failed", MRN)
    assert "ip_address" in find_pii("client=10.2.6.5", MRN)


def test_ipv6_needs_no_digit_run_and_barcodes_are_not_cards():
    assert _only("peer fe80::1ff:fe23:4567:890a connected", "ip_address") == ["fe80::1ff:fe23:4567:890a"]
    assert _only("from [abcd:ef01:2345:6789:abcd:ef01:2345:6789]", "ip_address")
    assert "credit_card" not in find_pii("EAN 4006381333931 in stock.", MRN)  # Luhn- and EAN-valid barcode
    assert _only("card 4111 1111 1111 1111 charged", "credit_card") == ["4111 1111 1111 1111"]
    assert _only("amex 378282246310005", "credit_card") == ["378282246310005"]
    assert "credit_card" not in find_pii("ref 3782822463100051", MRN)  # 16 digits is no Amex (no card word)


def test_redaction_is_a_fixed_point():
    """Placeholders never count as context: a redacted text re-checks clean, whatever sits next to the placeholder."""
    cases = [
        "<20240101123456.GA1234@lists.example.org> Requires libfoo==4.2.6.5",
        "Message-ID: <20240101123456.GA1234@host.example> [ libfoo 4.2.6.5 ]",
        "call 020 7946 0958 or [130480] 555 0100",
        "Write to ann@example.org, phone (201)802-0413x12, from 10.1.2.3 or fe80::1ff:fe23:4567:890a",
    ]
    for text in cases:
        cats = set(CATEGORIES)
        once = redact(text, find_pii(text, MRN), cats)
        assert find_pii(once, MRN) == {}, (text, once, find_pii(once, MRN))
        assert redact(once, find_pii(once, MRN), cats) == once


def test_redaction_placeholders_and_policy():
    text = (
        "Message-ID: <1992Aug26.184221.29627@netlabs.com>\nFrom: shane@mit-ajax\n"
        "Write to jane@example.org or call 1-800-DOT-6000."
    )
    out = redact(text, find_pii(text, MRN), {"email", "phone", "message_id"})
    assert out == "Message-ID: [MESSAGE_ID]\nFrom: [EMAIL]\nWrite to [EMAIL] or call [PHONE]."
    assert set(PLACEHOLDER) == set(CATEGORIES) == set(DEFAULT_POLICY) and DEFAULT_POLICY["message_id"] == "redact"
    assert PLACEHOLDER["message_id"] == "[MESSAGE_ID]"


def test_validation_uses_these_detectors():
    """Validation (scan workers, report, config's category list) runs llmops/text/pii.py, message_id included."""
    import inspect

    from llmops.config import pii_defaults
    from llmops.text import pii
    from tasks import scan, validation

    assert "from llmops.text import pii as detectors" in inspect.getsource(scan)  # what the scan workers run
    assert validation.pii_categories is pii.pii_categories
    assert pii.pii_categories() == CATEGORIES and pii_defaults()["message_id"] == "redact"
    text = "Write to jane@example.org or call +1-415-555-0132; card 4111 1111 1111 1111."
    spans = find_pii(text, MRN)
    assert set(spans) == {"email", "phone", "credit_card"}
    assert redact(text, spans, {"email"}) == text.replace("jane@example.org", "[EMAIL]")


# --- red-team round 2 (a subagent's own data, 9 locales): labelled identifiers, money, separators, adjacency ---


@pytest.mark.parametrize(
    "text",
    [
        "Kundennummer 9876543210, Vertrag 4711.",
        "Bestellnummer 9876543210 ist unterwegs.",
        "Rechnung Nr. 0301234567 bezahlt.",
        "Steuernummer 21/815/08150",
        "Numéro de commande 0612345678 expédié.",
        "SIREN 732 829 320, SIRET 732 829 320 00074.",
        "Facture n° 2024-03-0042 du 15 mars.",
        "Partita IVA 12345678903",
        "Numero ordine 3456789012",
        "Fattura n. 2024/0042 del 15.03.2024.",
        "Número de pedido 6123456789",
        "Pedido 612345678 enviado",
        "Ordernummer 0612345678",
        "KvK-nummer 12345678",
        "NHS number 943 476 5919",
        "UPC 036000291452 on the box.",
        "Timestamp 1712345678",
        "Roll no 9876543210",
        "Model number 2125550123 in stock",
        "Population: 2125550123 (estimate)",
        "Budget : 612 345 678 €",
        "Prijs: € 1.234.567,89",
        "Coordinates 40.7127753 -74.0059728",
        "Lat 51.507351, lon -0.127758",
        "ABN 51 824 753 556",
        "Companies House no. 01234567 registered.",
        "customer no. 0301234567",
    ],
)
def test_a_number_labelled_as_another_identifier_is_not_a_phone(text):
    """Any 10-digit number is a valid Indian or Italian mobile: the label before it decides."""
    assert "phone" not in find_pii(text, MRN), (text, find_pii(text, MRN))


@pytest.mark.parametrize(
    "text, number",
    [
        ("Telefonnummer 0301234567", "0301234567"),  # a phone compound is a phone label, not an identifier
        ("Kundennummer 4711, Rufnummer 0301234567", "0301234567"),  # the phone word is nearer
        ("Customer: +1 212-555-0123", "+1 212-555-0123"),  # "customer" alone is no identifier label
        ("Tel.0301234567", "0301234567"),
        ("Call 212\u2013555\u20130123", "212\u2013555\u20130123"),  # en dashes
        ("Call 212\u00a0555\u00a00123", "212\u00a0555\u00a00123"),  # no-break spaces
        ("Tél.\u202f06\u202f12\u202f34\u202f56\u202f78", "06\u202f12\u202f34\u202f56\u202f78"),  # narrow NBSP
        ("Tél. : +33 1.23.45.67.89", "+33 1.23.45.67.89"),  # dotted like a version, but +country
        ("Téléphone : 0.801.61.11.84", "0.801.61.11.84"),  # dotted, but labelled
        ("Mobiel: 06.12089554", "06.12089554"),  # one dot, not a decimal
        ("Tel: +44 (0) 7700 900123", "+44 (0) 7700 900123"),
        ("Call 212-555-0123, ext. 45 today", "212-555-0123, ext. 45"),
        ("% Tel: (+98) 914 492 1058", "(+98) 914 492 1058"),  # glibc locale headers (pii_heldout/glibc_locales)
        ("% Tel: +420/68/5391545", "+420/68/5391545"),
        ("% Tel: +27 83  2797047", "+27 83  2797047"),  # two spaces, but written +country on one line
        ("% Fax: +98 21 6022372", "+98 21 6022372"),  # an old Tehran number: the whole of it, not the last part
    ],
)
def test_phones_written_unusually_are_found_whole(text, number):
    assert _only(text, "phone") == [number]


def test_values_that_touch_are_all_found_in_one_pass():
    """Redaction needs no second pass when values touch: other categories are blanked before phones are sought."""
    cases = {
        "Kontakt: anna.weber@example.de/0301234567": {"email", "phone"},
        "Tel. 030 1234567 0301234568": {"phone"},
        "card 4111 1111 1111 1111 from 10.1.2.3": {"credit_card", "ip_address"},
    }
    for text, cats in cases.items():
        spans = find_pii(text, MRN)
        assert set(spans) == cats, (text, spans)
        once = redact(text, spans, set(CATEGORIES))
        assert find_pii(once, MRN) == {} and not re.search(r"\d{3}", once), (text, once)
    assert _only("Tel. 030 1234567 0301234568", "phone") == ["030 1234567", "0301234568"]


@pytest.mark.parametrize(
    "text, ip",
    [
        ("The gateway (192.168.1.1) is down.", "192.168.1.1"),
        ("We updated the DNS record to 203.0.113.10.", "203.0.113.10"),
        ("Upgraded the server from 10.0.0.5 to 10.0.0.6", "10.0.0.5"),
        ("Server no. 10.20.30.40 rebooted.", "10.20.30.40"),
        ("resolver 1.1.1.1 is fast", "1.1.1.1"),
        ("loopback ::1 only", "::1"),
    ],
)
def test_a_network_word_beats_weak_version_hints(text, ip):
    assert _only(text, "ip_address")[:1] == [ip]


def test_versions_and_citations_that_are_not_ips_or_message_ids():
    assert "ip_address" not in find_pii("Firmware 2.10.100.12 released today.", MRN)
    assert "ip_address" not in find_pii("Changes (1.2.3.4) in this release", MRN)
    for text, addr in [
        ("Details in <jane.doe@example.com>", "jane.doe@example.com"),
        ("Reply to John Smith (id <john.smith@example.co.uk>)", "john.smith@example.co.uk"),
    ]:
        assert _only(text, "email") == [addr] and "message_id" not in find_pii(text, MRN)
    assert "message_id" in find_pii("Larry Wall in <1992Aug26.184221.29627@netlabs.com> writes:", MRN)
    assert _only("card 4111.1111.1111.1111", "credit_card") == ["4111.1111.1111.1111"]


def test_every_valid_example_number_of_every_default_region_is_found():
    """The property behind phone recall: whatever number libphonenumber calls valid in one of the regions, written in
    any of its standard formats, after a phone word of any of the regions' languages, is found whole."""
    import phonenumbers as pn

    from llmops.text.pii import DEFAULT_PHONE_REGIONS

    fmts = [pn.PhoneNumberFormat.NATIONAL, pn.PhoneNumberFormat.INTERNATIONAL, pn.PhoneNumberFormat.E164]
    words = ["Call", "Ruf an:", "Appelez le", "Llame al", "Chiama il", "Bel", "Tel."]
    missed = []
    n = 0
    for region in DEFAULT_PHONE_REGIONS:
        for kind in (pn.PhoneNumberType.FIXED_LINE, pn.PhoneNumberType.MOBILE, pn.PhoneNumberType.TOLL_FREE):
            num = pn.example_number_for_type(region, kind)
            if num is None:
                continue
            for fmt in fmts:
                written = pn.format_number(num, fmt)
                for word in words:
                    text = f"{word} {written} please."
                    n += 1
                    if _only(text, "phone") != [written]:
                        missed.append((text, _only(text, "phone")))
    assert n > 500 and not missed, missed[:10]


def test_redaction_of_any_two_touching_values_needs_one_pass_and_leaves_no_digits():
    """Every pair of values (any categories, both orders) joined by each separator people write between values:
    one redaction pass finds everything, and no 4-digit run of either value is left in the text."""
    import itertools

    values = [
        "anna.weber@example.de",
        "0301234567",
        "+44 20 7946 0958",
        "(212) 555-0123",
        "06 12 34 56 78",
        "+1-415-555-0132x12",
        "4111 1111 1111 1111",
        "378282246310005",
        "10.1.2.3",
        "fe80::1ff:fe23:4567:890a",
        "DE89 3704 0044 0532 0130 00",
        "GB82WEST12345698765432",
        "123-45-6789",
    ]
    seps = [" ", "/", ",", ", ", " - ", ";", "|", " or ", "\n", "(", ")"]
    bad = []
    for v1, v2, sep in itertools.product(values, values, seps):
        text = f"Kontakt: {v1}{sep}{v2} bitte."
        once = redact(text, find_pii(text, MRN), set(CATEGORIES))
        runs = [r for v in (v1, v2) for r in re.findall(r"\d{4,}", v)]
        if find_pii(once, MRN) or any(r in once.replace(" ", "") for r in runs):
            bad.append((text, once))
    assert len(values) ** 2 * len(seps) == 1859 and not bad, bad[:5]


# Measured on the held-out files (bench/bench_pii.py --heldout FILE): (phone precision, recall on the numbers
# libphonenumber calls valid in the record's region). glibc_locales holds territories outside the default
# phone_regions (ta_LK's national "94-777-315206" needs LK in phone_regions: the one valid number missed).
HELDOUT_FLOOR = {"records.jsonl": (1.0, 1.0), "fresh.jsonl": (1.0, 1.0), "glibc_locales.jsonl": (1.0, 121 / 122)}


@pytest.mark.parametrize("name", sorted(HELDOUT_FLOOR))
def test_held_out_sets_stay_at_the_measured_floor(name):
    import json
    from pathlib import Path

    from bench.bench_pii import valid_phone_recall

    path = Path(__file__).resolve().parents[2] / "tests/assets/pii_heldout" / name
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    preds = [find_pii(r["text"], MRN) for r in records]
    got = score(records, preds)
    found, n = valid_phone_recall(records, preds)
    p_floor, r_floor = HELDOUT_FLOOR[name]
    assert got["phone"]["precision"] >= p_floor - 1e-9 and found / n >= r_floor - 1e-9, (got["phone"], found, n)
    for cat, v in got.items():  # every other category: nothing lost and nothing invented on these sets
        if cat != "phone" and (v["n"] or v["n_pred"]):
            p_min = 0.99 if cat == "email" else 1.0  # records.jsonl: 5 real Maintainer: addresses the labeller skips
            assert v["recall"] == 1.0 and v["precision"] >= p_min, (cat, v)


# --- red-team round 3 (a fresh subagent's 1,200 records in 10 locales): block categories next to words, logs, CSV ---


def test_block_categories_are_found_next_to_the_words_that_follow_them():
    assert _only("IBAN: ES33 0333 9837 0465 4456 0959 BIC LGEIESLF36", "iban") == ["ES33 0333 9837 0465 4456 0959"]
    assert _only("IBAN: ES6798303737436019755755 BIC OKLWESG", "iban") == ["ES6798303737436019755755"]
    for text, ssn in [
        ("SSN: 017 26 6681\nEmployee ID", "017 26 6681"),
        ("Social Security No.: 423987480", "423987480"),
        ("SSN#: 465066934", "465066934"),
    ]:
        assert _only(text, "ssn") == [ssn] and "phone" not in find_pii(text, MRN), text


@pytest.mark.parametrize(
    "text, number",
    [
        ("2024-01-01T10:00:00Z INFO sms sent msisdn=+18004062160 id=15c7a31b", "+18004062160"),
        ("INFO sms sent to=+441215146716 id=51cce62a", "+441215146716"),
        ("phone=2125550123", "2125550123"),
        ("art,gilbertcharles8@yahoo.com,+18002818034,62,Lake Hay", "+18002818034"),
        (",richard.sharp@hunt-brown.org,07727257003,29,Saunders", "07727257003"),
        ("Kundenservice: +49 1514 6697592", "+49 1514 6697592"),
        ("Ph.0820910483. Autem", "0820910483"),
        ("Mobile No:-086603-14910", "086603-14910"),
        ("call 1 (687) 138-7880 today", "1 (687) 138-7880"),
        ("ISBN 978-0-489-99107-5 (361)770-9137x11534 is the number", "(361)770-9137x11534"),
    ],
)
def test_phones_in_logs_csv_and_abbreviations(text, number):
    assert _only(text, "phone") == [number], find_pii(text, MRN)


@pytest.mark.parametrize(
    "text",
    [
        "SEED = 935287179",
        "Routing number 031356224",
        "Direct deposit routing 036328626 account 864570957",
        "Phone model Galaxy S21, IMEI: 356994158308969",
        "VAT Reg No. GB 692 6660 37",
        "SIRET 462 578 077 33108",
        "PO 6336167424",
        "Case 0938153450.",
        "BN 862354350 RT0001",
        "SN: 7548506418",
        "Model 8555951955",
        "639869754 bytes",
        "49.881.035 abitanti",
        "Barcode 332355518696",
        "75968\t3215.05\t1976-02-25",
        "N° de suivi : 0612345678",
        "Ref. 0301234567",
        "Rechnungsnr. 0301234567",
        "Codice cliente: 3471234567",
        "Kunden-Nr. 0301234567",
    ],
)
def test_labelled_ids_counts_and_columns_are_not_phones(text):
    assert "phone" not in find_pii(text, MRN), (text, find_pii(text, MRN))


def test_slices_and_bumped_versions_are_not_ips():
    assert "ip_address" not in find_pii("    return x[2::8]", MRN)
    assert "ip_address" not in find_pii("- Bump ground from 2.27.5 to 3.10.7.5", MRN)
    assert _only("peer fe80::1 up", "ip_address") == ["fe80::1"]
