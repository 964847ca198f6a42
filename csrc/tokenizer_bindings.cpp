// Python bindings of the tokenizer core. Encoding releases the GIL; texts are read as
// UTF-8 straight from the Python strings (no copies for ASCII strings).
#include <cstdint>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "tokenizer/batch.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "tokenizer/utf8.h"

namespace py = pybind11;
namespace tk = llmcore::tok;

namespace {

const std::pair<const char*, tk::Pattern> kPatterns[] = {
    {"gpt2", tk::Pattern::gpt2},     {"cl100k", tk::Pattern::cl100k}, {"o200k", tk::Pattern::o200k},
    {"llama3", tk::Pattern::llama3}, {"qwen2", tk::Pattern::qwen2},  {"cl100k_hf", tk::Pattern::cl100k_hf},
};

tk::Pattern parse_pattern(const std::string& name) {
  for (const auto& [n, p] : kPatterns)
    if (name == n) return p;
  throw std::invalid_argument("unknown pre-tokenizer pattern '" + name +
                              "' (known: gpt2, cl100k, o200k, llama3, qwen2, cl100k_hf)");
}

// UTF-8 view of a str (or validated bytes); `what` names the item in errors.
std::string_view text_view(const py::handle& obj, const std::string& what) {
  if (PyUnicode_Check(obj.ptr())) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
    if (!data) {
      PyErr_Clear();
      throw py::value_error(what + " cannot be encoded as UTF-8 (it contains a lone surrogate)");
    }
    return {data, size_t(size)};
  }
  if (PyBytes_Check(obj.ptr())) {
    char* data = nullptr;
    Py_ssize_t size = 0;
    PyBytes_AsStringAndSize(obj.ptr(), &data, &size);
    const size_t bad = tk::validate_utf8(reinterpret_cast<const uint8_t*>(data), size_t(size));
    if (bad != size_t(size))
      throw py::value_error(what + " is not valid UTF-8: invalid byte sequence at byte " + std::to_string(bad));
    return {data, size_t(size)};
  }
  throw py::type_error(what + " must be str or bytes, not " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
}

std::vector<std::string_view> text_views(const py::sequence& seq, const char* name) {
  std::vector<std::string_view> out;
  out.reserve(seq.size());
  for (size_t i = 0; i < seq.size(); ++i) out.push_back(text_view(seq[i], std::string(name) + "[" + std::to_string(i) + "]"));
  return out;
}

std::vector<tk::TemplateItem> parse_template(const py::list& items) {
  std::vector<tk::TemplateItem> out;
  for (const auto& h : items) {
    auto t = h.cast<py::tuple>();
    tk::TemplateItem item;
    const auto kind = t[0].cast<std::string>();
    if (kind == "A" || kind == "B") {
      item.is_sequence = true;
      item.sequence = kind == "A" ? 0 : 1;
      item.type_id = t[1].cast<uint8_t>();
    } else if (kind == "special") {
      item.is_sequence = false;
      item.sequence = 0;
      item.ids = t[1].cast<std::vector<int32_t>>();
      item.type_id = t[2].cast<uint8_t>();
    } else {
      throw std::invalid_argument("template item kind must be 'A', 'B' or 'special', got '" + kind + "'");
    }
    out.push_back(std::move(item));
  }
  return out;
}

template <class T>
py::array_t<T> new_array(std::vector<py::ssize_t> shape) {
  return py::array_t<T>(shape);
}

py::dict encode_batch(const tk::Tokenizer& tok, const py::sequence& texts, const std::optional<py::sequence>& pairs,
                      bool add_special_tokens, bool truncation, size_t max_length, const std::string& padding,
                      size_t pad_to_multiple_of, bool pad_left, int32_t pad_id, int32_t pad_type_id, bool offsets,
                      int num_threads, bool special_mask, const std::optional<std::vector<std::string>>& skip_added,
                      bool skip_restarts) {
  const auto views = text_views(texts, "texts");
  std::vector<std::string_view> pair_views;
  if (pairs) {
    pair_views = text_views(*pairs, "pairs");
    if (pair_views.size() != views.size())
      throw py::value_error("texts and pairs differ in length (" + std::to_string(views.size()) + " vs " +
                            std::to_string(pair_views.size()) + ")");
  }
  tk::EncodeOptions opt;
  opt.add_special_tokens = add_special_tokens;
  opt.truncation = truncation;
  opt.max_length = max_length;
  opt.special_mask = special_mask;
  std::vector<uint8_t> skip;
  if (skip_added) {
    skip = tok.added_skip_mask(*skip_added);
    opt.skip_added = &skip;
    opt.skip_restarts = skip_restarts;
  }
  tk::StagedBatch staged;
  {
    py::gil_scoped_release release;
    staged = tk::encode_batch(tok, views, pairs ? &pair_views : nullptr, opt, offsets, num_threads);
  }
  const py::ssize_t n = py::ssize_t(views.size());
  py::dict out;
  auto lengths = new_array<int32_t>({n});
  std::copy(staged.lengths.begin(), staged.lengths.end(), lengths.mutable_data());
  out["lengths"] = lengths;
  if (padding == "none") {
    const size_t total = staged.total_tokens();
    if (total > size_t(INT32_MAX)) throw py::value_error("batch holds more than 2^31 tokens: split it");
    auto ids = new_array<int32_t>({py::ssize_t(total)});
    auto type_ids = new_array<int32_t>({py::ssize_t(total)});
    py::array_t<int32_t> offs = offsets ? new_array<int32_t>({py::ssize_t(total), 2}) : new_array<int32_t>({0, 2});
    py::array_t<int32_t> special = new_array<int32_t>({special_mask ? py::ssize_t(total) : 0});
    auto cu = new_array<int32_t>({n + 1});
    int32_t* c = cu.mutable_data();
    c[0] = 0;
    for (py::ssize_t i = 0; i < n; ++i) c[i + 1] = c[i] + int32_t(staged.lengths[i]);
    {
      int32_t *pi = ids.mutable_data(), *pt = type_ids.mutable_data(), *po = offsets ? offs.mutable_data() : nullptr;
      int32_t* ps = special_mask ? special.mutable_data() : nullptr;
      py::gil_scoped_release release;
      tk::write_packed(staged, pi, pt, po, ps);
    }
    out["input_ids"] = ids;
    out["token_type_ids"] = type_ids;
    out["cu_seqlens"] = cu;
    if (offsets) out["offsets"] = offs;
    if (special_mask) out["special_tokens_mask"] = special;
    return out;
  }
  size_t row_len = padding == "max_length" ? max_length : staged.max_length();
  if (padding != "longest" && padding != "max_length") throw py::value_error("padding must be 'none', 'longest' or 'max_length'");
  row_len = std::max(row_len, staged.max_length());
  // rows are int32-indexed; the rounding must not wrap (a multiple near 2**64 made row_len 0: a heap overflow)
  constexpr size_t kMaxRow = size_t(INT32_MAX);
  if (pad_to_multiple_of > 1) {
    if (pad_to_multiple_of > kMaxRow || row_len > kMaxRow - (pad_to_multiple_of - 1))
      throw py::value_error("pad_to_multiple_of: padded rows would be longer than 2**31 - 1 tokens");
    row_len = (row_len + pad_to_multiple_of - 1) / pad_to_multiple_of * pad_to_multiple_of;
  }
  if (row_len > kMaxRow) throw py::value_error("padded rows would be longer than 2**31 - 1 tokens");
  const py::ssize_t L = py::ssize_t(row_len);
  auto ids = new_array<int32_t>({n, L});
  auto mask = new_array<int32_t>({n, L});
  auto type_ids = new_array<int32_t>({n, L});
  py::array_t<int32_t> offs = offsets ? new_array<int32_t>({n, L, 2}) : new_array<int32_t>({0, 0, 2});
  py::array_t<int32_t> special = special_mask ? new_array<int32_t>({n, L}) : new_array<int32_t>({0, 0});
  {
    int32_t *pi = ids.mutable_data(), *pm = mask.mutable_data(), *pt = type_ids.mutable_data();
    int32_t* po = offsets ? offs.mutable_data() : nullptr;
    int32_t* ps = special_mask ? special.mutable_data() : nullptr;
    py::gil_scoped_release release;
    tk::write_padded(staged, row_len, pad_left, pad_id, pad_type_id, pi, pm, pt, po, ps);
  }
  out["input_ids"] = ids;
  out["attention_mask"] = mask;
  out["token_type_ids"] = type_ids;
  if (offsets) out["offsets"] = offs;
  if (special_mask) out["special_tokens_mask"] = special;
  return out;
}

}  // namespace

