// GPT sample index and weighted dataset blending.
//
// The algorithm is specified in engine/data/samples.py (module docstring) precisely enough that a
// plain-Python version reproduces every array bit for bit; this file implements exactly that text.
// All outputs are int64 numpy arrays filled without per-element Python work; loops run without
// the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = int64_t;
using u64 = uint64_t;
using I64Array = py::array_t<i64, py::array::c_style | py::array::forcecast>;

constexpr u64 kGolden = 0x9E3779B97F4A7C15ULL;
constexpr u64 kStreamDocumentOrder = 1;
constexpr u64 kStreamSampleShuffle = 2;

// SplitMix64's output function, applied to a value (no state increment).
u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, one add and one mix per output.
class SplitMix64 {
  public:
    explicit SplitMix64(u64 state) : state_(state) {}
    static SplitMix64 for_stream(u64 seed, u64 stream, u64 epoch) {
        return SplitMix64(mix64(mix64(mix64(seed) + stream) + epoch));
    }
    u64 next() {
        state_ += kGolden;
        return mix64(state_);
    }
    // Unbiased integer in [0, n), n >= 1 (Lemire's multiply-and-reject).
    u64 below(u64 n) {
        __uint128_t m = static_cast<__uint128_t>(next()) * n;
        u64 low = static_cast<u64>(m);
        if (low < n) {
            const u64 threshold = (0 - n) % n;
            while (low < threshold) {
                m = static_cast<__uint128_t>(next()) * n;
                low = static_cast<u64>(m);
            }
        }
        return static_cast<u64>(m >> 64);
    }

  private:
    u64 state_;
};

// In-place Fisher-Yates: for i = n-1 down to 1, swap a[i] with a[below(i+1)].
void fisher_yates(i64* a, i64 n, SplitMix64& rng) {
    for (i64 i = n - 1; i > 0; --i) {
        const i64 j = static_cast<i64>(rng.below(static_cast<u64>(i) + 1));
        std::swap(a[i], a[j]);
    }
}

py::array_t<i64> new_array(std::vector<py::ssize_t> shape) { return py::array_t<i64>(shape); }

// A macro so the message is only built when the check fails (the checks run in per-element loops).
#define REQUIRE(condition, message)                                   \
    do {                                                              \
        if (!(condition)) throw py::value_error(message);             \
    } while (0)

void require_1d(const I64Array& a, const char* name) {
    REQUIRE(a.ndim() == 1, std::string(name) + " must be one-dimensional, got " +
                               std::to_string(a.ndim()) + " dimensions");
}

py::array_t<i64> splitmix64_stream(u64 seed, u64 stream, u64 epoch, i64 count) {
    REQUIRE(count >= 0, "count must be >= 0, got " + std::to_string(count));
    auto out = new_array({count});
    i64* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        auto rng = SplitMix64::for_stream(seed, stream, epoch);
        for (i64 i = 0; i < count; ++i) o[i] = static_cast<i64>(rng.next());
    }
    return out;
}

// Epoch e's block is document_ids shuffled by the stream (seed, kStreamDocumentOrder, e).
py::array_t<i64> document_order(const I64Array& document_ids, i64 num_documents_total, i64 num_epochs,
                                u64 seed) {
    require_1d(document_ids, "document_ids");
    REQUIRE(num_epochs >= 1, "num_epochs must be >= 1, got " + std::to_string(num_epochs));
    const i64 n = document_ids.shape(0);
    REQUIRE(n >= 1, "document_ids is empty: the dataset has no documents to draw samples from");
    const i64* ids = document_ids.data();
    for (i64 i = 0; i < n; ++i) {
        REQUIRE(ids[i] >= 0 && ids[i] < num_documents_total,
                "document_ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                    " is outside [0, " + std::to_string(num_documents_total) + ")");
    }
    i64 total;
    REQUIRE(!__builtin_mul_overflow(n, num_epochs, &total),
            "num_epochs * number of documents overflows int64");
    auto out = new_array({total});
    i64* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        for (i64 e = 0; e < num_epochs; ++e) {
            i64* block = o + e * n;
            std::copy(ids, ids + n, block);
            auto rng = SplitMix64::for_stream(seed, kStreamDocumentOrder, static_cast<u64>(e));
            fisher_yates(block, n, rng);
        }
    }
    return out;
}

