// Python bindings of the record text path (engine._C.SarTextBatch, engine._C.WordEncoder): the
// records of one chunk as the texts before their reward labels, read from JSON lines in C++ or
// given by the Python serializer, then cut into words and mapped to token ids through a word cache.
// Words the cache does not know go to a Python callable (SentencePiece's batch encode) in one call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "sar_record.h"

namespace py = pybind11;

namespace {

using ltu::sar::RecordParser;
using ltu::sar::SerializedRecord;

constexpr std::string_view kMarkers[] = {"<|domain|>", "<|state|>", "<|action|>", "<|reward|>"};

// tokenizer.split_words: cut before every space and U+2581 and around every segment marker,
// no empty words.
template <typename Emit>
void cut_words(std::string_view text, Emit&& emit) {
    size_t start = 0, i = 0;
    const size_t n = text.size();
    while (i < n) {
        const char c = text[i];
        if (c == '<' && i + 1 < n && text[i + 1] == '|') {
            bool marker = false;
            for (std::string_view m : kMarkers) {
                if (text.compare(i, m.size(), m) == 0) {
                    if (i > start) emit(text.substr(start, i - start));
                    emit(m);
                    i += m.size();
                    start = i;
                    marker = true;
                    break;
                }
            }
            if (!marker) ++i;
        } else if (c == ' ' || (c == '\xE2' && i + 2 < n && text[i + 1] == '\x96' && text[i + 2] == '\x81')) {
            if (i > start) emit(text.substr(start, i - start));
            start = i;
            i += c == ' ' ? 1 : 3;
        } else {
            ++i;
        }
    }
    if (n > start) emit(text.substr(start));
}

size_t code_points(std::string_view s) {
    size_t count = 0;
    for (char c : s) count += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
    return count;
}

std::string_view utf8_of(py::handle text, const char* what) {
    if (!PyUnicode_Check(text.ptr())) throw py::type_error(std::string(what) + " must be str");
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();
    return std::string_view(data, static_cast<size_t>(size));
}

py::str to_str(std::string_view s) {
    PyObject* obj = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
    if (obj == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(obj);
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& values) {
    py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
    if (!values.empty()) std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(T));
    return out;
}

// Strings stored once, numbered in order of first appearance.
class Interner {
public:
    uint32_t id(std::string_view s) {
        auto found = index_.find(s);
        if (found != index_.end()) return found->second;
        strings_.emplace_back(s);
        const uint32_t id = static_cast<uint32_t>(strings_.size() - 1);
        index_.emplace(strings_.back(), id);  // a view of the deque's element: stable
        return id;
    }
    const std::string& operator[](uint32_t id) const { return strings_[id]; }
    size_t size() const { return strings_.size(); }

private:
    std::deque<std::string> strings_;
    std::unordered_map<std::string_view, uint32_t> index_;
};

// Token ids of words (or whole texts, for a model whose encoding crosses spaces) seen before.
class WordEncoder {
public:
    WordEncoder(bool split_words, size_t max_cached_chars, size_t capacity)
        : split_words_(split_words), max_cached_chars_(max_cached_chars), capacity_(capacity) {}

    bool split_words() const { return split_words_; }
    size_t size() const { return words_.size(); }

    int64_t find(std::string_view word) const {
        auto found = index_.find(word);
        return found == index_.end() ? -1 : static_cast<int64_t>(found->second);
    }
    const int32_t* ids(int64_t entry) const { return ids_.data() + starts_[entry]; }
    size_t length(int64_t entry) const { return starts_[entry + 1] - starts_[entry]; }

    // Kept when short (those repeat: markers, field names, categorical values) and while there is room.
    void offer(std::string_view word, const int32_t* ids, size_t n) {
        if (words_.size() >= capacity_ || code_points(word) > max_cached_chars_) return;
        words_.emplace_back(word);
        index_.emplace(words_.back(), static_cast<uint32_t>(words_.size() - 1));
        ids_.insert(ids_.end(), ids, ids + n);
        starts_.push_back(ids_.size());
    }