void bind_tokenizer(py::module_& m) {
  m.def("unicode_version", &tk::unicode_version, "Unicode version of the tokenizer's general-category tables.");
  m.def("pattern_regex", [](const std::string& name) { return std::string(tk::pattern_regex(parse_pattern(name))); },
        py::arg("pattern"), "The regex a pre-tokenizer pattern implements, as tiktoken/tokenizer.json spell it.");
  m.def("pretokenize", [](const std::string& name, py::handle text) {
    const tk::Pattern p = parse_pattern(name);
    const std::string_view s = text_view(text, "text");
    std::vector<py::bytes> out;
    for (size_t pos = 0; pos < s.size();) {
      const size_t end = tk::next_piece(p, s.data(), s.size(), pos);
      out.emplace_back(s.data() + pos, end - pos);
      pos = end;
    }
    return out;
  }, py::arg("pattern"), py::arg("text"), "Pieces (UTF-8 bytes) of a byte-level pre-tokenizer pattern.");

  m.def("bert_words", [](py::handle text, bool clean_text, bool handle_chinese_chars, bool strip_accents,
                         bool lowercase) {
    const std::string_view s = text_view(text, "text");
    tk::BertSplitter::Scratch scratch;
    std::vector<py::bytes> out;
    tk::BertSplitter({clean_text, handle_chinese_chars, strip_accents, lowercase})
        .split(reinterpret_cast<const uint8_t*>(s.data()), s.size(), 0, scratch,
               [&](const tk::WordView& w) { out.emplace_back(reinterpret_cast<const char*>(w.bytes), w.size); });
    return out;
  }, py::arg("text"), py::arg("clean_text"), py::arg("handle_chinese_chars"), py::arg("strip_accents"),
     py::arg("lowercase"), "Words (UTF-8) of BertNormalizer + BertPreTokenizer: for tests.");

  py::class_<tk::Tokenizer>(m, "Tokenizer", "Native tokenizer; build it through llmcore.Tokenizer.")
      .def_static("wordpiece", [](const std::vector<std::pair<std::string, int32_t>>& vocab, const std::string& unk,
                                  const std::string& prefix, size_t max_chars,
                                  std::optional<std::tuple<bool, bool, bool, bool>> bert, bool cleanup) {
        std::optional<tk::BertOptions> opts;
        if (bert) opts = tk::BertOptions{std::get<0>(*bert), std::get<1>(*bert), std::get<2>(*bert), std::get<3>(*bert)};
        tk::Tokenizer t = tk::Tokenizer::wordpiece(tk::WordPiece(vocab, unk, prefix, max_chars), opts, cleanup);
        for (const auto& [token, id] : vocab) t.set_token_text(id, token, false);
        return t;
      }, py::arg("vocab"), py::arg("unk_token"), py::arg("prefix"), py::arg("max_input_chars_per_word"),
         py::arg("bert"), py::arg("cleanup"))
      .def_static("bpe_ranks", [](const std::vector<py::bytes>& tokens, const std::string& pattern, bool add_prefix_space) {
        std::vector<std::string> t(tokens.begin(), tokens.end());
        return tk::Tokenizer::byte_level_bpe(tk::BytePairEncoder::from_ranks(std::move(t)), parse_pattern(pattern),
                                             add_prefix_space);
      }, py::arg("tokens"), py::arg("pattern"), py::arg("add_prefix_space") = false)
      .def_static("bpe_merges", [](const std::vector<std::pair<py::bytes, int32_t>>& vocab,
                                   const std::vector<std::pair<py::bytes, py::bytes>>& merges, bool ignore_merges,
                                   const std::string& pattern, bool add_prefix_space) {
        std::vector<std::pair<std::string, int32_t>> v;
        v.reserve(vocab.size());
        for (const auto& [b, id] : vocab) v.emplace_back(std::string(b), id);
        std::vector<std::pair<std::string, std::string>> mg;
        mg.reserve(merges.size());
        for (const auto& [a, b] : merges) mg.emplace_back(std::string(a), std::string(b));
        return tk::Tokenizer::byte_level_bpe(tk::BytePairEncoder::from_merges(std::move(v), std::move(mg), ignore_merges),
                                             parse_pattern(pattern), add_prefix_space);
      }, py::arg("vocab"), py::arg("merges"), py::arg("ignore_merges"), py::arg("pattern"), py::arg("add_prefix_space"))
      .def("set_added_tokens", [](tk::Tokenizer& t,
                                  const std::vector<std::tuple<std::string, int32_t, bool, bool, bool, bool, bool>>& tokens) {
        std::vector<tk::AddedToken> added;
        for (const auto& [content, id, special, single_word, lstrip, rstrip, normalized] : tokens)
          added.push_back({content, id, special, single_word, lstrip, rstrip, normalized});
        t.set_added_tokens(std::move(added));
      }, py::arg("tokens"), "(content, id, special, single_word, lstrip, rstrip, normalized) tuples.")
      .def("set_template", [](tk::Tokenizer& t, const py::list& single, const py::list& pair) {
        t.set_template(parse_template(single), parse_template(pair));
      }, py::arg("single"), py::arg("pair"))
      .def("set_token_text", [](tk::Tokenizer& t, int32_t id, const py::bytes& text, bool special) {
        t.set_token_text(id, std::string(text), special);
      }, py::arg("id"), py::arg("text"), py::arg("special"))
      .def("set_trim_offsets", &tk::Tokenizer::set_trim_offsets, py::arg("on"), py::arg("keep_first"))
      .def("num_special_tokens", &tk::Tokenizer::num_special_tokens, py::arg("pair"))
      .def("encode_batch", &encode_batch, py::arg("texts"), py::arg("pairs"), py::arg("add_special_tokens"),
           py::arg("truncation"), py::arg("max_length"), py::arg("padding"), py::arg("pad_to_multiple_of"),
           py::arg("pad_left"), py::arg("pad_id"), py::arg("pad_type_id"), py::arg("offsets"), py::arg("num_threads"),
           py::arg("special_mask") = false, py::arg("skip_added") = py::none(), py::arg("skip_restarts") = false,
           "skip_added: contents of added tokens not matched in the text (encoded as plain text); None: all matched.\n"
           "skip_restarts: where one of them is the leftmost-longest match, the search goes on at its next byte "
           "(tiktoken's), not after it (HF's).")
      .def("decode", [](const tk::Tokenizer& t, const std::vector<int32_t>& ids, bool skip_special_tokens) {
        std::string s;
        {
          py::gil_scoped_release release;
          s = t.decode(ids.data(), ids.size(), skip_special_tokens);
        }
        return py::bytes(s);
      }, py::arg("ids"), py::arg("skip_special_tokens"));
}