// Row k = (position in order, offset in that document) of the token at global position
// k * seq_length of the stream of documents in `order`; k = 0 .. num_samples.
py::array_t<i64> sample_boundaries(const I64Array& order, const I64Array& document_token_counts,
                                   i64 seq_length) {
    require_1d(order, "order");
    require_1d(document_token_counts, "document_token_counts");
    REQUIRE(seq_length >= 1, "seq_length must be >= 1, got " + std::to_string(seq_length));
    const i64* ord = order.data();
    const i64* counts = document_token_counts.data();
    const i64 num_docs = document_token_counts.shape(0);
    const i64 n = order.shape(0);
    i64 total = 0;
    for (i64 i = 0; i < n; ++i) {
        REQUIRE(ord[i] >= 0 && ord[i] < num_docs,
                "order[" + std::to_string(i) + "] = " + std::to_string(ord[i]) +
                    " is not a document id in [0, " + std::to_string(num_docs) + ")");
        const i64 c = counts[ord[i]];
        REQUIRE(c >= 0, "document " + std::to_string(ord[i]) + " has a negative token count " +
                            std::to_string(c));
        REQUIRE(!__builtin_add_overflow(total, c, &total), "total token count overflows int64");
    }
    // total - 1 >= seq_length rather than total >= seq_length + 1: the latter overflows int64.
    REQUIRE(total - 1 >= seq_length,
            "the document order holds " + std::to_string(total) +
                " tokens, fewer than one sample of seq_length + 1 = " +
                std::to_string(static_cast<u64>(seq_length) + 1));
    const i64 num_samples = (total - 1) / seq_length;
    auto out = new_array({num_samples + 1, 2});
    i64* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        i64 doc = 0;        // position in the order
        i64 doc_start = 0;  // global position of that document's first token
        for (i64 k = 0; k <= num_samples; ++k) {
            const i64 target = k * seq_length;
            while (doc_start + counts[ord[doc]] <= target) {
                doc_start += counts[ord[doc]];
                ++doc;
            }
            o[2 * k] = doc;
            o[2 * k + 1] = target - doc_start;
        }
    }
    return out;
}

// Sample ids 0..num_samples-1: [0, head) shuffled by stream (seed, kStreamSampleShuffle, 0), then
// [head, num_samples) shuffled by stream (seed, kStreamSampleShuffle, 1).
py::array_t<i64> sample_shuffle(i64 num_samples, i64 head, u64 seed) {
    REQUIRE(num_samples >= 0, "num_samples must be >= 0, got " + std::to_string(num_samples));
    REQUIRE(head >= 0 && head <= num_samples, "head must be in [0, num_samples = " +
                                                  std::to_string(num_samples) + "], got " +
                                                  std::to_string(head));
    auto out = new_array({num_samples});
    i64* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        for (i64 i = 0; i < num_samples; ++i) o[i] = i;
        auto first = SplitMix64::for_stream(seed, kStreamSampleShuffle, 0);
        fisher_yates(o, head, first);
        auto second = SplitMix64::for_stream(seed, kStreamSampleShuffle, 1);
        fisher_yates(o + head, num_samples - head, second);
    }
    return out;
}

// (sequence, offset, length) pieces of the tokens from boundary `sample` to boundary `sample + 1`
// inclusive, in stream order; zero-length pieces are left out.
py::array_t<i64> sample_pieces(const I64Array& order, const I64Array& boundaries,
                               const I64Array& document_indices, const I64Array& sequence_starts,
                               i64 sample) {
    require_1d(order, "order");
    require_1d(document_indices, "document_indices");
    require_1d(sequence_starts, "sequence_starts");
    REQUIRE(boundaries.ndim() == 2 && boundaries.shape(1) == 2, "boundaries must have shape (n, 2)");
    REQUIRE(sample >= 0 && sample + 1 < boundaries.shape(0),
            "sample " + std::to_string(sample) + " is outside [0, " +
                std::to_string(boundaries.shape(0) - 1) + ")");
    const i64* b = boundaries.data();
    const i64* ord = order.data();
    const i64* docs = document_indices.data();
    const i64* starts = sequence_starts.data();
    const i64 num_order = order.shape(0);
    const i64 num_docs = document_indices.shape(0) - 1;
    const i64 num_seqs = sequence_starts.shape(0) - 1;
    const i64 first = b[2 * sample], first_offset = b[2 * sample + 1];
    const i64 last = b[2 * sample + 2], last_offset = b[2 * sample + 3];
    REQUIRE(0 <= first && first <= last && last < num_order && first_offset >= 0 && last_offset >= 0,
            "boundaries do not fit the order");
    std::vector<i64> pieces;
    for (i64 pos = first; pos <= last; ++pos) {
        const i64 d = ord[pos];
        REQUIRE(d >= 0 && d < num_docs, "order holds document " + std::to_string(d) +
                                            " outside the indexed dataset");
        const i64 s0 = docs[d], s1 = docs[d + 1];
        REQUIRE(0 <= s0 && s0 <= s1 && s1 <= num_seqs, "document_indices are inconsistent");
        const i64 doc_begin = starts[s0], doc_end = starts[s1];
        i64 g = doc_begin + (pos == first ? first_offset : 0);
        const i64 g_end = pos == last ? doc_begin + last_offset + 1 : doc_end;
        REQUIRE(g_end <= doc_end, "boundary offset past the end of document " + std::to_string(d));
        // Sequences of the document are contiguous: find the one holding token g, walk forward.
        i64 seq = std::upper_bound(starts + s0, starts + s1 + 1, g) - starts - 1;
        while (g < g_end) {
            const i64 take = std::min(g_end, starts[seq + 1]) - g;
            if (take > 0) {
                pieces.insert(pieces.end(), {seq, g - starts[seq], take});
                g += take;
            }
            ++seq;
        }
    }
    const auto num_pieces = static_cast<py::ssize_t>(pieces.size() / 3);
    auto out = new_array({num_pieces, 3});
    std::copy(pieces.begin(), pieces.end(), out.mutable_data());
    return out;
}