    py::list split(const py::str& text) const {
        py::list out;
        cut_words(utf8_of(text, "text"), [&](std::string_view w) { out.append(to_str(w)); });
        return out;
    }

private:
    bool split_words_;
    size_t max_cached_chars_, capacity_;
    std::deque<std::string> words_;
    std::unordered_map<std::string_view, uint32_t> index_;
    std::vector<int32_t> ids_;
    std::vector<size_t> starts_{0};
};

class TextBatch {
public:
    explicit TextBatch(int float_digits) : parser_(float_digits) {
        if (float_digits < 0 || float_digits > 100)
            throw py::value_error("float_digits must be in [0, 100], got " + std::to_string(float_digits));
    }

    size_t size() const { return records_.size(); }

    // Reads lines[start], lines[start + 1], ... as records while the C++ path takes them; returns
    // how many it took (it stops before the first it declines, or any item that is not a str).
    size_t add_json_lines(const py::list& lines, size_t start) {
        const size_t n = static_cast<size_t>(PyList_GET_SIZE(lines.ptr()));
        size_t i = start;
        for (; i < n; ++i) {
            PyObject* item = PyList_GET_ITEM(lines.ptr(), static_cast<Py_ssize_t>(i));
            if (!PyUnicode_Check(item)) break;
            Py_ssize_t size = 0;
            const char* data = PyUnicode_AsUTF8AndSize(item, &size);
            if (data == nullptr) {  // not encodable (a lone surrogate): the Python path says why
                PyErr_Clear();
                break;
            }
            if (!parser_.parse(std::string_view(data, static_cast<size_t>(size)), parsed_)) break;
            append(domains_.id(parsed_.domain), parsed_.steps, parsed_.episode, parsed_.texts, parsed_.text_ends);
            for (size_t r = 0; r < parsed_.reward_fields.size(); ++r) {
                reward_field_.push_back(fields_.id(parsed_.reward_fields[r]));
                reward_value_.push_back(parsed_.reward_values[r]);
            }
        }
        return i - start;
    }

    // A record serialized by the Python path: its texts, and the field and value of each reward.
    void add_record(const py::str& domain, uint32_t steps, bool episode, const py::list& texts,
                    const py::list& fields, const py::list& values) {
        const size_t n = static_cast<size_t>(py::len(texts));
        if (py::len(fields) != n || py::len(values) != n)
            throw py::value_error("a record needs one reward field and value per text, got " + std::to_string(n) +
                                  " texts, " + std::to_string(py::len(fields)) + " fields and " +
                                  std::to_string(py::len(values)) + " values");
        if (n == 0) throw py::value_error("a record has at least one reward, so at least one text");
        scratch_.clear();
        scratch_ends_.clear();
        for (py::handle text : texts) {
            scratch_ += utf8_of(text, "texts");
            scratch_ends_.push_back(scratch_.size());
        }
        std::vector<uint32_t> field_ids(n);  // all read before the batch changes
        std::vector<double> reward_values(n);
        for (size_t r = 0; r < n; ++r) {
            reward_values[r] = PyFloat_AsDouble(values[r].ptr());
            if (reward_values[r] == -1.0 && PyErr_Occurred()) throw py::error_already_set();
            field_ids[r] = fields_.id(utf8_of(fields[r], "fields"));
        }
        append(domains_.id(utf8_of(domain, "domain")), steps, episode, scratch_, scratch_ends_);
        reward_field_.insert(reward_field_.end(), field_ids.begin(), field_ids.end());
        reward_value_.insert(reward_value_.end(), reward_values.begin(), reward_values.end());
    }

    void drop(int64_t record) {
        if (record < 0 || static_cast<size_t>(record) >= records_.size())
            throw py::index_error("record " + std::to_string(record) + " out of range for " +
                                  std::to_string(records_.size()) + " records");
        records_[static_cast<size_t>(record)].dropped = true;
    }

    py::list texts(int64_t record) const {
        if (record < 0 || static_cast<size_t>(record) >= records_.size())
            throw py::index_error("record " + std::to_string(record) + " out of range");
        const Record& r = records_[static_cast<size_t>(record)];
        py::list out;
        for (size_t t = r.first_text; t < r.first_text + r.num_texts; ++t) out.append(to_str(text(t)));
        return out;
    }

