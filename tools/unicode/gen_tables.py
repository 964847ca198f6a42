"""Generate csrc/tokenizer's Unicode tables (a C++ include file) at build time.

Sources, each with its stated Unicode version:
- general categories: the PyPI package ``unicodedata2`` pinned to Unicode 16.0.0, the version
  of the Rust crate behind tiktoken's regexes (regex-syntax);
- canonical decompositions (NFD) and combining classes: ``unicodedata2`` (16.0) restricted to
  the code points assigned in Unicode 9.0, read from
  ``csrc/tokenizer/unicode/assigned_unicode9.txt``: HF's NFD (the Rust crate
  unicode-normalization-alignments) is Unicode 9.0, and both properties are stable once
  a code point is assigned;
- White_Space: the property's code point list (unchanged since Unicode 6.0);
- BERT's control / punctuation / nonspacing-mark classes: Unicode 8.0.0, read from
  ``csrc/tokenizer/unicode/bert_categories_unicode8.txt``. HF's BertNormalizer takes them
  from the Rust crate ``unicode_categories``, whose tables are Unicode 8.0;
- lowercase mappings: Unicode 17.0, the version of Rust's ``char::to_lowercase`` that HF's
  BertNormalizer uses, read from ``csrc/tokenizer/unicode/lowercase_unicode17.txt``
  (made by tools/unicode/make_lowercase.py).

Usage: python gen_tables.py BERT_CATEGORIES_TXT ASSIGNED9_TXT LOWERCASE_TXT OUT_INC
"""
import sys

UNICODE_VERSION = "16.0.0"

try:
    import unicodedata2 as ucd
except ImportError:  # pragma: no cover - build-time message
    sys.exit("gen_tables.py: the build needs the PyPI package unicodedata2==%s" % UNICODE_VERSION)
if ucd.unidata_version != UNICODE_VERSION:
    sys.exit("gen_tables.py: unicodedata2 is Unicode %s, the tables need %s (pip install unicodedata2==%s)"
             % (ucd.unidata_version, UNICODE_VERSION, UNICODE_VERSION))

WHITE_SPACE = set(range(0x09, 0x0E)) | {0x20, 0x85, 0xA0, 0x1680} | set(range(0x2000, 0x200B)) | {
    0x2028, 0x2029, 0x202F, 0x205F, 0x3000}
# HF BertNormalizer's is_chinese_char ranges (its extension range starts at 0x2B920).
BERT_CJK = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0x2F800, 0x2FA1F)]
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3  # decomposed arithmetically in C++
# The regex crate's \w (HF's single_word test): Alphabetic, \p{M}, \p{Nd}, \p{Pc}, Join_Control. Alphabetic is
# \p{L}, \p{Nl} and Other_Alphabetic, whose code points outside \p{M} are these letter symbols (So; PropList.txt
# 16.0). Checked against HF on every code point by tests/test_tokenizer_wordpiece.py.
OTHER_ALPHABETIC_SO = [(0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189)]
JOIN_CONTROL = (0x200C, 0x200D)

# Bit names must match csrc/tokenizer/unicode.h.
(LETTER, NUMBER, SPACE, MARK, UPPERISH, LOWERISH, BERT_PUNCT, BERT_CONTROL, BERT_MN, HAS_LOWER, HAS_NFD,
 BERT_CJK_BIT, HAS_CCC, WORD) = (1 << i for i in range(14))
MAX_LOWER, MAX_NFD = 3, 4  # csrc/tokenizer/unicode.h: kMaxLower, kMaxNfd
BLOCK_SHIFT = 7


def lowercase_table(path):
    out = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                cps = [int(x, 16) for x in line.split()]
                out[cps[0]] = cps[1:]
    return out


def legacy_classes(path):
    out = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            lo, hi, k = line.split()
            for c in range(int(lo, 16), int(hi, 16) + 1):
                out[c] = k
    return out