// Every product, difference and quotient rounded on its own (never fused into an FMA), so Python
// floats make the same choices.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#define NO_FMA
#elif defined(__GNUC__)
#define NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define NO_FMA
#endif

// Tijdeman's rule: among the datasets that are due (deficit >= floor) take the one whose deficit
// would pass sigma first; if rounding leaves none due, take the largest deficit.
NO_FMA void blend_loop(const std::vector<double>& w, i64 size, i64* dataset_index,
                       i64* dataset_sample_index) {
    const size_t n = w.size();
    size_t positive = 0;
    for (double x : w) positive += x > 0.0;
    const double floor = 1.0 / static_cast<double>(2 * std::max<size_t>(positive, 2) - 2);
    const double sigma = 1.0 - floor;
    std::vector<i64> counts(n, 0);
    for (i64 i = 0; i < size; ++i) {
        const double steps = static_cast<double>(i + 1);
        size_t best = n, largest = 0;
        double best_deadline = 0.0, largest_deficit = 0.0;
        for (size_t d = 0; d < n; ++d) {
            const double count = static_cast<double>(counts[d]);
            const double deficit = w[d] * steps - count;
            if (d == 0 || deficit > largest_deficit) {
                largest_deficit = deficit;
                largest = d;
            }
            if (deficit >= floor) {
                const double deadline = (count + sigma) / w[d];
                if (best == n || deadline < best_deadline) {
                    best_deadline = deadline;
                    best = d;
                }
            }
        }
        if (best == n) best = largest;
        dataset_index[i] = static_cast<i64>(best);
        dataset_sample_index[i] = counts[best]++;
    }
}

py::tuple blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                           i64 size) {
    REQUIRE(weights.ndim() == 1 && weights.shape(0) >= 1,
            "weights must be a non-empty one-dimensional sequence");
    REQUIRE(size >= 0, "size must be >= 0, got " + std::to_string(size));
    REQUIRE(size < (i64(1) << 53), "size must be below 2**53 (exact in float64)");
    const i64 n = weights.shape(0);
    const double* raw = weights.data();
    double total = 0.0;
    for (i64 d = 0; d < n; ++d) {
        REQUIRE(std::isfinite(raw[d]), "weights[" + std::to_string(d) + "] is not finite");
        REQUIRE(raw[d] >= 0.0, "weights[" + std::to_string(d) + "] is negative");
        total += raw[d];
    }
    REQUIRE(total > 0.0 && std::isfinite(total), "weights must have a positive finite sum");
    std::vector<double> w(n);
    for (i64 d = 0; d < n; ++d) w[d] = raw[d] / total;
    auto dataset_index = new_array({size});
    auto dataset_sample_index = new_array({size});
    i64* di = dataset_index.mutable_data();
    i64* dsi = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release nogil;
        blend_loop(w, size, di, dsi);
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

void register_sample_index(py::module_& m) {
    m.def("splitmix64_stream", &splitmix64_stream, py::arg("seed"), py::arg("stream"),
          py::arg("epoch"), py::arg("count"),
          "First `count` outputs (as int64 bit patterns) of the SplitMix64 stream for "
          "(seed, stream, epoch).");
    m.def("document_order", &document_order, py::arg("document_ids"),
          py::arg("num_documents_total"), py::arg("num_epochs"), py::arg("seed"),
          "Per-epoch Fisher-Yates shuffles of document_ids, concatenated (int64).");
    m.def("sample_boundaries", &sample_boundaries, py::arg("order"),
          py::arg("document_token_counts"), py::arg("seq_length"),
          "(num_samples + 1, 2) int64 rows of (position in order, offset in document).");
    m.def("sample_shuffle", &sample_shuffle, py::arg("num_samples"), py::arg("head"),
          py::arg("seed"), "Shuffled sample ids: [0, head) then [head, num_samples), each shuffled.");
    m.def("sample_pieces", &sample_pieces, py::arg("order"), py::arg("boundaries"),
          py::arg("document_indices"), py::arg("sequence_starts"), py::arg("sample"),
          "(pieces, 3) int64 rows of (sequence, offset, length) making up one sample.");
    m.def("blending_indices", &blending_indices, py::arg("weights"), py::arg("size"),
          "Weighted blend (Tijdeman's rule): (dataset index, index within that dataset), int64 each.");
}