    // (keys, key index, value, record) of each reward of the records kept, in order; keys are the
    // distinct (domain, field) in order of first appearance.
    py::tuple rewards() const {
        std::unordered_map<uint64_t, int64_t> key_of;
        py::list keys;
        std::vector<int64_t> key_index, record_index;
        std::vector<double> values;
        for (size_t i = 0; i < records_.size(); ++i) {
            const Record& r = records_[i];
            if (r.dropped) continue;
            for (size_t t = r.first_text; t < r.first_text + r.num_texts; ++t) {
                const uint64_t key = (static_cast<uint64_t>(r.domain) << 32) | reward_field_[t];
                auto [found, added] = key_of.emplace(key, static_cast<int64_t>(key_of.size()));
                if (added) keys.append(py::make_tuple(domains_[r.domain], fields_[reward_field_[t]]));
                key_index.push_back(found->second);
                values.push_back(reward_value_[t]);
                record_index.push_back(static_cast<int64_t>(i));
            }
        }
        return py::make_tuple(keys, to_array(key_index), to_array(values), to_array(record_index));
    }

    // (domain names, then per record: domain index, steps, episode, rewards), every record.
    py::tuple records() const {
        py::list names;
        for (size_t d = 0; d < domains_.size(); ++d) names.append(domains_[static_cast<uint32_t>(d)]);
        std::vector<int64_t> domain(records_.size()), steps(records_.size()), rewards(records_.size());
        std::vector<uint8_t> episode(records_.size());
        for (size_t i = 0; i < records_.size(); ++i) {
            domain[i] = records_[i].domain;
            steps[i] = records_[i].steps;
            episode[i] = records_[i].episode;
            rewards[i] = static_cast<int64_t>(records_[i].num_texts);
        }
        return py::make_tuple(names, to_array(domain), to_array(steps), to_array(episode).attr("astype")("bool"),
                              to_array(rewards));
    }

    // (tokens as int32, tokens per text, texts per record) of the records kept. The words that
    // `words` does not know are encoded by one call encode_batch(list of str) -> list of id lists.
    py::tuple encode(WordEncoder& words, const py::object& encode_batch) const {
        std::vector<int64_t> refs;  // per word: a cache entry (>= 0) or -1 - its index in `missing`
        std::vector<size_t> text_ref_ends;
        std::vector<int64_t> rewards_per_record;
        std::unordered_map<std::string_view, int64_t> missing_index;
        std::vector<std::string_view> missing;
        auto visit = [&](std::string_view word) {
            const int64_t entry = words.find(word);
            if (entry >= 0) {
                refs.push_back(entry);
                return;
            }
            auto [found, added] = missing_index.emplace(word, static_cast<int64_t>(missing.size()));
            if (added) missing.push_back(word);
            refs.push_back(-1 - found->second);
        };
        for (const Record& r : records_) {
            if (r.dropped) continue;
            for (size_t t = r.first_text; t < r.first_text + r.num_texts; ++t) {
                if (words.split_words())
                    cut_words(text(t), visit);
                else
                    visit(text(t));
                text_ref_ends.push_back(refs.size());
            }
            rewards_per_record.push_back(static_cast<int64_t>(r.num_texts));
        }
        std::vector<int32_t> fresh_ids;
        std::vector<size_t> fresh_starts{0};
        if (!missing.empty()) {
            py::list request(missing.size());
            for (size_t k = 0; k < missing.size(); ++k) request[k] = to_str(missing[k]);
            read_ids(encode_batch(request), missing.size(), fresh_ids, fresh_starts);
            for (size_t k = 0; k < missing.size(); ++k)
                words.offer(missing[k], fresh_ids.data() + fresh_starts[k], fresh_starts[k + 1] - fresh_starts[k]);
        }
        std::vector<int32_t> tokens;
        std::vector<int64_t> text_lengths;
        text_lengths.reserve(text_ref_ends.size());
        size_t ref = 0;
        for (size_t end : text_ref_ends) {
            const size_t before = tokens.size();
            for (; ref < end; ++ref) {
                const int64_t e = refs[ref];
                if (e >= 0) {
                    tokens.insert(tokens.end(), words.ids(e), words.ids(e) + words.length(e));
                } else {
                    const size_t k = static_cast<size_t>(-1 - e);
                    tokens.insert(tokens.end(), fresh_ids.begin() + static_cast<std::ptrdiff_t>(fresh_starts[k]),
                                  fresh_ids.begin() + static_cast<std::ptrdiff_t>(fresh_starts[k + 1]));
                }
            }
            text_lengths.push_back(static_cast<int64_t>(tokens.size() - before));
        }
        return py::make_tuple(to_array(tokens), to_array(text_lengths), to_array(rewards_per_record));
    }

private:
    struct Record {
        uint32_t domain;
        uint32_t steps;
        bool episode;
        bool dropped;
        size_t first_text, num_texts;
    };