def main(legacy_path, assigned_path, lowercase_path, out_path):
    legacy = legacy_classes(legacy_path)
    assigned9 = legacy_classes(assigned_path)
    lower = lowercase_table(lowercase_path)
    flags = [0] * 0x110000
    nfd, ccc = {}, {}
    for c in range(0x110000):
        ch = chr(c)
        cat = ucd.category(ch)
        f = 0
        if cat[0] == "L":
            f |= LETTER
        if cat[0] == "N":
            f |= NUMBER
        if cat[0] == "M":
            f |= MARK
        if cat in ("Lu", "Lt", "Lm", "Lo") or cat[0] == "M":
            f |= UPPERISH
        if cat in ("Ll", "Lm", "Lo") or cat[0] == "M":
            f |= LOWERISH
        if c in WHITE_SPACE:
            f |= SPACE
        if (cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or c in JOIN_CONTROL
                or any(lo <= c <= hi for lo, hi in OTHER_ALPHABETIC_SO)):
            f |= WORD
        k = legacy.get(c)
        if k == "P" or 33 <= c <= 47 or 58 <= c <= 64 or 91 <= c <= 96 or 123 <= c <= 126:
            f |= BERT_PUNCT
        if (k == "C" and c not in (9, 10, 13)) or c in (0, 0xFFFD):
            f |= BERT_CONTROL
        if k == "M":
            f |= BERT_MN
        if any(lo <= c <= hi for lo, hi in BERT_CJK):
            f |= BERT_CJK_BIT
        if not 0xD800 <= c < 0xE000:
            if c in lower:
                f |= HAS_LOWER
            if c in assigned9 and not HANGUL_FIRST <= c <= HANGUL_LAST:
                d = ucd.normalize("NFD", ch)
                if d != ch:
                    f |= HAS_NFD
                    nfd[c] = [ord(x) for x in d]
        if c in assigned9 and ucd.combining(ch):
            f |= HAS_CCC
            ccc[c] = ucd.combining(ch)
        flags[c] = f

    assert max(map(len, lower.values())) <= MAX_LOWER and max(map(len, nfd.values())) <= MAX_NFD

    # Two-stage table: stage1[cp >> 7] -> block, stage2[block << 7 | (cp & 127)] -> flags.
    blocks, block_ids, stage1 = [], {}, []
    size = 1 << BLOCK_SHIFT
    for b in range(0x110000 >> BLOCK_SHIFT):
        blk = tuple(flags[b * size:(b + 1) * size])
        if blk not in block_ids:
            block_ids[blk] = len(blocks)
            blocks.append(blk)
        stage1.append(block_ids[blk])

    pool = []

    def mapping_table(name, table):
        rows = []
        for c in sorted(table):
            rows.append("{0x%X, %d, %d}" % (c, len(pool), len(table[c])))
            pool.extend(table[c])
        return "constexpr Mapping %s[] = {\n%s};\n" % (name, ",\n".join(rows))

    def array(ctype, name, values, per_line=24):
        body = ",\n".join(",".join(str(v) for v in values[i:i + per_line]) for i in range(0, len(values), per_line))
        return "constexpr %s %s[] = {\n%s};\n" % (ctype, name, body)

    parts = [
        "// Generated by tools/unicode/gen_tables.py at build time. Do not edit.\n",
        "// Unicode %s (unicodedata2); BERT classes 8.0.0; NFD 9.0.0; lowercase 17.0.0.\n" % UNICODE_VERSION,
        'constexpr const char kUnicodeVersion[] = "%s";\n' % UNICODE_VERSION,
        "constexpr int kBlockShift = %d;\n" % BLOCK_SHIFT,
        array("uint16_t", "kStage1", stage1),
        array("uint16_t", "kStage2", [v for blk in blocks for v in blk]),
        mapping_table("kLower", lower),
        mapping_table("kNfd", nfd),
        "constexpr uint32_t kCccCodepoints[] = {%s};\n" % ",".join("0x%X" % c for c in sorted(ccc)),
        "constexpr uint8_t kCccValues[] = {%s};\n" % ",".join(str(ccc[c]) for c in sorted(ccc)),
        array("uint32_t", "kMapPool", pool),
    ]
    with open(out_path, "w", encoding="ascii") as f:
        f.writelines(parts)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