    std::string_view text(size_t t) const {
        const size_t begin = t ? text_ends_[t - 1] : 0;
        return std::string_view(text_bytes_).substr(begin, text_ends_[t] - begin);
    }

    void append(uint32_t domain, uint32_t steps, bool episode, const std::string& texts,
                const std::vector<size_t>& ends) {
        const size_t base = text_bytes_.size();
        records_.push_back(Record{domain, steps, episode, false, text_ends_.size(), ends.size()});
        text_bytes_ += texts;
        for (size_t end : ends) text_ends_.push_back(base + end);
    }

    static void read_ids(const py::object& result, size_t expected, std::vector<int32_t>& ids,
                         std::vector<size_t>& starts) {
        if (!PySequence_Check(result.ptr()) || py::len(result) != expected)
            throw py::value_error("the encoder must return one list of token ids per word (" +
                                  std::to_string(expected) + " words)");
        for (py::handle word_ids : result) {
            for (py::handle id : word_ids) {
                const long long value = PyLong_AsLongLong(id.ptr());
                if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
                if (value < 0 || value > INT32_MAX)
                    throw py::value_error("token id " + std::to_string(value) + " out of range [0, 2**31)");
                ids.push_back(static_cast<int32_t>(value));
            }
            starts.push_back(ids.size());
        }
    }

    RecordParser parser_;
    SerializedRecord parsed_;
    std::string scratch_;
    std::vector<size_t> scratch_ends_;
    std::string text_bytes_;
    std::vector<size_t> text_ends_;       // text t is text_bytes_[text_ends_[t - 1], text_ends_[t])
    std::vector<uint32_t> reward_field_;  // per text: its reward's field (in fields_)
    std::vector<double> reward_value_;
    std::vector<Record> records_;
    Interner domains_, fields_;
};

}  // namespace

void register_sar_batch(py::module_& m) {
    py::class_<WordEncoder>(m, "WordEncoder",
                            "Token ids of words seen before (use engine.data.tokenizer.RecordEncoder).")
        .def(py::init<bool, size_t, size_t>(), py::arg("split_words"), py::arg("max_cached_chars"),
             py::arg("capacity"))
        .def_property_readonly("split_words", &WordEncoder::split_words)
        .def("__len__", &WordEncoder::size)
        .def("split", &WordEncoder::split, py::arg("text"),
             "The words of a text: cut before every space and U+2581 and around every segment marker.");

    py::class_<TextBatch>(m, "SarTextBatch",
                          "The records of one chunk as the texts before their reward labels "
                          "(use engine.data.tokenizer.RecordEncoder).")
        .def(py::init<int>(), py::arg("float_digits"))
        .def("__len__", &TextBatch::size)
        .def("add_json_lines", &TextBatch::add_json_lines, py::arg("lines"), py::arg("start"),
             "Reads lines from `start` while the C++ path takes them; returns how many it took.")
        .def("add_record", &TextBatch::add_record, py::arg("domain"), py::arg("steps"), py::arg("episode"),
             py::arg("texts"), py::arg("fields"), py::arg("values"))
        .def("drop", &TextBatch::drop, py::arg("record"), "Leaves a record out of rewards() and encode().")
        .def("texts", &TextBatch::texts, py::arg("record"))
        .def("rewards", &TextBatch::rewards)
        .def("records", &TextBatch::records)
        .def("encode", &TextBatch::encode, py::arg("words"), py::arg("encode_batch"));
}
